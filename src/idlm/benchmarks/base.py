"""What every benchmark module defines: where its data lives, how a row becomes a prompt,
and how an answer is scored. A benchmark is a small subclass registered by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from idlm.benchmarks.loading import DataSource, load_rows
from idlm.config.downstream import EvalSandbox

CATEGORIES = ("multiple_choice", "math", "code", "instruction")


@dataclass(frozen=True)
class Sample:
    """One benchmark item: the chat messages to send, the gold reference and scorer meta."""

    id: str
    messages: list[dict[str, str]]
    reference: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """The scorer's decision: right or wrong, what it extracted, and why (one line).

    ``rule`` names the extraction rule that found the answer; None when nothing could be
    extracted (evaluate reports that share apart from wrong answers).
    """

    correct: bool
    extracted: str | None
    detail: str = ""
    rule: str | None = None


class Benchmark:
    """Base class. Subclasses set the class attributes and ``to_sample`` / ``score``."""

    name: ClassVar[str]
    title: ClassVar[str]
    category: ClassVar[str]
    source: ClassVar[DataSource]
    # Which suite lists it ("real": the paper's 15; "tiny": the tiny profile's sets) and
    # its row in the results table (the paper's order; a benchmark that does not say comes
    # after those, by name).
    suite: ClassVar[str] = "real"
    table_order: ClassVar[int] = 1000
    # A benchmark's own token budget (e.g. MC answers need fewer); capped by the suite's.
    default_max_new_tokens: ClassVar[int | None] = None

    def __init__(self, sandbox: EvalSandbox | None = None) -> None:
        self.sandbox = sandbox or EvalSandbox()

    def load(self, path: str | None = None, revision: str | None = None,
             limit: int | None = None) -> list[Sample]:
        """The benchmark's samples from ``path`` (local override) or its published source."""
        rows = load_rows(self.source, path, revision)
        samples = [self.to_sample(row, index) for index, row in enumerate(rows)]
        samples = [sample for sample in samples if sample is not None]
        return samples[:limit] if limit is not None else samples

    def to_sample(self, row: dict[str, Any], index: int) -> Sample | None:
        raise NotImplementedError

    def empty_hint(self) -> str:
        """What to check when ``load`` found no samples (appended to the one-line error)."""
        return ""

    def score(self, output: str, sample: Sample) -> Verdict:
        raise NotImplementedError

    def sample_from_reference(self, reference: Any, meta: dict[str, Any] | None = None
                              ) -> Sample:
        """A sample built from a reference given by hand (``idlm score``)."""
        return Sample(id="cli", messages=[], reference=reference, meta=dict(meta or {}))


def user_message(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]
