"""DVC stage `lora`.

Train the gated-LoRA adapter (on at MASK rows only) on the frozen base, for lossless
R-ISD.
"""

from idlm.stage import exit_process, stage_main

if __name__ == "__main__":   # runs idlm.stages.lora.run once the config is valid
    exit_process(stage_main("lora", __doc__))
