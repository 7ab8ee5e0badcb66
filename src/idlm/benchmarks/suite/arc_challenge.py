"""ARC-Challenge (AI2 Reasoning Challenge, challenge set): grade-school science, 4-5 options."""

from __future__ import annotations

from typing import Any

from idlm.benchmarks.families import MultipleChoiceBenchmark
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register


@register
class ArcChallenge(MultipleChoiceBenchmark):
    name = "arc_challenge"
    table_order = 1
    title = "ARC-C"
    source = DataSource(hub_id="allenai/ai2_arc", config="ARC-Challenge", split="test",
                        revision="210d026faf9955653af8916fad021475a3f00453")

    def parts(self, row: dict[str, Any], index: int) -> tuple[str, str, list[str], int]:
        labels = [str(label).strip() for label in row["choices"]["label"]]
        # Most keys are letters, a few rows use "1".."4"; the key names a label either way.
        gold = labels.index(str(row["answerKey"]).strip())
        return str(row.get("id", index)), row["question"], list(row["choices"]["text"]), gold
