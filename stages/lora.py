"""DVC stage `lora`.

Train the gated-LoRA adapter (on at MASK rows only) on the frozen base, for lossless
R-ISD.
"""

from idlm.stage import exit_process, stage_main


def _run(cfg):  # noqa: ANN001, ANN202 - heavy imports only after the config is valid
    from idlm.training.lora import run

    return run(cfg)


if __name__ == "__main__":
    exit_process(stage_main("lora", _run, __doc__))
