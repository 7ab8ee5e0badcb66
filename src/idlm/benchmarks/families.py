"""Shared shapes of benchmarks: multiple choice, boxed math, GSM8K-style numbers, code.

A benchmark module subclasses one of these and only says how its rows read.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from idlm.benchmarks.base import Benchmark, Sample, Verdict, user_message
from idlm.benchmarks.scoring import score_choice, score_gsm8k, score_math, score_number

LETTERS = "ABCDEFGHIJKLMNOP"
# The paper's eval_math500.py suffix (thinking on; math-verify scores the \boxed{} answer).
MATH_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


def choice_prompt(question: str, options: list[str]) -> str:
    """Zero-shot chat prompt asking for the reasoning, then ``Answer: X`` on the last line."""
    letters = LETTERS[:len(options)]
    listed = "\n".join(f"{letter}) {option}" for letter, option in zip(letters, options,
                                                                           strict=True))
    return ("Answer the following multiple choice question. The last line of your response "
            f"must be of the form 'Answer: LETTER' (without quotes), where LETTER is one of "
            f"{', '.join(letters)}. Think step by step before answering.\n\n"
            f"{question.strip()}\n\n{listed}")


def seeded_shuffle(items: list[Any], key: str) -> list[Any]:
    """A fixed permutation per ``key`` (stable across runs, machines and Python versions)."""
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16)
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return shuffled


class MultipleChoiceBenchmark(Benchmark):
    """Rows -> (id, question, options, gold index); scored by the stated option letter."""

    category = "multiple_choice"

    def parts(self, row: dict[str, Any], index: int) -> tuple[str, str, list[str], int]:
        raise NotImplementedError

    def to_sample(self, row: dict[str, Any], index: int) -> Sample | None:
        sample_id, question, options, gold = self.parts(row, index)
        letters = LETTERS[:len(options)]
        return Sample(sample_id, user_message(choice_prompt(question, options)), letters[gold],
                      {"letters": letters, "options": options})

    def score(self, output: str, sample: Sample) -> Verdict:
        return score_choice(output, str(sample.reference).strip(),
                            sample.meta.get("letters", LETTERS[:10]), sample.meta.get("options"))


class MathBenchmark(Benchmark):
    """Rows -> (id, problem, answer); the prompt asks for ``\\boxed{}``; math-verify scores."""

    category = "math"

    def parts(self, row: dict[str, Any], index: int) -> tuple[str, str, str]:
        raise NotImplementedError

    def to_sample(self, row: dict[str, Any], index: int) -> Sample | None:
        sample_id, problem, answer = self.parts(row, index)
        return Sample(sample_id, user_message(f"{problem.strip()}\n{MATH_SUFFIX}"),
                      str(answer).strip())

    def score(self, output: str, sample: Sample) -> Verdict:
        return score_math(output, str(sample.reference))


class NumberAnswerBenchmark(MathBenchmark):
    """GSM8K-style: a number after ``####`` (or boxed / last), compared as a number."""

    def score(self, output: str, sample: Sample) -> Verdict:
        return score_gsm8k(output, str(sample.reference))


class IntegerAnswerBenchmark(MathBenchmark):
    """AIME-style: the prompt asks for ``\\boxed{}``; the answer is an integer 0-999, so
    ``\\boxed{033}``, ``033`` and ``33`` are the same answer."""

    def score(self, output: str, sample: Sample) -> Verdict:
        return score_number(output, str(sample.reference))


class CodeBenchmark(Benchmark):
    """Code is run in the sandbox with ``self.sandbox``'s limits."""

    category = "code"
