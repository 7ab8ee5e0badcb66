"""verify and evaluate on the trained workspace (the flow ran both there): outputs,
exactness, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from idlm.config import Config, load_profile
from idlm.decoding import trained as trained_models
from idlm.errors import StageError
from idlm.stages import evaluate as evaluate_stage
from idlm.stages import verify as verify_stage
from tests.workspace import PROFILE


def _cfg(trained: dict, *extra: str) -> Config:
    return load_profile(PROFILE, [f"outputs={trained['cfg'].outputs}", *extra])


@pytest.fixture(scope="module")
def verified(trained: dict) -> dict:
    """What the flow's `verify` wrote (its stage script prints the same dict)."""
    return json.loads(trained["cfg"].out("verify", "metrics.json").read_text())


def test_verify_is_lossless_and_writes_report_metrics_plot(trained: dict, verified: dict
                                                           ) -> None:
    out = trained["cfg"].out("verify")
    assert sorted(p.name for p in out.iterdir() if p.name != ".gitignore") == [
        "acceptance.png", "metrics.json", "report.json"]
    assert verified["passed"] and verified["failed_checks"] == []
    for mode in ("isd", "risd"):
        assert verified[f"lossless_{mode}"]["mismatches"] == 0
        assert verified[f"lossless_{mode}"]["prompts"] == 6
        assert verified[f"lossless_{mode}"]["tokens_compared"] > 0
        for stride in (2, 4):
            figures = verified[f"{mode}_n{stride}"]
            assert 1.0 <= figures["tokens_per_forward"] <= stride
            assert len(figures["acceptance_per_position"]) == stride - 1
            assert 0.0 <= figures["introspective_acceptance"] <= 1.0
    report = json.loads((out / "report.json").read_text())
    assert report["exactness_isd"]["isd"]["p_value"] >= 0.01
    assert report["exactness_risd"]["isd"]["p_value"] >= 0.01


def test_verify_reports_tpf_and_acceptance_per_prompt_kind(trained: dict, verified: dict
                                                           ) -> None:
    cfg = _cfg(trained)
    kinds = trained_models.item_kinds(trained_models.held_out_items(cfg, cfg.verify.prompts))
    report = json.loads(cfg.out("verify", "report.json").read_text())
    for mode in ("isd", "risd"):
        for sweep in report[f"acceptance_{mode}"]["strides"].values():
            by_kind = sweep["by_kind"]
            assert {k: v["prompts"] for k, v in by_kind.items()} == {
                k: kinds.count(k) for k in set(kinds)}
            for total in ("tokens", "forwards"):
                assert sum(v[total] for v in by_kind.values()) == sweep["decoding"][total]
            assert sweep["formula"]["tokens_per_forward"] is not None
    for kind in set(kinds):
        assert verified[f"tpf_n4_{kind}"] == verified["isd_n4"]["tokens_per_forward_by_kind"][kind]
    assert 1.0 <= verified["tpf_formula_n4"] <= 4.0


def test_verify_names_the_missing_adapter_before_loading(trained: dict,
                                                         tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    for stage in ("prepare", "base", "ic"):
        shutil.copytree(trained["cfg"].out(stage), outputs / stage)
    cfg = load_profile(PROFILE, [f"outputs={outputs}"])
    with pytest.raises(StageError, match=r"lora/adapter is missing: run `dvc repro lora`"):
        verify_stage.run(cfg)


def test_evaluate_scores_three_systems_and_risd_answers_as_ar(trained: dict,
                                                              verified: dict) -> None:
    cfg = _cfg(trained)
    metrics = evaluate_stage.run(cfg)
    out = cfg.out("evaluate")
    assert set(metrics["scores"]) == {"ar", "isd", "risd"}
    for scores in metrics["scores"].values():
        assert set(scores) == {"tiny_arithmetic", "tiny_code"}
    assert metrics["risd_equals_ar"] == {"compared": 6, "mismatched": 0, "examples": []}
    for name in ("scores.json", "scores.md", "scores.png", "metrics.json"):
        assert (out / name).is_file()
    table = (out / "scores.md").read_text()
    assert "tiny_arithmetic" in table or "tiny arithmetic" in table
    log = out / "samples" / "isd" / "tiny_code.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert len(records) == 3
    assert {"prompt_text", "output", "extracted", "correct"} <= set(records[0])


def test_evaluate_resumes_a_killed_run_without_redoing_samples(trained: dict,
                                                              verified: dict) -> None:
    cfg = _cfg(trained)
    evaluate_stage.run(cfg)  # complete (or already complete)
    log = cfg.out("evaluate", "samples", "ar", "tiny_arithmetic.jsonl")
    lines = log.read_text().splitlines(keepends=True)
    # As if killed while writing: the last record is gone and a torn line is left.
    log.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    evaluate_stage.run(cfg)
    results = json.loads(cfg.out("evaluate", "scores.json").read_text())["results"]
    ar = next(r for r in results if r["system"] == "ar" and r["benchmark"] == "tiny_arithmetic")
    assert (ar["generated"], ar["resumed"]) == (1, 2)
    others = [r for r in results if r is not ar]
    assert all(r["generated"] == 0 and r["resumed"] == r["samples"] for r in others)


def test_evaluate_rejects_an_unknown_benchmark_before_loading(trained: dict) -> None:
    cfg = _cfg(trained, "evaluate.benchmarks=[tiny_arithmetic, gsm9k]")
    with pytest.raises(StageError, match="evaluate.benchmarks: unknown gsm9k"):
        evaluate_stage.run(cfg)


def test_evaluate_through_an_endpoint_matches_the_in_process_engine(
        trained: dict, verified: dict, tmp_path: Path) -> None:
    from idlm.decoding.loading import load_engine
    from tests.unit.test_serve import NAME, running_server

    cfg = _cfg(trained)
    evaluate_stage.run(cfg)  # in process (or already there)
    in_process = json.loads(cfg.out("evaluate", "scores.json").read_text())["scores"]["risd"]
    base, adapter = cfg.out("base", "model"), cfg.out("lora", "adapter")
    engine = load_engine(base, adapter, "risd", max_batch_size=8)
    with running_server(engine, mode="risd", stride=4, max_waiting=64) as url:
        served = _cfg(trained, f"outputs={tmp_path}", "evaluate.systems=[risd]",
                      f"+evaluate.endpoints.risd.url={url}",
                      f"+evaluate.endpoints.risd.model={NAME}")
        for stage in ("prepare", "base", "ic", "lora", "verify"):
            shutil.copytree(cfg.out(stage), served.out(stage))
        metrics = evaluate_stage.run(served)
    assert metrics["scores"]["risd"] == in_process
    for name in ("tiny_arithmetic", "tiny_code"):
        outputs = [json.loads(line)["output"] for line in
                   cfg.out("evaluate", "samples", "risd", f"{name}.jsonl").read_text()
                   .splitlines()[1:]]
        over_http = [json.loads(line)["output"] for line in
                     served.out("evaluate", "samples", "risd", f"{name}.jsonl").read_text()
                     .splitlines()[1:]]
        assert sorted(over_http) == sorted(outputs) and len(outputs) == 3
