"""DVC stage `base`.

AR-pretrain the tiny Qwen3 (tiny profile) or resolve and pin a pretrained base checkpoint.
"""

from idlm.stage import exit_process, stage_main

if __name__ == "__main__":   # runs idlm.stages.base.run once the config is valid
    exit_process(stage_main("base", __doc__))
