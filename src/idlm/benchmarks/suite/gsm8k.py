"""GSM8K: grade-school math word problems; the gold is the number after ``####``."""

from __future__ import annotations

from typing import Any

from idlm.benchmarks.answers import gsm8k_gold
from idlm.benchmarks.families import NumberAnswerBenchmark
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register


@register
class Gsm8k(NumberAnswerBenchmark):
    name = "gsm8k"
    table_order = 6
    title = "GSM8K"
    source = DataSource(hub_id="openai/gsm8k", config="main", split="test",
                        revision="740312add88f781978c0658806c59bc2815b9866")

    def parts(self, row: dict[str, Any], index: int) -> tuple[str, str, str]:
        return f"gsm8k/{index}", row["question"], gsm8k_gold(row["answer"])
