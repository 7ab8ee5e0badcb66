"""What an extractor found and which rule found it, and how candidates become one answer.

An extractor collects :class:`Candidate` answers, each tagged with the rule that matched
and the text it matched. :func:`decide` turns them into one :class:`Extraction`:

* the **last** candidate wins: a model that writes ``Answer: A`` and later, after more
  reasoning, ``Answer: D`` has changed its mind;
* two candidates that disagree *with nothing but formatting between them* (``Answer: B``
  directly followed by ``\\boxed{C}``, or ``Answer: A or C``) are a conflict: no answer is
  taken, and the verdict says so instead of guessing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Words that start a revision ("Answer: A. Wait, actually ... Answer: D"): text between two
# statements that holds one of these is reasoning, so the later statement replaces the first.
REVISION = re.compile(r"(?i)\b(?:wait|actually|but|however|no|reconsider\w*|correct(?:ion|ing)|"
                      r"instead|mistake|re-?check\w*|hmm|oops|rather|double-check\w*)\b")
# At most this many words between two statements and they form one closing statement.
ADJACENT_WORDS = 4


@dataclass(frozen=True)
class Candidate:
    """One answer a rule found: its value, the rule's name and where it matched."""

    value: str
    rule: str
    start: int
    end: int
    span: str
    # Set by a rule whose one statement names several answers ("Answer: A or C").
    ambiguous: bool = False


@dataclass(frozen=True)
class Extraction:
    """The answer taken (or None), the rule that took it and the matched text."""

    value: str | None
    rule: str | None = None
    span: str = ""
    problem: str = ""

    def describe(self) -> str:
        """One line for a verdict's detail: which rule read what, or why nothing was read."""
        if self.value is None:
            return self.problem or "nothing extracted"
        return f"{self.rule}: {_clip(self.span)!r} -> {self.value}"


def _clip(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def nothing(problem: str) -> Extraction:
    return Extraction(None, None, "", problem)


def taken(candidate: Candidate) -> Extraction:
    return Extraction(candidate.value, candidate.rule, candidate.span)


def adjacent(text: str, earlier: Candidate, later: Candidate) -> bool:
    """Whether only formatting (or a few linking words) separates two candidates."""
    if later.start <= earlier.end:
        return True  # nested or overlapping: "The answer is \\boxed{C}"
    gap = text[earlier.end:later.start]
    if REVISION.search(gap):
        return False
    return len(re.findall(r"[A-Za-z]+", gap)) <= ADJACENT_WORDS and "\n\n\n" not in gap


def decide(text: str, candidates: Sequence[Candidate]) -> Extraction | None:
    """The last candidate, unless the closing statement disagrees with itself.

    None when there are no candidates (the caller tries its next, weaker rules).
    """
    if not candidates:
        return None
    ordered = sorted(candidates, key=lambda c: (c.start, c.end))
    closing = [ordered[-1]]
    for earlier in reversed(ordered[:-1]):
        if not adjacent(text, earlier, closing[0]):
            break
        closing.insert(0, earlier)
    values = list(dict.fromkeys(c.value for c in closing))
    if len(values) > 1:
        shown = "; ".join(f"{c.rule} {_clip(c.span, 40)!r} -> {c.value}" for c in closing)
        return nothing(f"conflicting final answers ({shown})")
    last = closing[-1]
    if any(c.ambiguous for c in closing):
        return nothing(f"{last.rule} names more than one answer: {_clip(last.span)!r}")
    return taken(last)
