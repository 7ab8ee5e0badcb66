"""MATH-500: OpenAI's 500-problem subset of MATH; LaTeX answers, scored by math-verify."""

from __future__ import annotations

from typing import Any

from idlm.benchmarks.families import MathBenchmark
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register


@register
class Math500(MathBenchmark):
    name = "math500"
    table_order = 7
    title = "MATH-500"
    source = DataSource(hub_id="HuggingFaceH4/MATH-500", split="test",
                        revision="6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be")

    def parts(self, row: dict[str, Any], index: int) -> tuple[str, str, str]:
        return str(row.get("unique_id", index)), row["problem"], row["answer"]
