"""Scorers shared by benchmarks of one kind: math equivalence (math-verify), GSM8K's
``####`` number, multiple-choice letters. Every scorer reads only the final answer
(the text after ``</think>``) and returns a :class:`Verdict`.
"""

from __future__ import annotations

import threading
from typing import Any

from idlm.benchmarks.answers import (
    extract_choice_letter,
    extract_gsm8k_answer,
    gsm8k_gold,
    last_boxed,
    normalise_number,
    strip_thinking,
)
from idlm.benchmarks.base import Verdict

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


def score_math(output: str, gold: str) -> Verdict:
    """MATH-500 / AIME / MathBench cloze: math-verify on the final answer."""
    final = strip_thinking(output)
    if not final:
        return Verdict(False, None, "no final answer (empty or unterminated thinking)")
    correct, extracted = math_equal(gold, final)
    return Verdict(correct, extracted, f"gold {gold}")


def score_gsm8k(output: str, reference: str) -> Verdict:
    """GSM8K's ``####`` answer (or ``\\boxed{}``/last number) compared as a number;
    a LaTeX answer that is not a plain number goes to math-verify."""
    final = strip_thinking(output)
    gold = gsm8k_gold(reference)
    extracted = extract_gsm8k_answer(final) if final else None
    if extracted is None:
        return Verdict(False, None, f"no number found; gold {gold}")
    number, gold_number = normalise_number(extracted), normalise_number(gold)
    if number is not None and gold_number is not None:
        return Verdict(abs(float(number) - float(gold_number)) < 1e-6, number, f"gold {gold}")
    boxed = last_boxed(final)
    correct, parsed = math_equal(gold, f"\\boxed{{{boxed}}}" if boxed else extracted)
    return Verdict(correct, parsed or extracted, f"gold {gold} (math-verify)")


def score_choice(output: str, gold_letter: str, letters: str) -> Verdict:
    """Multiple choice: the stated option letter against the gold letter."""
    final = strip_thinking(output)
    letter = extract_choice_letter(final, letters) if final else None
    if letter is None:
        return Verdict(False, None, f"no option letter ({letters}) found; gold {gold_letter}")
    return Verdict(letter == gold_letter, letter, f"gold {gold_letter}")
