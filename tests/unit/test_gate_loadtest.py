"""A real (small) gate run: guidellm loads `idlm serve` (AR and ISD arms, a tiny random
Qwen3 with a trained BPE tokenizer) at two concurrency levels, twice each; the gate parses
guidellm's report, decides, writes its outputs and fails with the table of misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idlm import config
from idlm.stage import StageError

TEXTS = [f"user\nwhat is {a} plus {b}?\nassistant\n{a}+{b}={a + b}\n"
         for a in range(12) for b in range(12)]
PROMPTS = [f"what is {a} plus {b}?" for a, b in ((1, 2), (3, 4), (5, 6))]
OUTPUT_TOKENS = 8


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """An outputs folder as the stages before gate leave it (random weights)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from idlm.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("gate") / "outputs"
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    model_config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                               intermediate_size=64, max_position_embeddings=256,
                               pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    for stage in ("base", "ic"):
        Qwen3ForCausalLM(model_config).save_pretrained(root / stage / "model")
        tokenizer.save_pretrained(root / stage / "model")
    (root / "base" / "base.json").write_text(json.dumps({"kind": "tiny", "path": "base/model"}))
    scores = {"tiny_arithmetic": 40.0, "tiny_code": 20.0}
    (root / "evaluate").mkdir()
    (root / "evaluate" / "scores.json").write_text(json.dumps(
        {"scores": {"ar": scores, "isd": scores}, "results": []}))
    (root / "export").mkdir()
    (root / "export" / "registry.json").write_text(json.dumps(
        {"registered": [{"name": "idlm-tiny-isd", "version": "1"}]}))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                for p in PROMPTS))
    return root


@pytest.fixture(scope="module")
def failed_gate(outputs: Path) -> tuple[config.Config, str]:
    """The gate at C=1,2 x 2 repeats, with a speedup no random model reaches."""
    from idlm.serving.gate import run

    cfg = config.load_profile("tiny", [
        f"outputs={outputs}", "gate.arms={ar: {}, isd: {}}", "gate.concurrencies=[1, 2]",
        "gate.repeats=2", "gate.min_requests=2", "gate.requests_per_stream=1",
        f"gate.output_tokens={OUTPUT_TOKENS}", f"gate.prompt_file={outputs}/prompts.jsonl",
        "gate.min_speedup={isd: {1: 50.0}}", "gate.startup_timeout_s=120"])
    with pytest.raises(StageError) as failure:
        run(cfg)
    return cfg, str(failure.value)


def test_guidellm_measured_both_arms_at_every_level_and_repeat(failed_gate) -> None:
    cfg, _ = failed_gate
    report = json.loads(cfg.out("gate", "report.json").read_text())
    assert set(report["measurements"]) == {"ar", "isd"}
    for arm, levels in report["measurements"].items():
        assert set(levels) == {"1", "2"}, arm
        for level in levels.values():
            assert [run["repeat"] for run in level["runs"]] == [0, 1]
            assert level["successful"] == 4 and level["errored"] == 0   # 2 requests x 2
            assert level["per_request_tok_s"] > 0 and level["output_tok_s"] > 0
            assert 0 < level["ttft_p50_ms"] <= level["ttft_p99_ms"]
            assert 0 < level["tpot_p50_ms"] <= level["tpot_p99_ms"]
    assert report["setup"]["requests_per_level"] == {"1": 2, "2": 2}
    assert report["setup"]["arms"]["isd"].startswith("idlm serve --mode isd --model ")
    decoding = report["setup"]["decoding"]     # each server's /metrics after the load
    assert decoding["ar"]["tokens_per_forward"] == 1.0
    assert 1.0 <= decoding["isd"]["tokens_per_forward"] <= 4.0   # stride N=4


def test_every_request_got_exactly_the_asked_tokens_from_our_prompts(failed_gate) -> None:
    cfg, _ = failed_gate
    for arm in ("ar", "isd"):
        raw = json.loads(cfg.out("gate", "loadtest", arm, "guidellm.json").read_text())
        assert [b["config"]["strategy"]["streams"] for b in raw["benchmarks"]] == [1, 2, 1, 2]
        requests = [r for b in raw["benchmarks"] for r in b["requests"]["successful"]]
        assert len(requests) == 8
        assert {r["output_tokens"] for r in requests} == {OUTPUT_TOKENS}   # ignore_eos held
        assert all(any(p in r["request_args"] for p in PROMPTS) for r in requests)
        assert (cfg.out("gate", "loadtest", arm, "server.log")).is_file()


def test_fail_names_what_missed_and_leaves_the_alias(failed_gate) -> None:
    cfg, message = failed_gate
    assert message.startswith("gate failed, alias 'champion' untouched; 1 check(s) missed")
    assert "| speedup | isd | C=1 |" in message and ">= 50.00x" in message
    report = json.loads(cfg.out("gate", "report.json").read_text())
    assert report["passed"] is False and report["promoted"] == []
    assert [(m["check"], m["arm"], m["where"]) for m in report["misses"]] == [
        ("speedup", "isd", "C=1")]
    assert report["quality_deltas"] == {"isd": {"tiny_arithmetic": 0.0, "tiny_code": 0.0}}
    metrics = json.loads(cfg.out("gate", "metrics.json").read_text())
    assert metrics["passed"] is False and set(metrics["speedup"]["isd"]) == {"c1", "c2"}
    assert metrics["speedup"]["isd"]["c1"] == pytest.approx(
        report["measurements"]["isd"]["1"]["per_request_tok_s"]
        / report["measurements"]["ar"]["1"]["per_request_tok_s"], rel=1e-3)
    markdown = cfg.out("gate", "report.md").read_text()
    assert markdown.startswith("# Gate: FAIL") and "Registry alias untouched." in markdown
    assert cfg.out("gate", "throughput_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_inputs_fail_before_any_server_starts(outputs: Path, tmp_path: Path) -> None:
    from idlm.serving.gate import run

    base = [f"outputs={outputs}", "gate.arms={ar: {}, isd: {}}"]
    cfg = config.load_profile("tiny", [*base, "gate.arms.isd.model=/nonexistent/model"])
    with pytest.raises(StageError, match="arm 'isd' needs a model folder at /nonexistent"):
        run(cfg)
    # A prompt file the user names is checked with the config; one a stage makes (under
    # the outputs folder) by the gate, when it runs.
    with pytest.raises(config.ConfigError, match="'gate.prompt_file'.*none.jsonl' not found"):
        config.load_profile("tiny", [*base, f"gate.prompt_file={tmp_path}/none.jsonl"])
    cfg = config.load_profile("tiny", [*base, f"gate.prompt_file={outputs}/none.jsonl"])
    with pytest.raises(StageError, match="gate.prompt_file .*none.jsonl not found"):
        run(cfg)
    assert not (outputs / "none.jsonl").exists()
