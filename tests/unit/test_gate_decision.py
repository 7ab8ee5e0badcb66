"""The gate's decision from recorded measurements (pure): speedups, error rates, quality
deltas, missing arms and levels, and evaluate's score file in the shapes it may take."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idlm.serving.gate.decision import Thresholds, decide, misses_table, read_scores, speedups
from idlm.serving.gate.loadtest import LevelRun, summarise
from idlm.serving.gate.report import markdown

PAPER = Thresholds(min_speedup={"isd": {1: 2.30, 64: 1.34}, "risd": {1: 2.0}},
                   max_error_rate=0.0, max_quality_drop=5.0,
                   quality_drop_overrides={"aime25": 7.0})


def level(per_request: float, successful: int = 8, errored: int = 0) -> dict:
    return {"per_request_tok_s": per_request, "output_tok_s": per_request * 4,
            "ttft_p50_ms": 20.0, "ttft_p99_ms": 30.0, "tpot_p50_ms": 5.0, "tpot_p99_ms": 7.0,
            "successful": successful, "errored": errored, "incomplete": 0}


def paper_measurements() -> dict:
    """The paper's per-request tok/s (I-DLM-8B vs Qwen3-8B, one H100), R-ISD at /1.12."""
    return {"ar": {1: level(142.0), 64: level(93.0)},
            "isd": {1: level(326.0), 64: level(125.0)},
            "risd": {1: level(326.0 / 1.12), 64: level(125.0 / 1.12)}}


SCORES = {"ar": {"gsm8k": 96.0, "aime25": 65.4, "ifeval": 84.7},
          "isd": {"gsm8k": 95.0, "aime25": 60.8, "ifeval": 84.7},
          "risd": {"gsm8k": 96.0, "aime25": 65.4, "ifeval": 84.7}}


def test_the_papers_figures_pass_with_the_papers_thresholds() -> None:
    decision = decide(paper_measurements(), PAPER, SCORES)
    assert decision.passed and decision.misses == []
    assert decision.speedups["isd"][1] == pytest.approx(326 / 142)      # 2.296 -> 2.30
    assert decision.speedups["isd"][64] == pytest.approx(125 / 93)
    assert decision.quality_deltas["isd"] == {"aime25": -4.6, "gsm8k": -1.0, "ifeval": 0.0}


def test_paper_thresholds_are_met_only_at_the_rounding_point() -> None:
    measured = paper_measurements()
    measured["isd"][1] = level(142.0 * 2.29)
    decision = decide(measured, PAPER, SCORES)
    assert not decision.passed
    assert [(m.check, m.arm, m.where, m.measured, m.required) for m in decision.misses] == [
        ("speedup", "isd", "C=1", "2.29x", ">= 2.30x")]


def test_a_missing_arm_fails_clearly() -> None:
    measured = paper_measurements()
    del measured["risd"]
    decision = decide(measured, PAPER, SCORES)
    assert not decision.passed
    assert [(m.check, m.arm, m.measured) for m in decision.misses] == [
        ("load test", "risd", "no measurements")]
    assert "| load test | risd | - | no measurements |" in misses_table(decision.misses)


def test_an_arm_without_threshold_is_still_required() -> None:
    thresholds = Thresholds(min_speedup={"isd": {1: 1.0}})
    measured = {"ar": {1: level(100.0)}, "isd": {1: level(150.0)}}
    decision = decide(measured, thresholds, SCORES, arms=("isd", "risd"))
    assert [(m.check, m.arm, m.measured) for m in decision.misses] == [
        ("load test", "risd", "no measurements")]
    assert decide(measured, thresholds, SCORES, arms=("isd",)).passed


def test_missing_baseline_and_missing_level() -> None:
    measured = paper_measurements()
    del measured["isd"][64]
    decision = decide(measured, PAPER, SCORES)
    assert [(m.arm, m.where, m.measured) for m in decision.misses] == [
        ("isd", "C=64", "not measured")]
    no_base = {arm: v for arm, v in paper_measurements().items() if arm != "ar"}
    misses = decide(no_base, PAPER, SCORES).misses
    assert misses[0].arm == "ar" and misses[0].measured == "no measurements"
    assert {(m.arm, m.where, m.measured) for m in misses[1:]} == {
        ("isd", "C=1", "no AR baseline"), ("isd", "C=64", "no AR baseline"),
        ("risd", "C=1", "no AR baseline")}


def test_errors_fail_the_gate_on_any_arm_including_ar() -> None:
    measured = paper_measurements()
    measured["ar"][64] = level(93.0, successful=7, errored=1)
    measured["isd"][1] = level(326.0, successful=0, errored=8)
    misses = decide(measured, PAPER, SCORES).misses
    assert [(m.check, m.arm, m.where, m.measured) for m in misses] == [
        ("errors", "ar", "C=64", "1/8 errored"),
        ("errors", "isd", "C=1", "no successful request")]
    tolerant = Thresholds(min_speedup=PAPER.min_speedup, max_error_rate=0.2)
    assert [m.arm for m in decide(measured, tolerant, SCORES).misses] == ["isd"]


def test_quality_drops_are_gated_per_benchmark_with_overrides() -> None:
    scores = json.loads(json.dumps(SCORES))
    scores["isd"]["gsm8k"] = 90.9          # -5.1 points: over the 5-point limit
    scores["isd"]["aime25"] = 58.5         # -6.9: within the 7-point override
    del scores["risd"]["ifeval"]
    misses = decide(paper_measurements(), PAPER, scores).misses
    assert [(m.arm, m.where, m.measured) for m in misses] == [
        ("isd", "gsm8k", "-5.10 points"), ("risd", "ifeval", "not scored")]


def test_no_scores_is_a_miss_not_a_pass() -> None:
    misses = decide(paper_measurements(), PAPER, {}).misses
    assert [(m.check, m.arm, m.measured) for m in misses] == [("quality", "ar", "no scores")]
    only_ar = {"ar": SCORES["ar"]}
    assert [(m.arm, m.measured) for m in decide(paper_measurements(), PAPER, only_ar).misses] \
        == [("isd", "no scores"), ("risd", "no scores")]


def test_recorded_json_with_string_levels_decides_the_same() -> None:
    recorded = json.loads(json.dumps(paper_measurements()))   # keys become "1", "64"
    assert set(recorded["ar"]) == {"1", "64"}
    assert decide(recorded, PAPER, SCORES) == decide(paper_measurements(), PAPER, SCORES)
    assert speedups(recorded)["isd"] == speedups(paper_measurements())["isd"]


@pytest.mark.parametrize("payload", [
    {"scores": {"ar": {"gsm8k": 50.0}, "isd": {"gsm8k": 47.5}}, "results": []},
    {"systems": {"ar": {"gsm8k": {"score": 50.0, "n": 10}}, "isd": {"gsm8k": {"score": 47.5}}}},
    {"ar": {"gsm8k": 50}, "isd": {"gsm8k": 47.5, "note": "text is skipped"}},
])
def test_read_scores_takes_the_shapes_evaluate_may_write(tmp_path: Path, payload: dict) -> None:
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(payload))
    assert read_scores(path) == {"ar": {"gsm8k": 50.0}, "isd": {"gsm8k": 47.5}}


def test_read_scores_missing_file_is_empty_and_bad_json_is_one_line(tmp_path: Path) -> None:
    from idlm.errors import StageError

    assert read_scores(tmp_path / "absent.json") == {}
    bad = tmp_path / "scores.json"
    bad.write_text("{not json")
    with pytest.raises(StageError, match="is not valid JSON.*rerun the evaluate stage"):
        read_scores(bad)


def test_repeats_measured_in_turn_give_the_median_paired_ratio() -> None:
    """Repeat 1 ran on a slower machine for both arms: the paired ratios are 2.0, 2.0 and
    1.5 (median 2.0); the ratio of the medians (240 / 150 = 1.6) would mix the repeats."""
    def runs(*tok_s: float) -> dict:
        return {**level(sorted(tok_s)[1]),
                "runs": [{"repeat": r, "per_request_tok_s": t} for r, t in enumerate(tok_s)]}

    measured = {"ar": {1: runs(150.0, 100.0, 160.0)}, "isd": {1: runs(300.0, 200.0, 240.0)}}
    assert speedups(measured)["isd"][1] == pytest.approx(2.0)
    decision = decide(measured, Thresholds(min_speedup={"isd": {1: 2.0}}), SCORES, ("isd",))
    assert decision.passed
    assert "- I-DLM (ISD): C=1 2.00 / 2.00 / 1.50" in markdown(measured, decision, {}, [])
    unpaired = {"ar": measured["ar"], "isd": {1: {**measured["isd"][1], "runs": []}}}
    assert speedups(unpaired)["isd"][1] == pytest.approx(240 / 150)


def test_summarise_takes_medians_over_repeats() -> None:
    def run(concurrency: int, repeat: int, tok_s: float, errored: int = 0) -> LevelRun:
        return LevelRun(concurrency, repeat, 8 - errored, errored, 0, tok_s, tok_s * 3,
                        10.0 + repeat, 20.0, 4.0, 6.0 + repeat)

    levels = summarise([run(1, 0, 100.0), run(4, 0, 60.0), run(1, 1, 140.0, errored=1),
                        run(4, 1, 50.0), run(1, 2, 120.0), run(4, 2, 70.0)])
    assert levels[1]["per_request_tok_s"] == 120.0 and levels[4]["per_request_tok_s"] == 60.0
    assert levels[1]["ttft_p50_ms"] == 11.0 and levels[1]["tpot_p99_ms"] == 7.0
    assert (levels[1]["successful"], levels[1]["errored"], levels[1]["repeats"]) == (23, 1, 3)
    assert [r["repeat"] for r in levels[4]["runs"]] == [0, 1, 2]
