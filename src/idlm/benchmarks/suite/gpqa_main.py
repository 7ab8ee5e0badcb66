"""GPQA (main set): 448 graduate-level science questions; same schema as GPQA-Diamond."""

from __future__ import annotations

from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register
from idlm.benchmarks.suite.gpqa_diamond import GPQA_HUB_ID, GpqaBenchmark


@register
class GpqaMain(GpqaBenchmark):
    name = "gpqa_main"
    table_order = 5
    title = "GPQA"
    source = DataSource(hub_id=GPQA_HUB_ID, config="gpqa_main", split="train")
