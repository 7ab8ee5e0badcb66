"""IFEval: 541 prompts with verifiable instructions (word counts, formats, keywords, ...).

Scored with lm-eval's port of Google's checks (offline tokenizers, see ifeval_scoring);
the headline is prompt-level strict accuracy.
"""

from __future__ import annotations

import json
from typing import Any

from idlm.benchmarks.base import Benchmark, Sample, Verdict, user_message
from idlm.benchmarks.ifeval_scoring import ifeval_verdict
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register


@register
class IfEval(Benchmark):
    name = "ifeval"
    table_order = 14
    title = "IFEval"
    category = "instruction"
    # No verified commit recorded here yet: pin with evaluate.overrides.ifeval.revision.
    source = DataSource(hub_id="google/IFEval", split="train")

    def to_sample(self, row: dict[str, Any], index: int) -> Sample | None:
        meta = {"prompt": row["prompt"], "instruction_id_list": list(row["instruction_id_list"]),
                "kwargs": [dict(k or {}) for k in row["kwargs"]]}
        return Sample(f"ifeval/{row.get('key', index)}", user_message(row["prompt"]), None, meta)

    def score(self, output: str, sample: Sample) -> Verdict:
        meta = sample.meta
        return ifeval_verdict(output, meta["prompt"], meta["instruction_id_list"],
                              meta["kwargs"])

    def sample_from_reference(self, reference: Any, meta: dict[str, Any] | None = None
                              ) -> Sample:
        """``reference``: an IFEval row (or its JSON) with instruction_id_list and kwargs."""
        row = json.loads(reference) if isinstance(reference, str) else dict(reference)
        row = {**row, **(meta or {})}
        row.setdefault("prompt", "")
        row.setdefault("kwargs", [{} for _ in row["instruction_id_list"]])
        return self.to_sample(row, 0)
