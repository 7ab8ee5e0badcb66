"""The scorers against hand-written answers in the forms thinking models really write.

``tests/fixtures/answers/*.yaml`` holds, per benchmark family, answers with thinking before
``</think>``, markdown, hedges, several candidate answers and restated question numbers,
each with the verdict a careful grader gives (and, where it matters, the value and rule the
extractor must report). The target is 0 wrong verdicts.

``tiny_scored_outputs.jsonl`` holds every distinct answer the tiny profile's three systems
gave to its arithmetic, multiple-choice and instruction items, with the verdict and value
the scorers gave before the extraction chains: the tiny scores must not move.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from idlm.benchmarks import get_benchmark, sandbox
from idlm.benchmarks.base import Sample
from idlm.benchmarks.registry import suite_names
from idlm.config.downstream import EvalSandbox

# What the registry finds by scanning suite/ (the tests assert its contents and order).
REAL_SUITE, TINY_SUITE = suite_names("real"), suite_names("tiny")


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ANSWERS = FIXTURES / "answers"
SANDBOX = EvalSandbox(timeout_s=3.0, memory_mb=1024, workers=1,
                          allow_unsandboxed=not sandbox.isolation_available())
UNSET = object()


@dataclass(frozen=True)
class Case:
    family: str
    number: int
    benchmark: str
    sample: Sample
    output: str
    correct: bool
    extracted: Any
    rule: str | None
    detail_has: str | None

    def label(self) -> str:
        return f"{self.family}#{self.number} {self.benchmark}: {self.output[:60]!r}"


def _sample(benchmark: str, group: dict[str, Any]) -> Sample:
    bench = get_benchmark(benchmark, SANDBOX)
    if "fixture" in group:  # a real row of a benchmark's local fixture
        path = FIXTURES / "benchmarks" / group["fixture"]
        return bench.load(str(path))[group.get("index", 0)]
    return bench.sample_from_reference(group["reference"], group.get("meta"))


def load_cases() -> list[Case]:
    cases = []
    for path in sorted(ANSWERS.glob("*.yaml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            sample = _sample(group["benchmark"], group)
            for case in group["cases"]:
                cases.append(Case(path.stem, len(cases), group["benchmark"], sample,
                                  case["output"], case["correct"],
                                  case.get("extracted", UNSET), case.get("rule"),
                                  case.get("detail_has")))
    return cases


CASES = load_cases()


def wrong(case: Case) -> str | None:
    """Why the scorer's verdict on ``case`` differs from the expected one (None: it agrees)."""
    verdict = get_benchmark(case.benchmark, SANDBOX).score(case.output, case.sample)
    problems = []
    if verdict.correct != case.correct:
        problems.append(f"correct={verdict.correct}, expected {case.correct}")
    if case.extracted is not UNSET:
        expected = None if case.extracted is None else str(case.extracted)
        if verdict.extracted != expected:
            problems.append(f"extracted {verdict.extracted!r}, expected {expected!r}")
    if case.rule is not None and verdict.rule != case.rule:
        problems.append(f"rule {verdict.rule!r}, expected {case.rule!r}")
    if case.detail_has is not None and case.detail_has not in verdict.detail:
        problems.append(f"detail lacks {case.detail_has!r}")
    if not problems:
        return None
    return f"{case.label()}: {'; '.join(problems)} ({verdict.detail[:160]})"


def test_the_fixture_is_big_and_covers_every_benchmark() -> None:
    assert len(CASES) >= 150
    assert {case.benchmark for case in CASES} == set(REAL_SUITE) | set(TINY_SUITE)
    assert {case.family for case in CASES} == {"code", "instruction", "math",
                                                 "multiple_choice"}
    # Both verdicts for each benchmark, and answers from which nothing can be read.
    for name in {case.benchmark for case in CASES}:
        assert {case.correct for case in CASES if case.benchmark == name} == {True, False}
    assert sum(case.extracted is None for case in CASES) >= 20


@pytest.mark.parametrize("family", ["multiple_choice", "math", "code", "instruction"])
def test_no_wrong_verdicts(family: str) -> None:
    failures = [reason for case in CASES if case.family == family
                if (reason := wrong(case)) is not None]
    assert not failures, f"{len(failures)} wrong verdicts:\n" + "\n".join(failures)


def test_tiny_profile_verdicts_are_unchanged() -> None:
    lines = (FIXTURES / "benchmarks" / "tiny_scored_outputs.jsonl").read_text().splitlines()
    changed = []
    for record in map(json.loads, lines):
        bench = get_benchmark(record["benchmark"])
        verdict = bench.score(record["output"],
                              bench.sample_from_reference(record["reference"], record["meta"]))
        same_value = (record["benchmark"] == "tiny_instruction"
                      or verdict.extracted == record["extracted"])
        if verdict.correct != record["correct"] or not same_value:
            changed.append(f"{record['id']} {record['output'][-60:]!r}: {verdict.detail}")
    assert len(lines) > 250 and not changed, "\n".join(changed)
