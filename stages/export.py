"""DVC stage `export`.

Write the SGLang-servable bundles (I-DLM with ISD: full IC weights; R-ISD: base reference
+ gated adapter), each with a sha256 manifest, algorithm config and launch command; check
they load back with the same greedy output; register both in MLflow's model registry.
"""

from idlm.stage import exit_process, stage_main


def _run(cfg):  # noqa: ANN001, ANN202 - heavy imports only after the config is valid
    from idlm.serving.export.stage import run

    return run(cfg)


if __name__ == "__main__":
    exit_process(stage_main("export", _run, __doc__))
