"""MMLU-Pro: harder, reasoning-heavy MMLU successor with up to 10 options (A-J)."""

from __future__ import annotations

from typing import Any

from idlm.benchmarks.families import MultipleChoiceBenchmark
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register


@register
class MmluPro(MultipleChoiceBenchmark):
    name = "mmlu_pro"
    table_order = 3
    title = "MMLU-Pro"
    source = DataSource(hub_id="TIGER-Lab/MMLU-Pro", split="test",
                        revision="b189ec765aa7ed75c8acfea42df31fdae71f97be")

    def parts(self, row: dict[str, Any], index: int) -> tuple[str, str, list[str], int]:
        question = row["question"]
        if row.get("category"):
            question = f"The following is a question about {row['category']}.\n\n{question}"
        return (str(row.get("question_id", index)), question, list(row["options"]),
                int(row["answer_index"]))
