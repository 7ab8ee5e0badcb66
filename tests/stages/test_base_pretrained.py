"""The base stage on a pretrained checkpoint: resolved, hashed and pinned, never copied."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from idlm.config import load_profile
from idlm.errors import StageError
from idlm.stages import base
from tests.conftest import tiny_qwen3


def test_pretrained_base_is_pinned(tmp_path: Path) -> None:
    checkpoint = tmp_path / "Qwen3-tiny"
    tiny_qwen3().save_pretrained(checkpoint)
    cfg = load_profile("qwen3-8b", [f"outputs={tmp_path / 'out'}",
                                    f"model.name_or_path={checkpoint}", "model.revision=null",
                                    "model.mask_token_id=100"])
    metrics = base.run(cfg)
    pin = json.loads(cfg.out("base", "base.json").read_text())
    weights = (checkpoint / "model.safetensors").read_bytes()
    assert pin["kind"] == "pretrained" and pin["source"] == "local"
    assert Path(pin["path"]) == checkpoint
    assert pin["files"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    assert metrics["fingerprint"] == pin["fingerprint"] and metrics["vocab_size"] == 128
    assert not any(p.suffix == ".safetensors" for p in cfg.out("base").rglob("*"))
    assert json.loads(cfg.out("base", "model", "checkpoint.json").read_text()) == pin


def test_mask_row_outside_the_embedding_is_refused(tmp_path: Path) -> None:
    checkpoint = tmp_path / "Qwen3-tiny"
    tiny_qwen3().save_pretrained(checkpoint)
    cfg = load_profile("qwen3-8b", [f"outputs={tmp_path / 'out'}",
                                    f"model.name_or_path={checkpoint}", "model.revision=null",
                                    "model.mask_token_id=151669"])
    with pytest.raises(StageError, match="151669"):
        base.run(cfg)
    assert not cfg.out("base", "base.json").exists()
