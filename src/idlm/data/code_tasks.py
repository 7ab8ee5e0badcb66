"""``code`` items: small Python functions, each with 2-3 ``assert`` tests in its metadata.

Expected outputs come from an independent Python ``spec`` of each family, not from the
generated source, so a test that exec's reference + asserts really checks the template.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

ArgKind = Literal["ints", "nonempty_ints", "int", "word"]
ARG_NAMES: dict[ArgKind, tuple[str, ...]] = {
    "ints": ("xs", "nums", "values", "items"),
    "nonempty_ints": ("xs", "nums", "values"),
    "int": ("n", "x", "num"),
    "word": ("s", "text", "word"),
}
WORDS = ("banana", "apple", "level", "python", "river", "moon", "tree", "cat", "hello",
         "window", "sun", "paper", "stone", "music", "garden", "rain")


@dataclass(frozen=True)
class CodeFamily:
    """One kind of function; ``{a}`` is the argument name and ``{k}`` the drawn parameter."""

    names: tuple[str, ...]
    describe: str
    body: str
    spec: Callable[[Any, Any], Any]
    arg_kind: ArgKind
    k_values: tuple[Any, ...] = (0,)


FAMILIES: tuple[CodeFamily, ...] = (
    CodeFamily(("add_k", "add_to_all", "shift_values"),
               "adds {k} to every element of a list",
               "    return [x + {k} for x in {a}]",
               lambda xs, k: [x + k for x in xs], "ints", (1, 2, 3, 4, 5, 7, 10)),
    CodeFamily(("scale", "multiply_all", "times_k"),
               "multiplies every element of a list by {k}",
               "    return [x * {k} for x in {a}]",
               lambda xs, k: [x * k for x in xs], "ints", (2, 3, 4, 5, 10)),
    CodeFamily(("count_above", "count_greater", "num_above"),
               "counts how many elements of a list are greater than {k}",
               "    count = 0\n    for x in {a}:\n        if x > {k}:\n            count += 1\n"
               "    return count",
               lambda xs, k: len([x for x in xs if x > k]), "ints", (3, 5, 8, 10, 12)),
    CodeFamily(("keep_even", "even_only", "filter_even"),
               "returns only the even numbers of a list, in order",
               "    return [x for x in {a} if x % 2 == 0]",
               lambda xs, _k: [x for x in xs if x % 2 == 0], "ints"),
    CodeFamily(("keep_odd", "odd_only", "filter_odd"),
               "returns only the odd numbers of a list, in order",
               "    return [x for x in {a} if x % 2 == 1]",
               lambda xs, _k: [x for x in xs if x % 2 == 1], "ints"),
    CodeFamily(("sum_squares", "square_sum"),
               "returns the sum of the squares of the numbers in a list",
               "    total = 0\n    for x in {a}:\n        total += x * x\n    return total",
               lambda xs, _k: sum(x**2 for x in xs), "ints"),
    CodeFamily(("largest", "find_max", "biggest"),
               "returns the largest element of a non-empty list without using max",
               "    best = {a}[0]\n    for x in {a}:\n        if x > best:\n            best = x\n"
               "    return best",
               lambda xs, _k: max(xs), "nonempty_ints"),
    CodeFamily(("clip", "cap_values", "limit"),
               "replaces every element of a list that is larger than {k} with {k}",
               "    return [min(x, {k}) for x in {a}]",
               lambda xs, k: [x if x <= k else k for x in xs], "ints", (5, 8, 10, 15)),
    CodeFamily(("first_k", "take", "head"),
               "returns the first {k} elements of a list",
               "    return {a}[:{k}]",
               lambda xs, k: list(xs[0:k]), "ints", (1, 2, 3)),
    CodeFamily(("is_divisible", "divides", "is_multiple"),
               "returns True if a number is divisible by {k} and False otherwise",
               "    return {a} % {k} == 0",
               lambda n, k: not n % k, "int", (2, 3, 4, 5, 7)),
    CodeFamily(("repeat", "repeat_text", "echo"),
               "returns a string repeated {k} times",
               "    return {a} * {k}",
               lambda s, k: "".join([s] * k), "word", (2, 3)),
    CodeFamily(("reverse", "backwards", "flip"),
               "returns a string reversed",
               "    return {a}[::-1]",
               lambda s, _k: "".join(reversed(s)), "word"),
    CodeFamily(("count_letter", "letter_count", "occurrences"),
               "counts how many times the letter '{k}' appears in a string",
               "    return {a}.count('{k}')",
               lambda s, k: sum(ch == k for ch in s), "word", ("a", "e", "o", "n", "r")),
)


def _draw_input(rng: random.Random, kind: ArgKind) -> Any:
    if kind == "int":
        return rng.randint(0, 60)
    if kind == "word":
        return rng.choice(WORDS)
    low = 1 if kind == "nonempty_ints" else 0
    return [rng.randint(0, 20) for _ in range(rng.randint(low, 5))]


def make_code_item(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    family = rng.choice(FAMILIES)
    name = rng.choice(family.names)
    arg = rng.choice(ARG_NAMES[family.arg_kind])
    k = rng.choice(family.k_values)
    source = f"def {name}({arg}):\n" + family.body.format(a=arg, k=k) + "\n"
    test_count = rng.randint(2, 3)
    inputs: list[Any] = []
    while len(inputs) < test_count:
        value = _draw_input(rng, family.arg_kind)
        if value not in inputs:
            inputs.append(value)
    calls = [(f"{name}({value!r})", repr(family.spec(value, k))) for value in inputs]
    tests = [f"assert {call} == {result}" for call, result in calls]
    prompt = (f"Write a Python function {name}({arg}) that {family.describe.format(k=k)}. "
              f"For example, {calls[0][0]} returns {calls[0][1]}.")
    response = f"```python\n{source}```"
    meta = {"entry_point": name, "tests": tests}
    return prompt, response, source, meta
