"""AIME 2025 (I and II): 30 competition problems, integer answers 0-999."""

from __future__ import annotations

from typing import Any

from idlm.benchmarks.families import IntegerAnswerBenchmark
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register


@register
class Aime25(IntegerAnswerBenchmark):
    name = "aime25"
    table_order = 10
    title = "AIME-25"
    source = DataSource(hub_id="math-ai/aime25", split="test",
                        revision="563bb8404243c5f09de6ec262f2db674fe5bce9b")

    def parts(self, row: dict[str, Any], index: int) -> tuple[str, str, str]:
        return f"aime25/{row.get('id', index)}", row["problem"], str(row["answer"])
