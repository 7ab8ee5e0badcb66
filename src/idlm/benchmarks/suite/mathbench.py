"""MathBench (OpenCompass, v1): arithmetic to college level; the English cloze and single-
choice subsets. Cloze answers are scored by math-verify, single choice by the stated letter
(plain accuracy; OpenCompass's CircularEval rotations are not applied).
"""

from __future__ import annotations

from typing import Any

from idlm.benchmarks.base import Sample, Verdict, user_message
from idlm.benchmarks.families import LETTERS, MATH_SUFFIX, MathBenchmark, choice_prompt
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register
from idlm.benchmarks.scoring import score_choice, score_math


@register
class MathBench(MathBenchmark):
    name = "mathbench"
    table_order = 8
    title = "MathBench"
    source = DataSource(url="http://opencompass.oss-cn-shanghai.aliyuncs.com/datasets/data/"
                            "mathbench_v1.zip",
                        md5="50257a910ca43d1f61a610a79fdb16b5", archive_root="mathbench_v1")

    def to_sample(self, row: dict[str, Any], index: int) -> Sample | None:
        subset = row.get("_file", "")
        if subset and not subset.removesuffix(".jsonl").endswith("_en"):
            return None  # the Chinese subsets are not part of the suite
        sample_id = f"{subset.removesuffix('.jsonl') or 'mathbench'}/{index}"
        options = row.get("options")
        if options:
            letters = LETTERS[:len(options)]
            return Sample(sample_id, user_message(choice_prompt(row["question"], options)),
                          str(row["answer"]).strip(), {"format": "single_choice",
                                                       "letters": letters,
                                                       "options": list(options)})
        prompt = f"{row['question'].strip()}\n{MATH_SUFFIX}"
        return Sample(sample_id, user_message(prompt), str(row["answer"]).strip(),
                      {"format": "cloze"})

    def score(self, output: str, sample: Sample) -> Verdict:
        if sample.meta.get("format") == "single_choice":
            return score_choice(output, str(sample.reference), sample.meta["letters"],
                                sample.meta.get("options"))
        return score_math(output, str(sample.reference))

    def sample_from_reference(self, reference: Any, meta: dict[str, Any] | None = None
                              ) -> Sample:
        """A single letter is taken as a single-choice answer, anything else as cloze."""
        meta = dict(meta or {})
        if "format" not in meta:
            is_letter = isinstance(reference, str) and reference.strip() in LETTERS[:10]
            meta["format"] = "single_choice" if is_letter else "cloze"
        meta.setdefault("letters", LETTERS[:4])
        return Sample("cli", [], reference, meta)
