"""Answer extraction: the formats that trip scorers, pinned to exact extracted values."""

from __future__ import annotations

import pytest

from idlm.benchmarks.answers import extract_code, last_boxed, normalise_number, strip_thinking
from idlm.benchmarks.choice_answers import extract_choice
from idlm.benchmarks.number_answers import extract_number


@pytest.mark.parametrize(("output", "final"), [
    ("<think>\nit is 5\n</think>\n\nThe answer is 6.", "The answer is 6."),
    ("<think>a</think>x</think>y", "y"),
    ("<think>still thinking about 5", ""),
    ("no thinking at all", "no thinking at all"),
])
def test_strip_thinking(output: str, final: str) -> None:
    assert strip_thinking(output) == final


@pytest.mark.parametrize(("text", "inner"), [
    ("so $\\boxed{\\frac{1}{2}}$ and done", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\dfrac{3}{4}\\text{ cm}}", "\\dfrac{3}{4}\\text{ cm}"),
    ("\\fbox{42}", "42"),
    ("\\boxed 7", "7"),
    ("no box", None),
])
def test_last_boxed(text: str, inner: str | None) -> None:
    assert last_boxed(text) == inner


@pytest.mark.parametrize(("text", "letter"), [
    ("Answer: C", "C"),
    ("Option A looks right, but B is wrong and A fails too.\nAnswer: D", "D"),
    ("I first thought (A). The correct answer is (B) because ...", "B"),
    ("**Answer:** \\boxed{C}", "C"),
    ("Final: $\\boxed{\\text{B}}$", "B"),
    ("(C)", "C"),
    ("Reasoning...\nC) 42", "C"),
    ("Answer: Because A and B are false, it must be the last one.", None),
    ("A is wrong, B is wrong.", None),
    ("answer: j", None),
])
def test_choice_letter(text: str, letter: str | None) -> None:
    assert extract_choice(text, "ABCDEFGHIJ").value == letter


def test_choice_letter_outside_the_option_range_is_not_an_answer() -> None:
    assert extract_choice("Answer: E", "ABCD").value is None


@pytest.mark.parametrize(("text", "answer"), [
    ("48/2 = 24. 48+24 = 72\n#### 72", "72"),
    ("so #### 1,234", "1234"),
    ("She made $\\boxed{2,400}$ dollars", "2400"),
    ("The answer is 18.", "18"),
    ("first 3 then 5 then -7.5", "-7.5"),
    ("nothing numeric", None),
])
def test_gsm8k_extraction(text: str, answer: str | None) -> None:
    assert extract_number(text).value == answer


@pytest.mark.parametrize(("text", "value"), [
    ("1,234", "1234"), ("$18", "18"), ("18.0", "18"), ("0.50", "0.5"),
    ("\\text{72}", "72"), ("x+1", None),
])
def test_normalise_number(text: str, value: str | None) -> None:
    assert normalise_number(text) == value


def test_code_extraction_prefers_the_block_defining_the_entry_point() -> None:
    text = ("Here is a helper:\n```python\ndef helper():\n    pass\n```\nand the solution:\n"
            "```python\ndef solve(x):\n    return x\n```\nUsage:\n```python\nprint(solve(1))\n```")
    assert extract_code(text, "solve") == ("def solve(x):\n    return x\n",
                                           "last fenced block defining solve()")
    assert extract_code(text) == ("print(solve(1))\n", "last fenced Python block")


def test_code_extraction_fallbacks() -> None:
    assert extract_code("```py\nx = 1\n```")[0] == "x = 1\n"
    assert extract_code("```python\ndef f():\n    return 1\n") == ("def f():\n    return 1\n",
                                                                "unclosed fenced block")
    assert extract_code("    return 1\n")[0] == "    return 1\n"
    assert extract_code("```bash\nls\n```\n")[0] == "```bash\nls\n```\n"
    # An untagged block after the tagged solution is usually sample output, not code.
    assert extract_code("```python\nprint(3)\n```\nOutput:\n```\n3\n```")[0] == "print(3)\n"
