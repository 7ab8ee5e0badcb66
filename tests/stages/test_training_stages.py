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


def test_ic_runs_the_curriculum_and_resumes_a_killed_phase(trained: dict) -> None:
    cfg: Config = trained["cfg"]
    assert trained["ic_killed"] == {"finished": False, "phase": "phase1-N3"}
    phases = trained["ic"]["phases"]
    assert [p["stride"] for p in phases] == [2, 3, 4]
    assert [p["alpha"] for p in phases][:2] == [0.2, 0.2]
    assert phases[2]["alpha"] == pytest.approx(phases[2]["mask_ce"] / phases[2]["clean_ce"],
                                               rel=1e-4)
    # The killed phase logged steps 1-2 (checkpoint at 2), resumed there, and ended at 6.
    log = cfg.out("ic", "checkpoints", "phase1-N3", "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4, 5, 6]
    assert _names(cfg.out("ic")) == ["checkpoints", "history.json", "loss.png", "metrics.json",
                                    "model"]
    metrics = json.loads(cfg.out("ic", "metrics.json").read_text())
    assert list(metrics["phases"]) == ["phase0-N2", "phase1-N3", "phase2-N4"]
    final = cfg.out("ic", "model", "model.safetensors").read_bytes()
    last_phase = cfg.out("ic", "checkpoints", "phase2-N4", "final", "model.safetensors")
    assert final == last_phase.read_bytes()


def test_rerun_of_finished_ic_trains_nothing(trained: dict) -> None:
    cfg: Config = trained["cfg"]
    stamp = cfg.out("ic", "checkpoints", "phase0-N2", "final", "model.safetensors")
    before = stamp.stat().st_mtime_ns
    again = ic.run(cfg)
    assert [p["stride"] for p in again["phases"]] == [2, 3, 4]
    assert stamp.stat().st_mtime_ns == before


def test_lora_adapter_keeps_clean_rows_exact(trained: dict) -> None:
    from idlm.data.prepare import load_tokenizer
    from idlm.data.tokenizer import mask_token_id
    from idlm.model.factory import load_causal_lm
    from idlm.model.gated_lora import load_gated_lora

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
