"""base -> ic -> lora of the trained workspace: files, curriculum, resume, the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idlm.config import Config
from idlm.data.prepare import load_split
from idlm.stages import ic


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_base_writes_model_pin_metrics_and_plot(trained: dict) -> None:
    cfg: Config = trained["cfg"]
    assert _names(cfg.out("base")) == ["base.json", "checkpoints", "history.json", "loss.png",
                                      "metrics.json", "model"]
    pin = json.loads(cfg.out("base", "base.json").read_text())
    assert pin["kind"] == "tiny" and pin["path"] == "base/model"
    metrics = trained["base"]
    history = json.loads(cfg.out("base", "history.json").read_text())
    assert metrics["steps"] == 6 and len(history) == 3  # logged every 2 steps
    assert history[-1]["loss"] < history[0]["loss"]
    assert metrics["heldout_ar_loss"] > 0
    assert {f"accuracy_{k}" for k in ("arithmetic", "multiple_choice", "code", "instruction")
            } <= set(metrics)
    # Multiple choice also per question type (the test profile scores one item per kind).
    assert [k for k in metrics if k.startswith("accuracy_multiple_choice_")]


def _ic_log(cfg: Config) -> list[dict]:
    return [json.loads(line) for line in
            cfg.out("ic", "checkpoints", "log.jsonl").read_text().splitlines()]


def test_ic_runs_the_curriculum_as_one_run_and_a_rerun_trains_nothing(trained: dict) -> None:
    cfg: Config = trained["cfg"]
    log = cfg.out("ic", "checkpoints", "log.jsonl")
    before = log.read_text()
    phases = ic.run(cfg)["phases"]  # finished: reports its phases, trains nothing
    assert log.read_text() == before and cfg.out("ic", "model", "model.safetensors").is_file()
    assert [(p["stride"], p["steps"]) for p in phases] == [(2, 2), (3, 4), (4, 6)]
    assert [p["alpha"] for p in phases][:2] == [0.2, 0.2]
    assert phases[2]["alpha"] == pytest.approx(phases[2]["mask_ce"] / phases[2]["clean_ce"],
                                               rel=1e-4)
    entries = _ic_log(cfg)
    assert [e["step"] for e in entries] == list(range(1, 7))
    assert [int(e["stride"]) for e in entries] == [2, 2, 3, 3, 4, 4]
    # One schedule: warmup once, then the lr only falls, across both boundaries.
    lrs = [e["lr"] for e in entries]
    peak = lrs.index(max(lrs))
    assert peak < 3 and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:], strict=False))
    assert all(e["grad_norm"] > 0 for e in entries)
    assert _names(cfg.out("ic")) == ["checkpoints", "history.json", "loss.png", "metrics.json",
                                    "model"]
    metrics = trained["ic"]
    assert list(metrics["phases"]) == ["phase0-N2", "phase1-N3", "phase2-N4"]
    for record in metrics["phases"].values():
        assert {"heldout_ar_loss", "heldout_mask_loss", "accuracy_arithmetic"} <= set(record)
    assert 0.0 <= metrics["accuracy_arithmetic"] <= 1.0


def test_ic_killed_in_phase_n2_resumes_across_the_boundary_to_the_uninterrupted_weights(
        trained: dict, tmp_path: Path) -> None:
    import shutil

    cfg: Config = trained["cfg"]
    other = cfg.model_copy(update={"outputs": str(tmp_path)})
    for stage in ("prepare", "base"):
        shutil.copytree(cfg.out(stage), other.out(stage))
    # Killed after step 1 (its checkpoint), so the resumed run crosses N=2 -> N=3 at step 3.
    assert ic.run(other, stop_after=1) == {"finished": False, "steps": 1}
    resumed = ic.run(other)
    assert [p["steps"] for p in resumed["phases"]] == [2, 4, 6]
    # One log for the whole curriculum: step 1, then 2-6 from the step-1 checkpoint.
    assert [e["step"] for e in _ic_log(other)] == list(range(1, 7))
    # The same bytes as the workspace's uninterrupted run (a `dvc repro` subprocess).
    name = "model.safetensors"
    assert other.out("ic", "model", name).read_bytes() == cfg.out("ic", "model", name).read_bytes()


def test_lora_adapter_keeps_clean_rows_exact(trained: dict) -> None:
    from idlm.data.prepare import load_tokenizer
    from idlm.data.tokenizer import mask_token_id
    from idlm.model.adapter_files import load_gated_lora
    from idlm.model.factory import load_causal_lm

    cfg: Config = trained["cfg"]
    assert (cfg.out("lora", "adapter", "adapter_model.safetensors")).is_file()
    assert trained["lora"]["heldout_ar_loss"] == trained["base"]["heldout_ar_loss"]
    mask_id = mask_token_id(load_tokenizer(cfg))
    row = load_split(cfg, "eval")[0]
    ids = torch.tensor([row["input_ids"][:row["prompt_length"] + 2] + [mask_id] * 3])
    base_model = load_causal_lm(cfg.out("base", "model"))
    adapted = load_gated_lora(load_causal_lm(cfg.out("base", "model")), cfg.out("lora", "adapter"))
    with torch.no_grad():
        expected, got = base_model(input_ids=ids).logits, adapted(input_ids=ids).logits
    clean = ids[0] != mask_id
    assert torch.equal(got[0, clean], expected[0, clean])
    assert not torch.equal(got[0, ~clean], expected[0, ~clean])
