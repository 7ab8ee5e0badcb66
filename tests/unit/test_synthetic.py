"""The tiny corpus: deterministic, correct references, disjoint held-out prompts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from idlm.config import SyntheticData
from idlm.data.instructions import satisfies_constraint
from idlm.data.synthetic import Item, generate_splits, kind_counts

MIX = SyntheticData().mix


@pytest.fixture(scope="module")
def splits() -> tuple[list[Item], list[Item]]:
    return generate_splits(4000, 400, MIX, seed=0)


def of_kind(items: list[Item], kind: str) -> list[Item]:
    chosen = [item for item in items if item["kind"] == kind]
    assert chosen, f"no {kind} items"
    return chosen


def test_same_seed_gives_identical_bytes_and_other_seeds_differ() -> None:
    first = json.dumps(generate_splits(500, 50, MIX, seed=3), sort_keys=True)
    again = json.dumps(generate_splits(500, 50, MIX, seed=3), sort_keys=True)
    other = json.dumps(generate_splits(500, 50, MIX, seed=4), sort_keys=True)
    assert first == again
    assert first != other


def test_mix_gives_exact_counts(splits: tuple[list[Item], list[Item]]) -> None:
    train, held_out = splits
    assert Counter(item["kind"] for item in train) == {
        "arithmetic": 2200, "multiple_choice": 600, "code": 600, "instruction": 600}
    assert kind_counts(7, {"arithmetic": 1, "code": 1}) == {"arithmetic": 4, "code": 3}
    assert len(held_out) == 400
    assert [item["id"] for item in train[:2]] == ["train-000000", "train-000001"]
    with pytest.raises(ValueError, match="positive weights"):
        kind_counts(10, {"poetry": 1.0})


def test_held_out_prompts_are_unique_and_never_in_train(
        splits: tuple[list[Item], list[Item]]) -> None:
    train, held_out = splits
    eval_prompts = [item["prompt"] for item in held_out]
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert not set(eval_prompts) & {item["prompt"] for item in train}
    assert set(Counter(item["kind"] for item in held_out)) == set(MIX)


def test_eval_mix_draws_the_held_out_set_and_train_follows_mix() -> None:
    """Training's shares can change while the held-out items stay byte-identical."""
    shifted = {"arithmetic": 0.4, "multiple_choice": 0.3, "code": 0.1, "instruction": 0.2}
    train, held_out = generate_splits(500, 40, shifted, seed=0, eval_mix=MIX)
    assert json.dumps(held_out) == json.dumps(generate_splits(500, 40, MIX, seed=0)[1])
    assert Counter(item["kind"] for item in train) == {
        "arithmetic": 200, "multiple_choice": 150, "code": 50, "instruction": 100}
    assert not {item["prompt"] for item in held_out} & {item["prompt"] for item in train}


ADD = re.compile(r"(?:buys|finds|gets|wins) (\d+) more")
SUB = re.compile(r"(?:gives (\d+) away|loses (\d+)|sells (\d+)|uses (\d+))")


def solve_from_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """Independent reading of the word problem: start value, then (op, operand) per sentence."""
    sentences = prompt.split(". ")
    value = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    steps: list[tuple[str, int]] = []
    for sentence in sentences[1:-1] + [sentences[-1].split("?")[0]]:
        if "doubles" in sentence or "triples" in sentence:
            steps.append(("*", 2 if "doubles" in sentence else 3))
        elif match := ADD.search(sentence):
            steps.append(("+", int(match.group(1))))
        elif match := SUB.search(sentence):
            steps.append(("-", int(next(g for g in match.groups() if g))))
    for op, operand in steps:
        value = value * operand if op == "*" else value + operand if op == "+" else value - operand
    return value, steps


def test_every_arithmetic_answer_is_correct(splits: tuple[list[Item], list[Item]]) -> None:
    for item in of_kind(splits[0] + splits[1], "arithmetic"):
        answer, steps = solve_from_prompt(item["prompt"])
        assert 2 <= len(steps) <= 4, item
        assert all(op != "*" for op, _ in steps[1:]), item
        assert all(operand <= 40 for _, operand in steps), item
        assert item["reference"] == str(answer) == str(item["meta"]["answer"]), item
        assert item["response"].endswith(f"#### {answer}"), item
        equations = re.findall(r"(\d+)([+*-])(\d+)=(\d+)", item["response"])
        assert len(equations) == len(steps), item
        for left, op, right, result in equations:
            value = eval(f"{left}{op}{right}")  # our own digits-and-operator strings
            assert value == int(result) > 0, item


def correct_option(item: Item) -> int:
    options = [int(v) for v in item["meta"]["options"].values()]
    question = item["prompt"].splitlines()[0]
    if "largest" in question:
        return max(options)
    if "smallest" in question:
        return min(options)
    if "even" in question or "odd" in question:
        parity = 0 if "even" in question else 1
        (only,) = [v for v in options if v % 2 == parity]
        return only
    left, op, right = re.match(r"What is (\d+)([+-])(\d+)\?", question).groups()
    return int(left) + int(right) if op == "+" else int(left) - int(right)


def test_every_multiple_choice_letter_is_right(splits: tuple[list[Item], list[Item]]) -> None:
    for item in of_kind(splits[0] + splits[1], "multiple_choice"):
        options = item["meta"]["options"]
        assert list(options) == ["A", "B", "C", "D"]
        assert len(set(options.values())) == 4, item
        letter = item["reference"]
        assert int(options[letter]) == correct_option(item), item
        assert item["response"].endswith(f"Answer: {letter}")
        assert all(f"\n{k}. {v}" in item["prompt"] for k, v in options.items())


CHECK_CODE = """
import json, sys
items = json.load(sys.stdin)
failures = []
for item in items:
    namespace = {}
    exec(item["source"], namespace)
    for test in item["tests"]:
        try:
            exec(test, namespace)
        except AssertionError:
            failures.append(test)
    broken = {}
    exec(f"def {item['entry_point']}(*args):\\n    return None\\n", broken)
    if all(_passes(t, broken) for t in item["tests"]):
        failures.append("tests accept a wrong solution: " + item["source"])
print(json.dumps(failures))
"""
PASSES = """
def _passes(test, namespace):
    try:
        exec(test, namespace)
        return True
    except AssertionError:
        return False
"""


def test_every_code_reference_passes_its_tests_in_a_fresh_interpreter(
        splits: tuple[list[Item], list[Item]]) -> None:
    items = of_kind(splits[0] + splits[1], "code")
    payload = [{"source": item["reference"], "tests": item["meta"]["tests"],
                "entry_point": item["meta"]["entry_point"]} for item in items]
    for item in items:
        assert 2 <= len(item["meta"]["tests"]) <= 3
        assert item["response"] == f"```python\n{item['reference']}```"
        assert item["reference"].startswith(f"def {item['meta']['entry_point']}(")
    done = subprocess.run([sys.executable, "-c", PASSES + CHECK_CODE], input=json.dumps(payload),
                          capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == []


def test_every_instruction_reference_satisfies_its_constraint(
        splits: tuple[list[Item], list[Item]]) -> None:
    items = of_kind(splits[0] + splits[1], "instruction")
    assert len({item["meta"]["constraint"] for item in items}) == 7
    for item in items:
        assert satisfies_constraint(item["meta"], item["reference"]), item
        assert item["response"] == item["reference"]
        assert not satisfies_constraint(item["meta"], item["reference"] + " extra"), item


@pytest.mark.parametrize(("meta", "text", "expected"), [
    ({"constraint": "repeat_word", "word": "go", "count": 3}, "go go go", True),
    ({"constraint": "repeat_word", "word": "go", "count": 3}, "go go", False),
    ({"constraint": "reverse_list", "items": ["1", "2", "3"]}, "3, 2, 1", True),
    ({"constraint": "sort_words", "items": ["pear", "fig"]}, "pear, fig", False),
    ({"constraint": "uppercase", "text": "the cat."}, "THE CAT.", True),
    ({"constraint": "uppercase", "text": "the cat."}, "The CAT.", False),
    ({"constraint": "list_items", "count": 2, "category": "fruits",
      "allowed": ["apple", "pear"]}, "pear, apple", True),
    ({"constraint": "list_items", "count": 2, "category": "fruits",
      "allowed": ["apple", "pear"]}, "pear, pear", False),
    ({"constraint": "count_words", "count": 4}, "4", True),
])
def test_constraint_checker(meta: dict, text: str, expected: bool) -> None:
    assert satisfies_constraint(meta, text) is expected


def test_responses_stay_short(splits: tuple[list[Item], list[Item]]) -> None:
    lengths = [len(item["prompt"]) + len(item["response"]) for item in splits[0]]
    assert max(lengths) < 600  # characters; ~150 tokens with the trained BPE
    mean_response = sum(len(item["response"]) for item in splits[0]) / len(splits[0])
    assert 50 < mean_response < 250
