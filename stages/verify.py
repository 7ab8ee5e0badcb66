"""DVC stage `verify`.

Lossless check (R-ISD and ISD greedy == AR greedy, against the engine's AR path and
transformers' generate), exactness at T > 0 (chi-square), TPF and acceptance per draft
position for each stride, introspective acceptance. Fails (non-zero exit, report and
metrics still written) when any check fails.
"""

from idlm.stage import exit_process, stage_main


def _run(cfg):  # noqa: ANN001, ANN202 - heavy imports only after the config is valid
    from idlm.decoding.verify_stage import run

    return run(cfg)


if __name__ == "__main__":
    exit_process(stage_main("verify", _run, __doc__))
