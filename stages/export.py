"""DVC stage `export`.

Write the SGLang-servable bundles (I-DLM with ISD: full IC weights; R-ISD: base reference
+ gated adapter), each with a sha256 manifest, algorithm config and launch command; check
they load back with the same greedy output; register both in MLflow's model registry.
"""

from idlm.stage import exit_process, stage_main

if __name__ == "__main__":   # runs idlm.stages.export.run once the config is valid
    exit_process(stage_main("export", __doc__))
