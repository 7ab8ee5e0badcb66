"""MMLU: 57 subjects, 4 options; ``answer`` is the gold option's index."""

from __future__ import annotations

from typing import Any

from idlm.benchmarks.families import LETTERS, MultipleChoiceBenchmark
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register


@register
class Mmlu(MultipleChoiceBenchmark):
    name = "mmlu"
    table_order = 2
    title = "MMLU"
    source = DataSource(hub_id="cais/mmlu", config="all", split="test",
                        revision="c30699e8356da336a370243923dbaf21066bb9fe")

    def parts(self, row: dict[str, Any], index: int) -> tuple[str, str, list[str], int]:
        answer = row["answer"]
        gold = LETTERS.index(answer) if isinstance(answer, str) else int(answer)
        question = row["question"]
        subject = str(row.get("subject", "")).replace("_", " ")
        if subject:
            question = f"The following is a question about {subject}.\n\n{question}"
        return f"{row.get('subject', 'mmlu')}/{index}", question, list(row["choices"]), gold
