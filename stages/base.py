"""DVC stage `base`.

AR-pretrain the tiny Qwen3 (tiny profile) or resolve and pin a pretrained base checkpoint.
"""

from idlm.stage import exit_process, stage_main


def _run(cfg):  # noqa: ANN001, ANN202 - heavy imports only after the config is valid
    from idlm.training.base import run

    return run(cfg)


if __name__ == "__main__":
    exit_process(stage_main("base", _run, __doc__))
