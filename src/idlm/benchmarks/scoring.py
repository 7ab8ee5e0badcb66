"""Scorers shared by benchmarks of one kind: math equivalence (math-verify), a final
number (GSM8K, AIME), multiple-choice letters. Every scorer reads only the final answer
(the text after ``</think>``) and returns a :class:`Verdict` whose detail says which rule
extracted what, or why nothing could be extracted.
"""

from __future__ import annotations

import threading
from typing import Any

from idlm.benchmarks.answers import (
    THINK_OPEN,
    gsm8k_gold,
    last_boxed,
    normalise_number,
    strip_thinking,
)
from idlm.benchmarks.base import Verdict
from idlm.benchmarks.choice_answers import Options, extract_choice
from idlm.benchmarks.number_answers import extract_number

MATH_TIMEOUT_S = 5


def _timeout() -> int | None:
    # math-verify's timeout uses signal.alarm, which only works in the main thread.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str, gold: bool = False) -> list[Any]:
    """math-verify's parse: LaTeX (``\\boxed{}`` first) and plain expressions."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if gold and "$" not in text and "\\boxed" not in text:
        text = f"${text}$"
    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    try:
        return parse(text, extraction_config=configs, parsing_timeout=_timeout())
    except Exception:  # math-verify raises on timeouts and odd LaTeX; no answer then
        return []


def math_equal(gold: str, answer_text: str) -> tuple[bool, str | None]:
    """Whether ``answer_text`` states a value equal to ``gold`` and what was extracted."""
    from math_verify import verify

    gold_parsed = parse_math(gold, gold=True)
    predicted = parse_math(answer_text)
    extracted = str(predicted[-1]) if predicted else None
    if not gold_parsed or not predicted:
        return False, extracted
    try:
        return bool(verify(gold_parsed, predicted, timeout_seconds=_timeout())), extracted
    except Exception:
        return False, extracted


def _no_final(output: str) -> str:
    return ("unterminated thinking (no </think>)" if THINK_OPEN in output
            else "empty answer")


def score_math(output: str, gold: str) -> Verdict:
    """MATH-500 / MathBench cloze: math-verify on the final answer (its ``\\boxed{}``
    first, else the last expression it can parse)."""
    final = strip_thinking(output)
    if not final.strip():
        return Verdict(False, None, f"nothing extracted: {_no_final(output)}; gold {gold}")
    correct, extracted = math_equal(gold, final)
    if extracted is None:
        return Verdict(False, None, f"nothing extracted: math-verify found no answer; "
                       f"gold {gold}")
    rule = "math-verify on \\boxed{}" if last_boxed(final) is not None else \
        "math-verify on the answer text"
    return Verdict(correct, extracted, f"{rule} -> {extracted}; gold {gold}", rule)


def score_number(output: str, gold: str) -> Verdict:
    """GSM8K / AIME / tiny arithmetic: the stated final number against ``gold`` as numbers
    (``033`` = ``33``, ``2,400`` = ``2400``); a boxed expression that is not a plain number
    (``\\frac{4800}{2}``) goes to math-verify."""
    final = strip_thinking(output)
    if not final.strip():
        return Verdict(False, None, f"nothing extracted: {_no_final(output)}; gold {gold}")
    found = extract_number(final)
    if found.value is None:
        return Verdict(False, None, f"nothing extracted: {found.describe()}; gold {gold}")
    number, gold_number = normalise_number(found.value), normalise_number(gold)
    if number is not None and gold_number is not None:
        return Verdict(abs(float(number) - float(gold_number)) < 1e-6, number,
                       f"{found.describe()}; gold {gold}", found.rule)
    correct, parsed = math_equal(gold, f"\\boxed{{{found.value}}}")
    return Verdict(correct, parsed or found.value,
                   f"{found.describe()} (math-verify -> {parsed}); gold {gold}", found.rule)


def score_gsm8k(output: str, reference: str) -> Verdict:
    """GSM8K: the gold is the number after ``####`` in the reference solution."""
    return score_number(output, gsm8k_gold(reference))


def score_choice(output: str, gold_letter: str, letters: str,
                 options: Options = None) -> Verdict:
    """Multiple choice: the stated option letter against the gold letter."""
    final = strip_thinking(output)
    if not final.strip():
        return Verdict(False, None, f"nothing extracted: {_no_final(output)}; "
                       f"gold {gold_letter}")
    found = extract_choice(final, letters, options)
    if found.value is None:
        return Verdict(False, None, f"nothing extracted: {found.describe()}; "
                       f"gold {gold_letter}")
    return Verdict(found.value == gold_letter, found.value,
                   f"{found.describe()}; gold {gold_letter}", found.rule)
