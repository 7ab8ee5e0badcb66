"""The gate's pure half: thresholds, the pass/fail decision and its inputs (no I/O
beyond reading evaluate's scores file), so decisions are tested on recorded measurements.
The load test and the promotion live in :mod:`idlm.stages.gate`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from idlm.errors import StageError

BASELINE = "ar"


@dataclass(frozen=True)
class Thresholds:
    """What an arm must reach; built from the config's ``gate`` section."""

    min_speedup: Mapping[str, Mapping[int, float]]
    max_error_rate: float = 0.0
    max_quality_drop: float = 5.0
    quality_drop_overrides: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, gate: Any) -> Thresholds:
        return cls(min_speedup={arm: dict(levels) for arm, levels in gate.min_speedup.items()},
                   max_error_rate=gate.max_error_rate, max_quality_drop=gate.max_quality_drop,
                   quality_drop_overrides=dict(gate.quality_drop_overrides))

    def allowed_drop(self, benchmark: str) -> float:
        return self.quality_drop_overrides.get(benchmark, self.max_quality_drop)


@dataclass(frozen=True)
class Miss:
    """One check that failed: which, for which arm, where (level or benchmark), how far."""

    check: str
    arm: str
    where: str
    measured: str
    required: str


@dataclass(frozen=True)
class Decision:
    passed: bool
    misses: list[Miss]
    speedups: dict[str, dict[int, float]]
    quality_deltas: dict[str, dict[str, float]]


# ------------------------------------------------------------------ pure parts
def _levels(per_arm: Mapping[Any, Any]) -> dict[int, dict[str, Any]]:
    """Concurrency keys as ints (a report read back from JSON has them as strings)."""
    return {int(level): dict(figures) for level, figures in per_arm.items()}


def speedups(measurements: Mapping[str, Mapping[Any, Any]]) -> dict[str, dict[int, float]]:
    """Per-request tok/s of each arm over AR's at the same level (levels both measured).

    Where both levels list their repeats (``runs``) with the same repeat numbers, the
    figure is the median over repeats of the paired ratio, arm over AR in the same repeat:
    the gate measures the arms in turn within a repeat, so a pair shares the machine's
    state and the ratio cancels drift between repeats. Otherwise the ratio of medians."""
    if BASELINE not in measurements:
        return {}
    base = _levels(measurements[BASELINE])
    result: dict[str, dict[int, float]] = {}
    for arm, per_arm in measurements.items():
        if arm == BASELINE:
            continue
        result[arm] = {level: _speedup(figures, base[level])
                       for level, figures in sorted(_levels(per_arm).items())
                       if level in base and base[level]["per_request_tok_s"] > 0}
    return result


def paired_ratios(arm: Mapping[str, Any], base: Mapping[str, Any]) -> list[float]:
    """Per repeat, the arm's per-request tok/s over AR's in the same repeat; empty unless
    both list the same repeats (``runs``) and AR's are all non-zero."""
    base_runs = {run["repeat"]: run["per_request_tok_s"] for run in base.get("runs") or ()}
    arm_runs = {run["repeat"]: run["per_request_tok_s"] for run in arm.get("runs") or ()}
    if not base_runs or arm_runs.keys() != base_runs.keys() or not all(base_runs.values()):
        return []
    return [arm_runs[repeat] / base_runs[repeat] for repeat in sorted(base_runs)]


def _speedup(arm: Mapping[str, Any], base: Mapping[str, Any]) -> float:
    ratios = paired_ratios(arm, base)
    return median(ratios) if ratios else arm["per_request_tok_s"] / base["per_request_tok_s"]


def quality_deltas(scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Score of each system minus AR's, per benchmark both were scored on (points)."""
    base = scores.get(BASELINE, {})
    return {system: {bench: round(own[bench] - base[bench], 4)
                     for bench in sorted(base) if bench in own}
            for system, own in scores.items() if system != BASELINE}


def decide(measurements: Mapping[str, Mapping[Any, Any]], thresholds: Thresholds,
           scores: Mapping[str, Mapping[str, float]] | None,
           arms: tuple[str, ...] = ("isd", "risd")) -> Decision:
    """Pass/fail from recorded measurements, thresholds and evaluate's scores (pure).

    ``arms`` are the candidate arms gated against AR; an arm with a speedup threshold is
    gated even when it is not listed. A missing arm, level or score is a miss, never a pass.
    """
    gated = tuple(dict.fromkeys([*arms, *thresholds.min_speedup]))
    misses: list[Miss] = []
    if BASELINE not in measurements:
        misses.append(Miss("load test", BASELINE, "-", "no measurements",
                           "the AR baseline measured at every level"))
    ratios = speedups(measurements)
    for arm in gated:
        if arm not in measurements:
            misses.append(Miss("load test", arm, "-", "no measurements",
                               f"arm '{arm}' served and measured (gate.arms)"))
            continue
        misses += _speedup_misses(arm, ratios.get(arm, {}), thresholds,
                                  measured_levels=set(_levels(measurements[arm])))
    for arm in [BASELINE, *gated]:
        if arm in measurements:
            misses += _error_misses(arm, _levels(measurements[arm]), thresholds.max_error_rate)
    deltas = quality_deltas(scores or {})
    misses += _quality_misses(scores or {}, deltas, gated, thresholds)
    return Decision(passed=not misses, misses=misses, speedups=ratios, quality_deltas=deltas)


def _speedup_misses(arm: str, ratios: Mapping[int, float], thresholds: Thresholds,
                    measured_levels: set[int]) -> list[Miss]:
    misses = []
    for level, required in sorted(thresholds.min_speedup.get(arm, {}).items()):
        ratio = ratios.get(level)
        if ratio is None:
            why = "not measured" if level not in measured_levels else "no AR baseline"
            misses.append(Miss("speedup", arm, f"C={level}", why, f">= {required:.2f}x"))
        elif round(ratio, 2) < required:   # at the precision thresholds are written in
            misses.append(Miss("speedup", arm, f"C={level}", f"{ratio:.2f}x",
                               f">= {required:.2f}x"))
    return misses


def _error_misses(arm: str, levels: Mapping[int, Mapping[str, Any]],
                  max_error_rate: float) -> list[Miss]:
    misses = []
    for level, figures in sorted(levels.items()):
        total = figures.get("successful", 0) + figures.get("errored", 0)
        if figures.get("successful", 0) == 0:
            misses.append(Miss("errors", arm, f"C={level}", "no successful request",
                               "requests complete"))
        elif figures.get("errored", 0) / total > max_error_rate:
            misses.append(Miss("errors", arm, f"C={level}",
                               f"{figures['errored']}/{total} errored",
                               f"error rate <= {max_error_rate:.0%}"))
    return misses


def _quality_misses(scores: Mapping[str, Mapping[str, float]],
                    deltas: Mapping[str, Mapping[str, float]], gated: tuple[str, ...],
                    thresholds: Thresholds) -> list[Miss]:
    if not scores.get(BASELINE):
        return [Miss("quality", BASELINE, "-", "no scores",
                     "evaluate scores for the AR base (outputs/evaluate/scores.json)")]
    misses = []
    for arm in gated:
        if not scores.get(arm):
            misses.append(Miss("quality", arm, "-", "no scores",
                               f"evaluate scores for '{arm}' (evaluate.systems)"))
            continue
        for bench in sorted(scores[BASELINE]):
            delta = deltas.get(arm, {}).get(bench)
            allowed = thresholds.allowed_drop(bench)
            if delta is None:
                misses.append(Miss("quality", arm, bench, "not scored",
                                   f"scored like the AR base (drop <= {allowed:g})"))
            elif delta < -allowed:
                misses.append(Miss("quality", arm, bench, f"{delta:+.2f} points",
                                   f">= -{allowed:g} points"))
    return misses


def misses_table(misses: list[Miss]) -> str:
    lines = ["| check | arm | where | measured | required |", "|---|---|---|---|---|"]
    lines += [f"| {m.check} | {m.arm} | {m.where} | {m.measured} | {m.required} |"
              for m in misses]
    return "\n".join(lines)


# ------------------------------------------------------------------ inputs
def read_scores(path: Path) -> dict[str, dict[str, float]]:
    """``{system: {benchmark: score}}`` from evaluate's file, whatever wrapper it uses:
    ``{"systems": ...}``, ``{"scores": ...}`` or the mapping itself; a benchmark's entry may
    be a number or a dict with a ``score`` (or ``accuracy``) field. Missing file: ``{}``."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StageError(f"{path} is not valid JSON ({error}): rerun the evaluate stage") from None
    for key in ("systems", "scores"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    scores: dict[str, dict[str, float]] = {}
    for system, per_bench in (data.items() if isinstance(data, dict) else []):
        if not isinstance(per_bench, dict):
            continue
        for bench, value in per_bench.items():
            number = _score_value(value)
            if number is not None:
                scores.setdefault(system, {})[bench] = number
    return scores


def _score_value(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("score", value.get("accuracy"))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def decision_record(decision: Decision) -> dict[str, Any]:
    """JSON-ready: concurrency keys as strings, misses as dicts."""
    return {"passed": decision.passed, "misses": [asdict(m) for m in decision.misses],
            "speedups": {arm: {str(c): round(v, 4) for c, v in levels.items()}
                         for arm, levels in decision.speedups.items()},
            "quality_deltas": decision.quality_deltas}
