"""The gate of the trained workspace (the flow ran it): guidellm loaded `idlm serve` for the
AR, ISD and R-ISD arms at C=1 and C=2; the gate parsed guidellm's report and decided. The
same measurements with a speedup no model reaches fail with the table of misses."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from idlm import config
from idlm.errors import StageError
from idlm.serving.gate.decision import read_scores
from idlm.stages.gate import arm_targets, conclude, load_plan, measure_arms, read_registered
from tests.workspace import PROFILE

ARMS = {"ar", "isd", "risd"}


@pytest.fixture(scope="module")
def gate(trained: dict) -> tuple[config.Config, dict]:
    cfg: config.Config = trained["cfg"]
    return cfg, json.loads(cfg.out("gate", "report.json").read_text())


def test_guidellm_measured_every_arm_at_every_level(gate) -> None:
    cfg, report = gate
    assert report["passed"] is True  # the test profile measures speed without gating it
    assert set(report["measurements"]) == ARMS
    for arm, levels in report["measurements"].items():
        assert set(levels) == {"1", "2"}, arm
        for level in levels.values():
            assert [run["repeat"] for run in level["runs"]] == [0]
            assert level["successful"] == 2 and level["errored"] == 0
            assert level["per_request_tok_s"] > 0 and level["output_tok_s"] > 0
            assert 0 < level["ttft_p50_ms"] <= level["ttft_p99_ms"]
            assert 0 < level["tpot_p50_ms"] <= level["tpot_p99_ms"]
    assert report["setup"]["requests_per_level"] == {"1": 2, "2": 2}
    assert report["setup"]["start_together"] is True  # three servers, started at once
    assert report["setup"]["interleaved"] is True
    assert report["setup"]["arms"]["isd"].startswith("idlm serve --mode isd --model ")
    decoding = report["setup"]["decoding"]     # each server's /metrics after the load
    assert decoding["ar"]["tokens_per_forward"] == 1.0
    for arm in ("isd", "risd"):
        assert 1.0 <= decoding[arm]["tokens_per_forward"] <= cfg.gate.stride


def test_every_request_got_exactly_the_asked_tokens_from_our_prompts(gate) -> None:
    cfg, _ = gate
    # As they appear in the request JSON guidellm records.
    prompts = [json.dumps(json.loads(line)["prompt"])[1:-1] for line in
               cfg.out("prepare", "eval_items.jsonl").read_text().splitlines()]
    for arm in ARMS:
        raw = [json.loads(cfg.out("gate", "loadtest", arm, "repeat-0", f"c{level}",
                                  "guidellm.json").read_text()) for level in (1, 2)]
        benchmarks = [b for report in raw for b in report["benchmarks"]]
        assert [b["config"]["strategy"]["streams"] for b in benchmarks] == [1, 2]
        requests = [r for b in benchmarks for r in b["requests"]["successful"]]
        assert len(requests) == 4
        assert {r["output_tokens"] for r in requests} == {cfg.gate.output_tokens}  # ignore_eos
        assert all(any(p in r["request_args"] for p in prompts) for r in requests)
        assert (cfg.out("gate", "loadtest", arm, "server.log")).is_file()


def test_the_arms_take_turns_within_each_repeat(gate, tmp_path: Path) -> None:
    """Two arms, one level, two repeats: guidellm loads AR, ISD, AR, ISD (its own start
    times), and each arm's summary holds both repeats."""
    cfg, _ = gate
    # The workspace's own prompts, wherever the test runs from (the path is relative).
    prompts = str(cfg.out("prepare", "eval_items.jsonl"))
    cfg = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"prompt_file": prompts})})
    targets = [target for target in arm_targets(cfg) if target.name in ("ar", "isd")]
    plan = replace(load_plan(cfg, targets), concurrencies=(1,), repeats=2, min_requests=1)
    measured = measure_arms(targets, plan, cfg.gate, tmp_path)
    for levels, stats in measured.values():
        assert [run["repeat"] for run in levels[1]["runs"]] == [0, 1]
        assert levels[1]["successful"] == 2 and stats is not None
    starts = [json.loads((tmp_path / arm / f"repeat-{repeat}" / "c1" / "guidellm.json")
                         .read_text())["benchmarks"][0]["start_time"]
              for repeat in (0, 1) for arm in ("ar", "isd")]
    assert starts == sorted(starts)


def test_fail_names_what_missed_and_leaves_the_alias(gate, tmp_path: Path) -> None:
    trained_cfg, measured = gate
    cfg = config.load_profile(PROFILE, [f"outputs={tmp_path}",
                                        "+gate.min_speedup.isd={1: 50.0}"])
    scores = read_scores(trained_cfg.out("evaluate", "scores.json"))
    registered = read_registered(trained_cfg.out("export", "registry.json"))
    with pytest.raises(StageError) as failure:
        conclude(cfg, measured["measurements"], scores, registered, measured["setup"],
                 workspace=tmp_path)
    message = str(failure.value)
    assert message.startswith("gate failed, alias 'champion' untouched; 1 check(s) missed")
    assert "| speedup | isd | C=1 |" in message and ">= 50.00x" in message
    report = json.loads(cfg.out("gate", "report.json").read_text())
    assert report["passed"] is False and report["promoted"] == []
    assert [(m["check"], m["arm"], m["where"]) for m in report["misses"]] == [
        ("speedup", "isd", "C=1")]
    assert set(report["quality_deltas"]) == {"isd", "risd"}
    metrics = json.loads(cfg.out("gate", "metrics.json").read_text())
    assert metrics["passed"] is False and set(metrics["speedup"]["isd"]) == {"c1", "c2"}
    assert metrics["speedup"]["isd"]["c1"] == pytest.approx(
        report["measurements"]["isd"]["1"]["per_request_tok_s"]
        / report["measurements"]["ar"]["1"]["per_request_tok_s"], rel=1e-3)
    markdown = cfg.out("gate", "report.md").read_text()
    assert markdown.startswith("# Gate: FAIL") and "Registry alias untouched." in markdown
    assert cfg.out("gate", "throughput_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_inputs_fail_before_any_server_starts(trained: dict, tmp_path: Path) -> None:
    from idlm.stages.gate import run

    outputs = Path(trained["cfg"].outputs)
    base = [f"outputs={outputs}", "~gate.arms.risd"]
    cfg = config.load_profile(PROFILE, [*base, "gate.arms.isd.model=/nonexistent/model"])
    with pytest.raises(StageError, match="arm 'isd' needs a model folder at /nonexistent"):
        run(cfg)
    # A prompt file the user names is checked with the config; one a stage makes (under
    # the outputs folder) by the gate, when it runs.
    with pytest.raises(config.ConfigError, match="'gate.prompt_file'.*none.jsonl' not found"):
        config.load_profile(PROFILE, [*base, f"gate.prompt_file={tmp_path}/none.jsonl"])
    cfg = config.load_profile(PROFILE, [*base, f"gate.prompt_file={outputs}/none.jsonl"])
    with pytest.raises(StageError, match="gate.prompt_file .*none.jsonl not found"):
        run(cfg)
    assert not (outputs / "none.jsonl").exists()
    assert not list((outputs / "gate").glob(".loadtest.*"))  # no half-made load test left
