"""``instruction`` items: instructions whose constraint a scorer can check exactly.

``meta["constraint"]`` names the rule and the other ``meta`` keys hold its arguments;
:func:`satisfies_constraint` is the one checker, shared by tests and scorers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach",
               "pear", "plum"),
    "colours": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white",
                "brown", "pink"),
    "animals": ("cat", "dog", "horse", "tiger", "lion", "rabbit", "mouse", "eagle", "fox",
                "bear"),
    "tools": ("hammer", "saw", "drill", "wrench", "shovel", "rake", "knife", "ruler",
              "brush", "ladder"),
}
ADJECTIVES = ("small", "old", "happy", "green", "quiet", "tall", "fast", "tired", "bright")
NOUNS = ("cat", "dog", "girl", "boy", "bird", "farmer", "teacher", "child", "robot", "horse")
VERBS = ("sleeps", "waits", "sits", "plays", "runs", "reads", "sings", "hides")
PLACES = ("under the table", "near the river", "in the garden", "on the hill",
          "by the door", "in the park", "behind the house")
REPEAT_WORDS = ("yes", "hello", "blue", "go", "stop", "moon", "ok", "cat", "red", "up")


def _sentence(rng: random.Random) -> str:
    return (f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"{rng.choice(PLACES)}")


def _word_list(rng: random.Random, low: int, high: int) -> list[str]:
    pool = CATEGORIES[rng.choice(sorted(CATEGORIES))]
    return rng.sample(pool, rng.randint(low, high))


def _repeat_word(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    word, count = rng.choice(REPEAT_WORDS), rng.randint(2, 7)
    prompt = f"Repeat the word '{word}' exactly {count} times, separated by spaces."
    return prompt, " ".join([word] * count), {"word": word, "count": count}


def _reverse_list(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    if rng.random() < 0.5:
        items = [str(n) for n in rng.sample(range(1, 60), rng.randint(3, 6))]
    else:
        items = _word_list(rng, 3, 6)
    prompt = f"Reverse the order of this list: {', '.join(items)}."
    return prompt, ", ".join(reversed(items)), {"items": items}


def _sort_words(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    items = _word_list(rng, 3, 5)
    prompt = f"Sort these words alphabetically: {', '.join(items)}."
    return prompt, ", ".join(sorted(items)), {"items": items}


def _uppercase(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    text = _sentence(rng) + "."
    prompt = f"Rewrite this sentence in all capital letters: {text}"
    return prompt, text.upper(), {"text": text}


def _lowercase(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    text = (_sentence(rng) + ".").title()
    prompt = f"Rewrite this sentence using only lowercase letters: {text}"
    return prompt, text.lower(), {"text": text}


def _list_items(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    category = rng.choice(sorted(CATEGORIES))
    count = rng.randint(2, 5)
    prompt = f"List {count} {category}, separated by commas."
    answer = ", ".join(rng.sample(CATEGORIES[category], count))
    return prompt, answer, {"count": count, "category": category,
                            "allowed": list(CATEGORIES[category])}


def _count_words(rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    text = _sentence(rng)
    words = text.split()
    text = " ".join(words[: rng.randint(3, len(words))])
    count = len(text.split())
    prompt = f"How many words are in this text: '{text}'? Answer with a number only."
    return prompt, str(count), {"count": count}


CONSTRAINTS: dict[str, Callable[[random.Random], tuple[str, str, dict[str, Any]]]] = {
    "repeat_word": _repeat_word,
    "reverse_list": _reverse_list,
    "sort_words": _sort_words,
    "uppercase": _uppercase,
    "lowercase": _lowercase,
    "list_items": _list_items,
    "count_words": _count_words,
}


def make_instruction_item(rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    constraint = rng.choice(sorted(CONSTRAINTS))
    prompt, response, arguments = CONSTRAINTS[constraint](rng)
    return prompt, response, response, {"constraint": constraint, **arguments}


def _comma_items(text: str) -> list[str]:
    return [part.strip() for part in text.strip().rstrip(".").split(",")]


def satisfies_constraint(meta: dict[str, Any], text: str) -> bool:
    """Whether ``text`` obeys the instruction described by ``meta`` (exact, no judge)."""
    constraint, answer = meta["constraint"], text.strip()
    if constraint == "repeat_word":
        return answer.split() == [meta["word"]] * meta["count"]
    if constraint == "reverse_list":
        return _comma_items(answer) == list(reversed(meta["items"]))
    if constraint == "sort_words":
        return _comma_items(answer) == sorted(meta["items"])
    if constraint == "uppercase":
        return answer == meta["text"].upper()
    if constraint == "lowercase":
        return answer == meta["text"].lower()
    if constraint == "list_items":
        items = _comma_items(answer)
        return (len(items) == meta["count"] and len(set(items)) == len(items)
                and set(items) <= set(meta["allowed"]))
    if constraint == "count_words":
        return answer == str(meta["count"])
    raise ValueError(f"unknown instruction constraint '{constraint}'")
