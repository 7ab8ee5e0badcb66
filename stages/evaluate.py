"""DVC stage `evaluate`.

The configured benchmarks (15 real ones, or the tiny profile's held-out sets and a
HumanEval subset) for the AR base, I-DLM (ISD) and R-ISD: per-benchmark scores, a
Markdown table, a bar chart and per-sample JSONL logs. A killed run resumes without
redoing finished samples.
"""

from idlm.stage import exit_process, stage_main


def _run(cfg):  # noqa: ANN001, ANN202 - heavy imports only after the config is valid
    from idlm.benchmarks.evaluate_stage import run

    return run(cfg)


if __name__ == "__main__":
    exit_process(stage_main("evaluate", _run, __doc__))
