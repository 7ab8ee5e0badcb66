"""MBPP: 500 crowd-sourced Python tasks (``full`` test split), each with three asserts.

The prompt shows the asserts so the model knows the function name and signature; the
``sanitized`` config (``prompt``/``test_imports`` columns) reads the same way.
"""

from __future__ import annotations

import re
from typing import Any

from idlm.benchmarks.base import Sample, Verdict, user_message
from idlm.benchmarks.code_scoring import assert_program, final_code, run_test_program
from idlm.benchmarks.families import CodeBenchmark
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register

PROMPT = ("You are an expert Python programmer, and here is your task: {text} Your code "
          "should pass these tests:\n\n{tests}\n\nWrite the solution in a ```python code block.")


def tested_function(test: str) -> str | None:
    """The function an assert calls first (``assert foo(1) == 2`` -> ``foo``)."""
    match = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\(\s*|set\(\s*)?"
                      r"([A-Za-z_]\w*)\s*\(", test)
    return match.group(1) if match else None


@register
class Mbpp(CodeBenchmark):
    name = "mbpp"
    table_order = 12
    title = "MBPP"
    source = DataSource(hub_id="google-research-datasets/mbpp", config="full", split="test",
                        revision="4bb6404fdc6cacfda99d4ac4205087b89d32030c")

    def to_sample(self, row: dict[str, Any], index: int) -> Sample | None:
        tests = list(row["test_list"])
        text = row.get("text") or row["prompt"]
        meta = {"tests": tests, "setup": row.get("test_setup_code") or "",
                "imports": list(row.get("test_imports") or []),
                "entry_point": tested_function(tests[0]) if tests else None}
        prompt = PROMPT.format(text=text.strip(), tests="\n".join(tests))
        return Sample(f"mbpp/{row.get('task_id', index)}", user_message(prompt),
                      row.get("code", ""), meta)

    def score(self, output: str, sample: Sample) -> Verdict:
        meta = sample.meta
        answer = final_code(output, meta.get("entry_point"))
        program = assert_program(answer.code, meta["tests"], meta.get("setup", ""),
                                 meta.get("imports"))
        return run_test_program(program, answer, self.sandbox)
