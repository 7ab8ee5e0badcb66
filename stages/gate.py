"""DVC stage `gate`.

Load-test I-DLM (ISD) and R-ISD against the AR base with guidellm at each concurrency
level, add evaluate's quality deltas, and move the registry alias (`champion`) to the
exported versions only if every threshold holds; otherwise exit non-zero with the table
of what missed and leave the alias where it was.
"""

from idlm.stage import exit_process, stage_main


def _run(cfg):  # noqa: ANN001, ANN202 - heavy imports only after the config is valid
    from idlm.serving.gate.stage import run

    return run(cfg)


if __name__ == "__main__":
    exit_process(stage_main("gate", _run, __doc__))
