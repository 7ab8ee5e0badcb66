"""DVC stage `ic`.

Introspective-consistency training over a stride curriculum (N=2 then N=3 by default;
tiny: then N=4) as one DeepSpeed run: one optimizer and one schedule; a curriculum phase
changes only the stride and alpha.
"""

from idlm.stage import exit_process, stage_main

if __name__ == "__main__":   # runs idlm.stages.ic.run once the config is valid
    exit_process(stage_main("ic", __doc__))
