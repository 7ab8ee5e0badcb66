"""DVC stage `evaluate`.

The configured benchmarks (15 real ones, or the tiny profile's held-out sets and a
HumanEval subset) for the AR base, I-DLM (ISD) and R-ISD: per-benchmark scores, a
Markdown table, a bar chart and per-sample JSONL logs. A killed run resumes without
redoing finished samples.
"""

from idlm.stage import exit_process, stage_main

if __name__ == "__main__":   # runs idlm.stages.evaluate.run once the config is valid
    exit_process(stage_main("evaluate", __doc__))
