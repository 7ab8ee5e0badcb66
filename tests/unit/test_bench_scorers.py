"""Every scorer on hand-written right and wrong answers, in the formats that trip scorers:
thinking before ``</think>`` (or never closed), ``\\boxed{}`` with LaTeX fractions and
units, option letters inside explanations, code in markdown fences, shortcut exits.

Samples come from the local fixtures (each in its benchmark's real schema).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from idlm.benchmarks import get_benchmark, sandbox
from idlm.benchmarks.base import Sample
from idlm.config.downstream import EvalSandbox

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"
# These candidates are ours; where namespaces are unavailable (not root) they may run with
# rlimits only, so the scorers are tested everywhere. Containment is test_bench_sandbox's.
SANDBOX = EvalSandbox(timeout_s=1.5, memory_mb=1024, workers=1,
                          allow_unsandboxed=not sandbox.isolation_available())


@pytest.fixture
def tiny_items_path() -> Path:
    """prepare's eval_items.jsonl format, written by the real generator (seed 5)."""
    return FIXTURES / "tiny_eval_items.jsonl"


def sample(name: str, fixture: str, index: int = 0) -> Sample:
    return get_benchmark(name, SANDBOX).load(str(FIXTURES / fixture))[index]


def verdicts(name: str, one: Sample, outputs: list[str]) -> list[bool]:
    bench = get_benchmark(name, SANDBOX)
    return [bench.score(output, one).correct for output in outputs]


HALF_PLUS_QUARTER = [  # gold \frac{3}{4}
    ("<think>Maybe 1/2? No: 2/4 + 1/4.</think>\nSo the sum is $\\boxed{\\dfrac{3}{4}}$.", True),
    ("$\\boxed{0.75}$", True),
    ("The length is \\boxed{\\frac{3}{4}\\text{ cm}}", True),
    ("<think>It is \\boxed{\\frac34}.</think>\nNo, it is $\\boxed{\\frac{1}{2}}$.", False),
    ("<think>I get \\boxed{\\frac{3}{4}} so far", False),
    ("\\boxed{\\frac{4}{3}}", False),
]


@pytest.mark.parametrize(("output", "right"), HALF_PLUS_QUARTER)
def test_math500(output: str, right: bool) -> None:
    assert verdicts("math500", sample("math500", "math500.jsonl", 1), [output]) == [right]


def test_math500_tuple_answer() -> None:
    polar = sample("math500", "math500.jsonl", 0)
    assert verdicts("math500", polar, [
        "\\boxed{(3, \\frac{\\pi}{2})}", "$\\boxed{\\left(3,\\tfrac{\\pi}{2}\\right)}$",
        "\\boxed{(3, \\pi)}", "\\boxed{(\\frac{\\pi}{2}, 3)}"]) == [True, True, False, False]


@pytest.mark.parametrize(("name", "fixture"), [("aime24", "aime24.jsonl"),
                                               ("aime25", "aime25.jsonl")])
def test_aime(name: str, fixture: str) -> None:
    one = sample(name, fixture)
    gold = one.reference
    assert verdicts(name, one, [
        f"\\boxed{{{gold}}}", f"<think>try 1</think>\nThe answer is $\\boxed{{{gold}}}$.",
        f"**Final answer:** $\\boxed{{{gold}\\text{{ minutes}}}}$",
        f"\\boxed{{{int(gold) + 1}}}", f"<think>it is \\boxed{{{gold}}}", "",
    ]) == [True, True, True, False, False, False]


def test_mathbench_cloze_and_single_choice() -> None:
    bench = get_benchmark("mathbench")
    choice, cloze = (sample("mathbench", "mathbench", i) for i in (0, 1))
    assert {choice.meta["format"], cloze.meta["format"]} == {"single_choice", "cloze"}
    if choice.meta["format"] != "single_choice":
        choice, cloze = cloze, choice
    assert [bench.score(o, cloze).correct for o in (
        "12*7 = \\boxed{84}", "<think>7*12</think>$84$", "The result is 84.",
        "\\boxed{74}", "<think>\\boxed{84}", "84 - no, \\boxed{48}")] == [True] * 3 + [False] * 3
    assert [bench.score(o, choice).correct for o in (
        "Answer: B", "Power rule: not A, not C. The answer is (B).", "\\boxed{B}",
        "Answer: A", "<think>Answer: B</think>\nAnswer: C", "2x")] == [True] * 3 + [False] * 3


GSM8K = [
    ("Natalia sold 48/2 = 24 clips in May, so 48+24 = 72 clips.\n#### 72", True),
    ("<think>48 + 24 = 70? no, 72</think>\nShe sold $\\boxed{72}$ clips.", True),
    ("In total: 72 clips. The answer is 72.", True),
    ("<think>#### 72</think>\n#### 71", False),
    ("48 + 24 = 72, minus 2 lost: #### 70", False),
    ("<think>she sold 72", False),
]


@pytest.mark.parametrize(("output", "right"), GSM8K)
def test_gsm8k(output: str, right: bool) -> None:
    assert verdicts("gsm8k", sample("gsm8k", "gsm8k.jsonl"), [output]) == [right]


def test_gsm8k_thousands_separators_and_latex_fractions() -> None:
    shop = sample("gsm8k", "gsm8k.jsonl", 1)  # gold "2,400"
    assert verdicts("gsm8k", shop, [
        "#### 2400", "$\\boxed{\\$2,400}$", "\\boxed{\\frac{4800}{2}}",
        "#### 2,401", "\\boxed{\\frac{1}{2}}", "I cannot tell."]) == [True] * 3 + [False] * 3


CHOICE_OUTPUTS = [  # gold C
    ("Answer: C", True),
    ("<think>A? B?</think>\nOption A is tempting but wrong, and B ignores friction, so the "
     "answer is (C).", True),
    ("**Answer:** $\\boxed{C}$", True),
    ("<think>Answer: C</think>\nAnswer: B", False),
    ("Answer: A\n\nWait, reconsider... Answer: D", False),
    ("The correct option is not A.", False),
]


@pytest.mark.parametrize(("output", "right"), CHOICE_OUTPUTS)
def test_arc_challenge(output: str, right: bool) -> None:
    assert verdicts("arc_challenge", sample("arc_challenge", "arc_challenge.jsonl"),
                    [output]) == [right]


def test_numeric_arc_labels_become_letters() -> None:
    iron = sample("arc_challenge", "arc_challenge.jsonl", 1)  # answerKey "4" -> D
    assert iron.reference == "D"
    assert verdicts("arc_challenge", iron, ["Answer: D", "Answer: 4", "D) an iron nail",
                                            "Answer: A"]) == [True, False, True, False]


def test_mmlu_and_mmlu_pro_letters() -> None:
    assert verdicts("mmlu", sample("mmlu", "mmlu.jsonl"), [
        "Answer: B", "The degree is 4, so the answer is B.", "\\boxed{B}",
        "Answer: C", "B is wrong; answer: A", "4"]) == [True] * 3 + [False] * 3
    assert verdicts("mmlu_pro", sample("mmlu_pro", "mmlu_pro.jsonl"), [
        "Answer: I", "the answer is (I)", "<think>J?</think>\nAnswer: I",
        "Answer: J", "Answer: H", "<think>Answer: I"]) == [True] * 3 + [False] * 3


@pytest.mark.parametrize(("name", "fixture"), [("gpqa_diamond", "gpqa_diamond.csv"),
                                               ("gpqa_main", "gpqa_main.csv")])
def test_gpqa(name: str, fixture: str) -> None:
    one = sample(name, fixture)
    gold = one.reference
    wrong = next(letter for letter in "ABCD" if letter != gold)
    assert verdicts(name, one, [
        f"Answer: {gold}", f"<think>maybe {wrong}</think>\nThe answer is ({gold})",
        f"\\boxed{{{gold}}}", f"Answer: {wrong}", f"<think>Answer: {gold}", "none of them",
    ]) == [True] * 3 + [False] * 3


# ---------------------------------------------------------------- code
TRUNCATE_RIGHT = [
    "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```",
    "    return number - int(number)\n",  # a bare body, appended to the prompt
    "<think>```python\ndef truncate_number(n):\n    return 0\n```</think>\nFinal:\n"
    "```python\ndef truncate_number(number):\n    return number - int(number)\n```",
]
TRUNCATE_WRONG = [
    "```python\ndef truncate_number(number):\n    return int(number)\n```",
    "```python\ndef truncate_number(number)\n    return number % 1\n```",  # syntax error
    "```python\nimport os\nos._exit(0)\n```",  # exits 0 before the tests run
    "```python\ndef truncate_number(number):\n    while True:\n        pass\n```",
]


@pytest.mark.parametrize("name", ["humaneval", "humaneval_plus"])
def test_humaneval_family(name: str) -> None:
    one = sample(name, f"{name}.jsonl")
    assert verdicts(name, one, TRUNCATE_RIGHT + TRUNCATE_WRONG) == [True] * 3 + [False] * 4


def test_humaneval_plus_extra_tests_catch_a_sloppy_answer() -> None:
    sloppy = ("```python\ndef truncate_number(number):\n"
              "    return number % 1.0 if number < 500 else 1.0\n```")
    assert verdicts("humaneval", sample("humaneval", "humaneval.jsonl"), [sloppy]) == [True]
    assert verdicts("humaneval_plus", sample("humaneval_plus", "humaneval_plus.jsonl"),
                    [sloppy]) == [False]


def test_humaneval_keeps_prompt_imports() -> None:
    typed = sample("humaneval", "humaneval.jsonl", 1)
    assert verdicts("humaneval", typed, [
        "```python\ndef total(values: List[int]) -> int:\n    return sum(values)\n```"]) == [True]


def test_mbpp_full_and_sanitized() -> None:
    right = ("```python\ndef remove_Occ(s, ch):\n    i = s.find(ch)\n    if i >= 0:\n"
             "        s = s[:i] + s[i + 1:]\n    j = s.rfind(ch)\n    if j >= 0:\n"
             "        s = s[:j] + s[j + 1:]\n    return s\n```")
    assert verdicts("mbpp", sample("mbpp", "mbpp.jsonl"), [
        right, "<think>draft</think>\n" + right, right.replace("```python", "```py"),
        right.replace("j = s.rfind(ch)", "j = -1"), "```python\ndef remove_occ(s, ch):\n"
        "    return s\n```", "I would use str.replace."]) == [True] * 3 + [False] * 3
    shared = sample("mbpp", "mbpp_sanitized.jsonl")
    assert shared.meta["entry_point"] == "similar_elements"
    assert verdicts("mbpp", shared, [
        "```python\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n```",
        "```python\ndef similar_elements(a, b):\n    return tuple(set(a) | set(b))\n```",
    ]) == [True, False]


def test_livecodebench_stdin_and_functional() -> None:
    stdin_problem = sample("livecodebench_v6", "livecodebench_v6.jsonl", 0)
    assert verdicts("livecodebench_v6", stdin_problem, [
        "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "<think>easy</think>\n```python\nimport sys\na, b = map(int, sys.stdin.buffer.read()"
        ".split())\nsys.stdout.write(f'{a + b}\\n')\n```",
        "```python\nprint(sum(map(int, input().split())))\n```",
        "```python\na, b = map(int, input().split())\nprint(a - b)\n```",
        "```python\nprint(3)\n```",  # passes the public test only
        "```python\nwhile True:\n    pass\n```",
    ]) == [True] * 3 + [False] * 3
    leetcode = sample("livecodebench_v6", "livecodebench_v6.jsonl", 1)
    assert verdicts("livecodebench_v6", leetcode, [
        "```python\nclass Solution:\n    def maxElement(self, nums: List[int]) -> int:\n"
        "        return max(nums)\n```",
        "```python\nclass Solution:\n    def maxElement(self, nums):\n"
        "        return min(nums)\n```",
    ]) == [True, False]


def test_tiny_code(tiny_items_path: Path) -> None:
    bench = get_benchmark("tiny_code", SANDBOX)
    one = bench.load(str(tiny_items_path))[0]
    fenced = f"```python\n{one.reference}```"
    name = one.meta["entry_point"]
    assert verdicts("tiny_code", one, [
        fenced, f"<think>easy</think>\n{fenced}", one.reference,
        f"```python\ndef {name}(*args):\n    return None\n```",
        f"```python\ndef {name}(*args)\n```", "I don't know.",
    ]) == [True] * 3 + [False] * 3


# ---------------------------------------------------------------- instructions
def test_ifeval() -> None:
    row = sample("ifeval", "ifeval.jsonl", 1)  # lowercase, fewer than 4 sentences
    assert verdicts("ifeval", row, [
        "the sky looks blue because air scatters short wavelengths more. that is rayleigh "
        "scattering.",
        "<think>The Sky Is Blue Because Of RAYLEIGH.</think>\nrayleigh scattering makes it "
        "blue.",
        "sunlight scatters off air molecules. blue scatters most.",
        "The sky is blue because of Rayleigh scattering.",
        "one. two. three. four. five sentences here.",
        "<think>the sky is blue.",
    ]) == [True] * 3 + [False] * 3


def test_ifeval_word_count_and_highlights_offline() -> None:
    row = sample("ifeval", "ifeval.jsonl", 0)  # no commas, 3 highlights, 300+ words
    body = " ".join(["word"] * 300)
    good = f"*section one* *section two* *section three* {body}"
    assert verdicts("ifeval", row, [good, good.replace("word word", "word, word", 1),
                                    f"*one* *two* {body}"]) == [True, False, False]


def test_tiny_instruction_and_tiny_formats(tiny_items_path: Path) -> None:
    upper = get_benchmark("tiny_instruction").sample_from_reference(
        "THE CAT SITS.", {"constraint": "uppercase", "text": "the cat sits."})
    assert verdicts("tiny_instruction", upper, [
        "THE CAT SITS.", "<think>caps</think>\nTHE CAT SITS.", "  THE CAT SITS.  ",
        "The cat sits.", "<think>THE CAT SITS.", "THE CAT SAT."]) == [True] * 3 + [False] * 3
    arithmetic = get_benchmark("tiny_arithmetic").load(str(tiny_items_path))[0]
    gold = arithmetic.reference
    assert verdicts("tiny_arithmetic", arithmetic, [
        f"so x. #### {gold}", f"#### {int(gold) + 1}"]) == [True, False]
    choice = get_benchmark("tiny_multiple_choice").load(str(tiny_items_path))[0]
    assert verdicts("tiny_multiple_choice", choice, [
        f"That is option {choice.reference}. Answer: {choice.reference}",
        "Answer: " + next(x for x in "ABCD" if x != choice.reference)]) == [True, False]


def test_only_top_level_prompt_imports_are_kept() -> None:
    from idlm.benchmarks.code_scoring import prompt_imports

    prompt = "from typing import List\nimport math\n\ndef f(x):\n    import os\n    return x\n"
    assert prompt_imports(prompt) == "from typing import List\nimport math"
