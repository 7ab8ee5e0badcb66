"""base -> ic -> lora in process on a very small config: files, curriculum, resume, gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idlm.config import Config
from idlm.data.prepare import load_split
from idlm.training import ic


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_base_writes_model_pin_metrics_and_plot(trained: dict) -> None:
    cfg: Config = trained["cfg"]
    assert _names(cfg.out("base")) == ["base.json", "checkpoints", "history.json", "loss.png",
                                      "metrics.json", "model"]
    pin = json.loads(cfg.out("base", "base.json").read_text())
    assert pin["kind"] == "tiny" and pin["path"] == "base/model"
    metrics = json.loads(cfg.out("base", "metrics.json").read_text())
    history = json.loads(cfg.out("base", "history.json").read_text())
    assert metrics["steps"] == 30 and len(history) == 3  # logged every 10 steps
    assert history[-1]["loss"] < history[0]["loss"]
    assert metrics["heldout_ar_loss"] > 0
    assert {f"accuracy_{k}" for k in ("arithmetic", "multiple_choice", "code", "instruction")
            } <= set(metrics)


def test_ic_runs_the_curriculum_as_one_run_and_resumes_across_a_phase_boundary(
        trained: dict) -> None:
    cfg: Config = trained["cfg"]
    assert trained["ic_killed"] == {"finished": False, "steps": 5}
    phases = trained["ic"]["phases"]
    assert [(p["stride"], p["steps"]) for p in phases] == [(2, 6), (3, 12), (4, 18)]
    assert [p["alpha"] for p in phases][:2] == [0.2, 0.2]
    assert phases[2]["alpha"] == pytest.approx(phases[2]["mask_ce"] / phases[2]["clean_ce"],
                                               rel=1e-4)
    # One log for the whole curriculum: steps 1-5, resumed at the step-4 checkpoint.
    log = [json.loads(line) for line in
           cfg.out("ic", "checkpoints", "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 19))
    assert [int(e["stride"]) for e in log] == [2] * 6 + [3] * 6 + [4] * 6
    # One schedule: warmup once, then the lr only falls, across both boundaries.
    lrs = [e["lr"] for e in log]
    peak = lrs.index(max(lrs))
    assert peak < 6 and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:], strict=False))
    assert all(e["grad_norm"] > 0 for e in log)
    assert _names(cfg.out("ic")) == ["checkpoints", "history.json", "loss.png", "metrics.json",
                                    "model"]
    metrics = json.loads(cfg.out("ic", "metrics.json").read_text())
    assert list(metrics["phases"]) == ["phase0-N2", "phase1-N3", "phase2-N4"]
    for record in metrics["phases"].values():
        assert {"heldout_ar_loss", "heldout_mask_loss", "accuracy_arithmetic"} <= set(record)
    assert 0.0 <= metrics["accuracy_arithmetic"] <= 1.0


def test_resume_across_a_phase_boundary_gives_the_uninterrupted_weights(
        trained: dict, tmp_path: Path) -> None:
    import shutil

    cfg: Config = trained["cfg"]
    other = cfg.model_copy(update={"outputs": str(tmp_path)})
    for stage in ("prepare", "base"):
        shutil.copytree(cfg.out(stage), other.out(stage))
    ic.run(other)  # never killed
    name = "model.safetensors"
    assert other.out("ic", "model", name).read_bytes() == cfg.out("ic", "model", name).read_bytes()


def test_rerun_of_finished_ic_trains_nothing(trained: dict) -> None:
    cfg: Config = trained["cfg"]
    stamp = cfg.out("ic", "model", "model.safetensors")
    log = cfg.out("ic", "checkpoints", "log.jsonl")
    before = log.read_text()
    again = ic.run(cfg)
    assert [p["stride"] for p in again["phases"]] == [2, 3, 4]
    assert log.read_text() == before and stamp.is_file()


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
