"""The tiny profile's corpus: seeded, chat-formatted tasks a 1-5 M-parameter model can learn.

Four kinds, mixed by ``prepare.synthetic.mix``: multi-step ``arithmetic`` word problems
with worked solutions ending in ``#### <answer>``, ``multiple_choice`` questions (A-D),
small Python ``code`` functions with unit tests, and ``instruction`` tasks with checkable
constraints. Every item carries its gold ``reference`` and the ``meta`` a scorer needs.

Each split draws from its own seed stream (``random.Random`` seeded with a string, which
is stable across Python versions and platforms), so the same seed gives byte-identical
items; train and held-out prompts never overlap.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

from idlm.data.code_tasks import make_code_item
from idlm.data.instructions import make_instruction_item


class Item(TypedDict):
    id: str
    kind: str
    prompt: str
    response: str
    reference: str
    meta: dict[str, Any]


# A generator returns everything but the id: (prompt, response, reference, meta).
Generated = tuple[str, str, str, dict[str, Any]]
KINDS = ("arithmetic", "multiple_choice", "code", "instruction")

NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Zoe", "Ivan", "Nora", "Omar",
         "Lily", "Raj", "Eva", "Kai", "Ruth", "Leo", "Ines", "Paul", "Yuki")
OBJECTS = ("apples", "pens", "stickers", "marbles", "books", "coins", "cards", "shells",
           "stamps", "cookies", "eggs", "balloons", "pencils", "rocks", "toys", "beads")
CONNECTORS = ("Then", "Next", "After that", "Later")
ADD_VERBS = ("buys {n} more", "finds {n} more", "gets {n} more", "wins {n} more")
SUB_VERBS = ("gives {n} away", "loses {n}", "sells {n}", "uses {n}")
MUL_VERBS = {2: "doubles them", 3: "triples them"}
MAX_OPERAND = 40


# ---------------------------------------------------------------- arithmetic
def _arithmetic_steps(rng: random.Random, count: int, start: int) -> list[tuple[str, int]]:
    """(operator, operand) pairs; x2/x3 only as the first step, never a result below 1."""
    steps: list[tuple[str, int]] = []
    value = start
    for index in range(count):
        if index == 0 and rng.random() < 0.25:
            op, operand = "*", rng.choice((2, 3))
        elif value > 1 and rng.random() < 0.5:
            op, operand = "-", rng.randint(1, min(MAX_OPERAND, value - 1))
        else:
            op, operand = "+", rng.randint(1, MAX_OPERAND)
        value = value * operand if op == "*" else value + operand if op == "+" else value - operand
        steps.append((op, operand))
    return steps


def _step_phrase(rng: random.Random, op: str, operand: int) -> str:
    if op == "*":
        return MUL_VERBS[operand]
    verbs = ADD_VERBS if op == "+" else SUB_VERBS
    return rng.choice(verbs).format(n=operand)


def make_arithmetic_item(rng: random.Random) -> Generated:
    name, objects = rng.choice(NAMES), rng.choice(OBJECTS)
    start = rng.randint(2, MAX_OPERAND)
    steps = _arithmetic_steps(rng, rng.randint(2, 4), start)
    prompt_parts = [f"{name} has {start} {objects}."]
    solution_parts: list[str] = []
    value = start
    for index, (op, operand) in enumerate(steps):
        phrase = _step_phrase(rng, op, operand)
        result = value * operand if op == "*" else value + operand if op == "+" else value - operand
        equation = f"{value}{op}{operand}={result}"
        if index == 0:
            prompt_parts.append(f"Then {name} {phrase}.")
            solution_parts.append(f"{name} has {start} {objects} and {phrase}, so {equation}.")
        else:
            connector = rng.choice(CONNECTORS)
            prompt_parts.append(f"{connector} {name} {phrase}.")
            solution_parts.append(f"{connector} {name} {phrase}, so {equation}.")
        value = result
    prompt_parts.append(f"How many {objects} does {name} have?")
    solution_parts.append(f"#### {value}")
    meta = {"answer": value, "steps": len(steps)}
    return " ".join(prompt_parts), " ".join(solution_parts), str(value), meta


# ---------------------------------------------------------------- multiple choice
LETTERS = ("A", "B", "C", "D")


def _distinct_numbers(rng: random.Random, count: int, low: int, high: int,
                      keep: Callable[[int], bool] = lambda _: True) -> list[int]:
    return rng.sample([n for n in range(low, high + 1) if keep(n)], count)


# Worked solutions name each option as "letter. value" while checking it, so the answer
# letter is always copied from the last option named. Stating only the value ("the
# largest is 98. That is option D.") left the letter to a two-hop lookup (find the
# digits in the prompt, read the letter four tokens before them) that the tiny base
# never learned: it got the value right and answered "D" for nearly every item.
def _labelled(options: list[int], index: int) -> str:
    return f"{LETTERS[index]}. {options[index]}"


def _mc_extreme(rng: random.Random, largest: bool) -> tuple[str, list[int], int, str]:
    options = _distinct_numbers(rng, 4, 1, 99)
    word, comparison = ("largest", "larger") if largest else ("smallest", "smaller")
    best = 0
    steps = [f"Start with {_labelled(options, 0)}."]
    for index in range(1, len(options)):
        better = options[index] > options[best] if largest else options[index] < options[best]
        if better:
            best = index
            steps.append(f"{_labelled(options, index)} is {comparison}, take it.")
        else:
            steps.append(f"{_labelled(options, index)} is not {comparison}, keep "
                         f"{_labelled(options, best)}.")
    steps.append(f"The {word} is {_labelled(options, best)}.")
    return f"Which number is the {word}?", options, options[best], " ".join(steps)


def _first_match(options: list[int], answer: int, describe: Callable[[int], str]) -> str:
    """Check the options in order and stop at the answer (each named as 'letter. value')."""
    steps = []
    for index, value in enumerate(options):
        steps.append(f"{_labelled(options, index)} {describe(value)}.")
        if value == answer:
            break
    return " ".join(steps)


def _mc_parity(rng: random.Random, even: bool) -> tuple[str, list[int], int, str]:
    others = _distinct_numbers(rng, 3, 1, 99, lambda n: n % 2 == (1 if even else 0))
    answer = _distinct_numbers(rng, 1, 1, 99, lambda n: n % 2 == (0 if even else 1))[0]
    options = others + [answer]
    rng.shuffle(options)
    word = "even" if even else "odd"
    reasoning = _first_match(options, answer,
                             lambda n: "is even" if n % 2 == 0 else "is odd")
    return f"Which number is {word}?", options, answer, reasoning


def _mc_sum_or_difference(rng: random.Random, add: bool) -> tuple[str, list[int], int, str]:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    if not add and a < b:
        a, b = b, a
    answer = a + b if add else a - b
    offsets = rng.sample((-10, -2, -1, 1, 2, 10), 3)
    options = [answer] + [answer + off for off in offsets if answer + off >= 0]
    while len(options) < 4:  # a negative distractor was dropped: use a larger one instead
        options.append(max(options) + rng.randint(1, 5))
    rng.shuffle(options)
    op = "+" if add else "-"
    checks = _first_match(options, answer,
                          lambda n: f"is {answer}" if n == answer else f"is not {answer}")
    return f"What is {a}{op}{b}?", options, answer, f"{a}{op}{b}={answer}. {checks}"


def make_multiple_choice_item(rng: random.Random) -> Generated:
    question_type = rng.choice(("largest", "smallest", "even", "odd", "sum", "difference"))
    if question_type in ("largest", "smallest"):
        question, options, answer, reasoning = _mc_extreme(rng, question_type == "largest")
    elif question_type in ("even", "odd"):
        question, options, answer, reasoning = _mc_parity(rng, question_type == "even")
    else:
        question, options, answer, reasoning = _mc_sum_or_difference(rng, question_type == "sum")
    letter = LETTERS[options.index(answer)]
    lines = [question] + [f"{label}. {value}"
                          for label, value in zip(LETTERS, options, strict=True)]
    prompt = "\n".join(lines) + "\nAnswer with A, B, C or D."
    response = f"{reasoning} Answer: {letter}"
    meta = {"question_type": question_type,
            "options": dict(zip(LETTERS, (str(v) for v in options), strict=True)),
            "answer": letter}
    return prompt, response, letter, meta


# ---------------------------------------------------------------- mixing and splits
GENERATORS: dict[str, Callable[[random.Random], Generated]] = {
    "arithmetic": make_arithmetic_item,
    "multiple_choice": make_multiple_choice_item,
    "code": make_code_item,
    "instruction": make_instruction_item,
}


def kind_counts(total: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Exact per-kind counts summing to ``total`` (largest remainder), so sizes never drift."""
    weights = {kind: float(w) for kind, w in mix.items() if w > 0}
    unknown = sorted(set(weights) - set(GENERATORS))
    if unknown or not weights:
        raise ValueError(f"synthetic mix needs positive weights for {KINDS}, got {dict(mix)}")
    norm = sum(weights.values())
    exact = {kind: total * w / norm for kind, w in weights.items()}
    counts = {kind: int(value) for kind, value in exact.items()}
    by_remainder = sorted(exact, key=lambda kind: (counts[kind] - exact[kind], kind))
    for kind in by_remainder[: total - sum(counts.values())]:
        counts[kind] += 1
    return counts


def _stream(seed: int, split: str) -> random.Random:
    return random.Random(f"idlm-synthetic/{split}/{seed}")


def generate_items(size: int, mix: Mapping[str, float], seed: int, split: str,
                   exclude_prompts: frozenset[str] = frozenset(), unique: bool = False,
                   progress: bool = False) -> list[Item]:
    """``size`` items of the mixed kinds.

    Prompts in ``exclude_prompts`` are redrawn; ``unique`` also redraws repeats within the
    split (held-out sets). Train keeps repeats: they are rare and cost nothing.
    """
    from tqdm import tqdm

    rng = _stream(seed, split)
    kinds = [kind for kind, n in kind_counts(size, mix).items() for _ in range(n)]
    rng.shuffle(kinds)
    items: list[Item] = []
    seen = set(exclude_prompts)
    for index, kind in enumerate(tqdm(kinds, desc=f"generate {split}", disable=not progress,
                                      mininterval=1.0, unit="item")):
        for _attempt in range(1000):
            prompt, response, reference, meta = GENERATORS[kind](rng)
            if prompt not in seen:
                break
        else:
            raise RuntimeError(f"could not draw a new {kind} prompt for split '{split}'")
        if unique:
            seen.add(prompt)
        items.append(Item(id=f"{split}-{index:06d}", kind=kind, prompt=prompt,
                          response=response, reference=reference, meta=meta))
    return items


def generate_splits(train_size: int, eval_size: int, mix: Mapping[str, float], seed: int,
                    progress: bool = False, eval_mix: Mapping[str, float] | None = None
                    ) -> tuple[list[Item], list[Item]]:
    """Train items (``mix``) and held-out eval items (``eval_mix``, default ``mix``); no
    eval prompt ever occurs in train.

    The eval set is drawn first (unique prompts), and train redraws any prompt in it:
    that keeps the eval set an unbiased sample of its mix even for task types with few
    distinct prompts, which excluding train prompts from eval would silently drop.
    """
    held_out = generate_items(eval_size, eval_mix or mix, seed, "eval", unique=True,
                              progress=progress)
    eval_prompts = frozenset(item["prompt"] for item in held_out)
    train = generate_items(train_size, mix, seed, "train", exclude_prompts=eval_prompts,
                           progress=progress)
    return train, held_out


def to_messages(item: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": item["prompt"]},
            {"role": "assistant", "content": item["response"]}]
