"""The tiny profile's benchmarks: prepare's held-out items (``eval_items.jsonl``) scored by
the real benchmarks' scorers, plus a HumanEval subset.

| benchmark            | items of kind     | scorer (same code as)                  |
|----------------------|-------------------|----------------------------------------|
| tiny_arithmetic      | arithmetic        | GSM8K's ``####`` number                |
| tiny_multiple_choice | multiple_choice   | the MC letter scorer (ARC, MMLU, ...)  |
| tiny_code            | code              | the sandboxed assert runner (MBPP)     |
| tiny_instruction     | instruction       | ``satisfies_constraint`` on the answer |
| tiny_humaneval       | HumanEval 0..19   | HumanEval                              |

Prompts are the items' own user turns, exactly what the tiny model was trained on.
"""

from __future__ import annotations

from typing import Any, ClassVar

from idlm.benchmarks.answers import final_answer_rule, strip_thinking
from idlm.benchmarks.base import Benchmark, Sample, Verdict
from idlm.benchmarks.code_scoring import assert_program, final_code, run_test_program
from idlm.benchmarks.loading import BenchmarkDataError, DataSource
from idlm.benchmarks.registry import register
from idlm.benchmarks.scoring import score_choice, score_gsm8k
from idlm.benchmarks.suite.humaneval import HumanEval

TINY_MAX_NEW_TOKENS = 192
TINY_HUMANEVAL_PROBLEMS = 20


class TinyBenchmark(Benchmark):
    """Items of one ``kind`` from eval_items.jsonl (its path must be given)."""

    kind: ClassVar[str]
    suite = "tiny"
    # What the scorer reads from an item's meta: a row without it cannot be scored (a
    # dataset's code rows carry no unit tests), so it is not a sample.
    meta_keys: ClassVar[tuple[str, ...]] = ()
    source = DataSource(description="the prepare stage's eval_items.jsonl")
    default_max_new_tokens = TINY_MAX_NEW_TOKENS

    def load(self, path: str | None = None, revision: str | None = None,
             limit: int | None = None) -> list[Sample]:
        if path is None:
            raise BenchmarkDataError(
                f"{self.name} reads the prepare stage's eval_items.jsonl: pass its path "
                "(evaluate.overrides.<name>.path, or with_tiny_items)")
        return super().load(path, revision, limit)

    def empty_hint(self) -> str:
        needs = f" with meta {', '.join(self.meta_keys)}" if self.meta_keys else ""
        return (f" of kind '{self.kind}'{needs}: a dataset's rows need a 'kind' column for "
                "the tiny_* benchmarks, or set evaluate.benchmarks to benchmarks of its own")

    def to_sample(self, row: dict[str, Any], index: int) -> Sample | None:
        meta = row.get("meta") or {}
        if row.get("kind") != self.kind or any(key not in meta for key in self.meta_keys):
            return None
        return Sample(row["id"], [dict(m) for m in row["messages"]], row["reference"],
                      dict(row.get("meta") or {}))


@register
class TinyArithmetic(TinyBenchmark):
    name = "tiny_arithmetic"
    table_order = 101
    title = "tiny arithmetic"
    category = "math"
    kind = "arithmetic"

    def score(self, output: str, sample: Sample) -> Verdict:
        return score_gsm8k(output, str(sample.reference))


@register
class TinyMultipleChoice(TinyBenchmark):
    name = "tiny_multiple_choice"
    table_order = 102
    title = "tiny multiple choice"
    category = "multiple_choice"
    kind = "multiple_choice"

    def score(self, output: str, sample: Sample) -> Verdict:
        return score_choice(output, str(sample.reference).strip(), "ABCD",
                            sample.meta.get("options"))


@register
class TinyCode(TinyBenchmark):
    name = "tiny_code"
    table_order = 103
    title = "tiny code"
    category = "code"
    kind = "code"
    meta_keys = ("tests",)

    def score(self, output: str, sample: Sample) -> Verdict:
        answer = final_code(output, sample.meta.get("entry_point"))
        program = assert_program(answer.code, list(sample.meta["tests"]))
        return run_test_program(program, answer, self.sandbox)


@register
class TinyInstruction(TinyBenchmark):
    name = "tiny_instruction"
    table_order = 104
    title = "tiny instruction"
    category = "instruction"
    kind = "instruction"
    meta_keys = ("constraint",)

    def score(self, output: str, sample: Sample) -> Verdict:
        from idlm.data.instructions import satisfies_constraint

        answer = strip_thinking(output)
        followed = satisfies_constraint(sample.meta, answer)
        rule = final_answer_rule(output, answer)
        return Verdict(followed, answer if rule else None,
                       f"constraint {sample.meta['constraint']} on the {rule or 'empty answer'}",
                       rule)


@register
class TinyHumanEval(HumanEval):
    name = "tiny_humaneval"
    suite = "tiny"
    table_order = 105
    title = "tiny HumanEval"
    default_max_new_tokens = TINY_MAX_NEW_TOKENS

    def load(self, path: str | None = None, revision: str | None = None,
             limit: int | None = None) -> list[Sample]:
        return super().load(path, revision, TINY_HUMANEVAL_PROBLEMS if limit is None else limit)
