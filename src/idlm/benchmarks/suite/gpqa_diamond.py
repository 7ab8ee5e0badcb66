"""GPQA-Diamond: the 198 hardest graduate-level science questions of GPQA (gated dataset).

GPQA stores the correct answer and three distractors in separate columns; options are
shuffled with a fixed permutation per ``Record ID`` so every run and system sees the same
order and the gold letter is not always A.
"""

from __future__ import annotations

from typing import Any

from idlm.benchmarks.families import MultipleChoiceBenchmark, seeded_shuffle
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register

# Gated on the hub and no verified commit recorded here yet: pin it with
# evaluate.overrides.<name>.revision once the dataset is mirrored.
GPQA_HUB_ID = "Idavidrein/gpqa"


class GpqaBenchmark(MultipleChoiceBenchmark):
    def parts(self, row: dict[str, Any], index: int) -> tuple[str, str, list[str], int]:
        record = str(row.get("Record ID") or index)
        correct = row["Correct Answer"].strip()
        options = [correct] + [row[f"Incorrect Answer {n}"].strip() for n in (1, 2, 3)]
        shuffled = seeded_shuffle(options, f"gpqa/{record}")
        return record, row["Question"], shuffled, shuffled.index(correct)


@register
class GpqaDiamond(GpqaBenchmark):
    name = "gpqa_diamond"
    table_order = 4
    title = "GPQA-D"
    source = DataSource(hub_id=GPQA_HUB_ID, config="gpqa_diamond", split="train")
