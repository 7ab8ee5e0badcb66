"""LiveCodeBench code generation, ``release_v6`` (problems May 2023 - Apr 2025).

Problems are stdin/stdout programs (AtCoder, Codeforces) or LeetCode ``class Solution``
methods. The lite release's raw JSONL files are fetched from the hub and pinned by their
sha256; private tests stay encoded in memory until a candidate is scored.
"""

from __future__ import annotations

import json
from typing import Any

from idlm.benchmarks.base import Sample, Verdict
from idlm.benchmarks.code_scoring import decode_lcb_tests, final_code, score_lcb
from idlm.benchmarks.families import CodeBenchmark
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import register

SYSTEM = ("You are an expert Python programmer. You will be given a question (problem "
          "specification) and will generate a correct Python program that matches the "
          "specification and passes all tests.")
WITH_STARTER = ("### Format: You will use the following starter code to write the solution to "
                "the problem and enclose your code within delimiters.\n```python\n{starter}\n```")
STDIN_FORMAT = ("### Format: Read the inputs from stdin, solve the problem and write the answer "
                "to stdout (do not directly test on the sample inputs). Enclose your code "
                "within delimiters as follows.\n```python\n# YOUR CODE HERE\n```")
FILES = ("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl",
         "test6.jsonl")
SHA256 = (
    ("test.jsonl", "2bd02b38beb48e8c46b5b9987095d999ff38cd8efc255ea5d58974317c48f63f"),
    ("test2.jsonl", "095df7c5daf15f882c51a9deb84085cff1e073495a5dbcf95015a564d485f3a3"),
    ("test3.jsonl", "28ed26cc83363ce3f1fe2d5fad9f8393077beb1907b167a31bd3b32f80801b79"),
    ("test4.jsonl", "d711138ddaebfcf5f8ec6a4283ee677298c0f5c5d374a235af92aaf0584510da"),
    ("test5.jsonl", "7f77571c2a6df0c2a72a3277650309f67e01e0008e18117e624633df53f81214"),
    ("test6.jsonl", "bb4c364f71921c4495a6ad15abe1a927350b720009f4933e2e71f8af0f6fd1f5"),
)


def lcb_prompt(row: dict[str, Any]) -> str:
    starter = (row.get("starter_code") or "").strip()
    fmt = WITH_STARTER.format(starter=starter) if starter else STDIN_FORMAT
    return (f"### Question:\n{row['question_content'].strip()}\n\n{fmt}\n\n"
            "### Answer: (use the provided format with backticks)\n")


@register
class LiveCodeBenchV6(CodeBenchmark):
    name = "livecodebench_v6"
    table_order = 13
    title = "LCB-v6"
    source = DataSource(hub_id="livecodebench/code_generation_lite", split="test",
                        files=FILES, sha256=SHA256)

    def to_sample(self, row: dict[str, Any], index: int) -> Sample | None:
        metadata = row.get("metadata") or "{}"
        metadata = json.loads(metadata) if isinstance(metadata, str) else dict(metadata)
        meta = {"public": row["public_test_cases"], "private": row.get("private_test_cases"),
                "func_name": metadata.get("func_name"), "platform": row.get("platform"),
                "difficulty": row.get("difficulty"), "contest_date": row.get("contest_date")}
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": lcb_prompt(row)}]
        return Sample(str(row.get("question_id", index)), messages, None, meta)

    def score(self, output: str, sample: Sample) -> Verdict:
        meta = sample.meta
        cases = decode_lcb_tests(meta["public"])
        if meta.get("private"):
            cases = cases + decode_lcb_tests(meta["private"])
        return score_lcb(final_code(output), cases, meta.get("func_name"), self.sandbox)
