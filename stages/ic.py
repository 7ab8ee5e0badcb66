"""DVC stage `ic`.

Introspective-consistency training over a stride curriculum (N=2 then N=3 by default;
tiny: then N=4) as one DeepSpeed run: one optimizer and one schedule; a curriculum phase
changes only the stride and alpha.
"""

from idlm.stage import exit_process, stage_main


def _run(cfg):  # noqa: ANN001, ANN202 - heavy imports only after the config is valid
    from idlm.training.ic import run

    return run(cfg)


if __name__ == "__main__":
    exit_process(stage_main("ic", _run, __doc__))
