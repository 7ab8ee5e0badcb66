"""AIME 2024: 30 competition problems, integer answers 0-999."""

from __future__ import annotations

from typing import Any

from idlm.benchmarks.families import IntegerAnswerBenchmark
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register


@register
class Aime24(IntegerAnswerBenchmark):
    name = "aime24"
    table_order = 9
    title = "AIME-24"
    # The hub split is named "train" but holds the 30 test problems.
    source = DataSource(hub_id="HuggingFaceH4/aime_2024", split="train",
                        revision="2fe88a2f1091d5048c0f36abc874fb997b3dd99a")

    def parts(self, row: dict[str, Any], index: int) -> tuple[str, str, str]:
        return f"aime24/{row.get('id', index)}", row["problem"], str(row["answer"])
