"""Checkpoint resolution: local dirs in place, hub ids via an offline HF cache, clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from idlm.model.hub import (
    UNHASHED_PREFIX,
    CheckpointError,
    ResolvedCheckpoint,
    check_mask_row,
    manifest_fingerprint,
    resolve_checkpoint,
    to_json,
)

COMMIT_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    checkpoint_dir = tmp_path_factory.mktemp("checkpoint")
    Qwen3ForCausalLM(config).save_pretrained(checkpoint_dir)
    (checkpoint_dir / "notes.bin").write_bytes(b"not part of the checkpoint")
    return checkpoint_dir


def copy_of(checkpoint_dir: Path, destination: Path) -> Path:
    shutil.copytree(checkpoint_dir, destination)
    return destination


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_checkpoint_is_used_in_place_and_hashed(saved_checkpoint: Path) -> None:
    resolved = resolve_checkpoint(str(saved_checkpoint))
    assert resolved.path == saved_checkpoint.resolve()
    assert (resolved.source, resolved.repo_id, resolved.commit_sha) == ("local", None, None)
    assert sorted(resolved.files) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    for name, digest in resolved.files.items():
        assert digest == sha256_of(saved_checkpoint / name)
    manifest = "".join(f"{name}\t{resolved.files[name]}\n" for name in sorted(resolved.files))
    assert resolved.fingerprint == hashlib.sha256(manifest.encode()).hexdigest()
    pin = to_json(resolved)
    assert json.loads(json.dumps(pin)) == pin and pin["fingerprint"] == resolved.fingerprint


def test_skipping_weight_hashes_records_sizes(saved_checkpoint: Path) -> None:
    resolved = resolve_checkpoint(str(saved_checkpoint), hash_weights=False)
    weights_size = (saved_checkpoint / "model.safetensors").stat().st_size
    assert resolved.files["model.safetensors"] == f"{UNHASHED_PREFIX}{weights_size}"
    assert resolved.files["config.json"] == sha256_of(saved_checkpoint / "config.json")
    assert resolved.fingerprint == manifest_fingerprint(resolved.files)


def build_hf_cache(cache_dir: Path, checkpoint_dir: Path) -> Path:
    """The on-disk layout snapshot_download reads: refs/main -> snapshots/<sha>/files."""
    repo_dir = cache_dir / "models--tiny-org--tiny-qwen3"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT_SHA)
    snapshot = repo_dir / "snapshots" / COMMIT_SHA
    return copy_of(checkpoint_dir, snapshot)


@pytest.fixture
def offline_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # huggingface_hub reads these variables at import; patch the values it actually uses.
    cache_dir = tmp_path / "hf-cache"
    cache_dir.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache_dir


def test_hub_id_resolves_offline_from_the_cache(saved_checkpoint: Path, offline_hub_cache: Path):
    snapshot = build_hf_cache(offline_hub_cache, saved_checkpoint)
    resolved = resolve_checkpoint("tiny-org/tiny-qwen3")
    assert isinstance(resolved, ResolvedCheckpoint)
    assert resolved.path.resolve() == snapshot.resolve()
    assert (resolved.source, resolved.repo_id) == ("hub", "tiny-org/tiny-qwen3")
    assert (resolved.revision, resolved.commit_sha) == ("main", COMMIT_SHA)
    assert resolved.fingerprint == resolve_checkpoint(str(saved_checkpoint)).fingerprint
    assert resolve_checkpoint("tiny-org/tiny-qwen3", revision=COMMIT_SHA).path == resolved.path


def test_hub_id_missing_from_an_offline_cache_fails_clearly(offline_hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match="hub is unreachable.*HF cache"):
        resolve_checkpoint("tiny-org/not-cached")


def test_missing_path_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint path .* not found"):
        resolve_checkpoint(str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match="revision 'main' applies to hub ids"):
        resolve_checkpoint(str(tmp_path), revision="main")


def test_directory_without_config_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))


def test_checkpoint_without_weights_fails_clearly(saved_checkpoint: Path, tmp_path: Path):
    checkpoint_dir = copy_of(saved_checkpoint, tmp_path / "checkpoint")
    (checkpoint_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        resolve_checkpoint(str(checkpoint_dir))


def test_truncated_weights_fail_clearly(saved_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint_dir = copy_of(saved_checkpoint, tmp_path / "checkpoint")
    weights = checkpoint_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors"):
        resolve_checkpoint(str(checkpoint_dir))


def test_missing_shard_named_in_the_index_fails_clearly(saved_checkpoint: Path, tmp_path):
    checkpoint_dir = copy_of(saved_checkpoint, tmp_path / "checkpoint")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="misses 1 weight shard"):
        resolve_checkpoint(str(checkpoint_dir))


def test_mask_row_must_exist_in_the_embedding() -> None:
    qwen3_vocab = Qwen3Config(vocab_size=151936)
    check_mask_row(qwen3_vocab, 151669)
    check_mask_row({"vocab_size": 151936}, 151935)
    with pytest.raises(CheckpointError, match="mask token id 151936 is not a row"):
        check_mask_row(qwen3_vocab, 151936)
    with pytest.raises(CheckpointError, match="not a row"):
        check_mask_row(qwen3_vocab, -1)
