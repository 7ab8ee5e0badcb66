"""DVC stage `gate`.

Load-test I-DLM (ISD) and R-ISD against the AR base with guidellm at each concurrency
level, add evaluate's quality deltas, and move the registry alias (`champion`) to the
exported versions only if every threshold holds; otherwise exit non-zero with the table
of what missed and leave the alias where it was.
"""

from idlm.stage import exit_process, stage_main

if __name__ == "__main__":   # runs idlm.stages.gate.run once the config is valid
    exit_process(stage_main("gate", __doc__))
