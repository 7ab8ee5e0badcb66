"""DVC stage `verify`.

Lossless check (R-ISD and ISD greedy == AR greedy, against the engine's AR path and
transformers' generate), exactness at T > 0 (chi-square), TPF and acceptance per draft
position for each stride, introspective acceptance. Fails (non-zero exit, report and
metrics still written) when any check fails.
"""

from idlm.stage import exit_process, stage_main

if __name__ == "__main__":   # runs idlm.stages.verify.run once the config is valid
    exit_process(stage_main("verify", __doc__))
