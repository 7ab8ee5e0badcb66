"""Gated-LoRA adapter folders: the base fingerprint, saving and loading.

An adapter folder is PEFT's files plus ``idlm_gate.json`` (the gate rule, the MASK id and
the fingerprint of the base it was trained on) and, when trained, the MASK-embedding
delta. Loading refuses another base, a changed gate rule or a damaged file in one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from idlm.model.base_weights import WEIGHTS_FIELD, weights_fingerprint
from idlm.model.gated_lora import (
    ADAPTER_FILES,
    ARCHITECTURE_FIELDS,
    CHECKPOINT_HASH_FIELD,
    GATE_FILE,
    GATE_FORMAT,
    GATE_RULE,
    MASK_EMBEDDING_FILE,
    MASK_EMBEDDING_KEY,
    GatedLinear,
    GatedLoraError,
    _install_gate,
    find_token_gate,
)


def base_fingerprint(model: nn.Module, checkpoint_hash: str | None = None,
                     weights_dir: str | Path | None = None,
                     known_digests: dict[str, str] | None = None) -> dict[str, Any]:
    """Fields that must match for an adapter to fit a base model: the architecture, the
    run's checkpoint hash and the sha256 of the weight files in ``weights_dir``, the folder
    the base was loaded from (``known_digests``: a hub pin's file hashes, not re-read)."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    config = model.config
    fingerprint: dict[str, Any] = {
        field: getattr(config, field, None) for field in ARCHITECTURE_FIELDS
    }
    if checkpoint_hash is not None:
        fingerprint[CHECKPOINT_HASH_FIELD] = checkpoint_hash
    if weights_dir is not None:
        fingerprint[WEIGHTS_FIELD] = weights_fingerprint(weights_dir, known_digests)
    return fingerprint


def save_gated_lora(
    model: PeftModel, out_dir: str | Path, base_fingerprint: dict[str, Any]
) -> Path:
    """Write the adapter in PEFT format plus ``idlm_gate.json`` (gate rule, base fingerprint)
    and, when the model has one, the MASK-embedding delta (named in the gate record)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    token_gate = find_token_gate(model)
    gate_record = {
        "format": GATE_FORMAT,
        "mask_token_id": token_gate.mask_token_id,
        "gate_rule": GATE_RULE,
        "base_fingerprint": base_fingerprint,
    }
    if token_gate.mask_embedding is not None:
        gate_record["mask_embedding"] = MASK_EMBEDDING_FILE
    # Stage in a sibling temp dir, then move file by file: a reader never sees a half file,
    # and idlm_gate.json (the marker that the adapter is complete) lands last.
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as staging:
        model.save_pretrained(staging)
        if token_gate.mask_embedding is not None:
            # float32 holds a bf16- or fp32-trained delta exactly.
            delta = token_gate.mask_embedding.delta.detach().float().cpu().contiguous()
            save_file({MASK_EMBEDDING_KEY: delta}, str(Path(staging) / MASK_EMBEDDING_FILE))
        (Path(staging) / GATE_FILE).write_text(json.dumps(gate_record, indent=2) + "\n")
        for name in sorted(os.listdir(staging), key=lambda name: name == GATE_FILE):
            os.replace(Path(staging) / name, out_dir / name)
    return out_dir


def load_gated_lora(
    base_model: nn.Module,
    adapter_dir: str | Path,
    base_fingerprint: dict[str, Any] | None = None,
    is_trainable: bool = False,
) -> PeftModel:
    """Load a saved gated LoRA onto ``base_model``, refusing an adapter made for another base."""
    adapter_dir = Path(adapter_dir)
    gate_record = _read_gate_record(adapter_dir)
    expected = _expected_fingerprint(base_model, base_fingerprint)
    _check_fingerprint(adapter_dir, gate_record["base_fingerprint"], expected)
    _check_safetensors_header(adapter_dir / "adapter_model.safetensors")
    delta = _read_mask_embedding(adapter_dir, gate_record, expected["hidden_size"])
    lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    lora_config._register_custom_module({nn.Linear: GatedLinear})
    peft_model = PeftModel.from_pretrained(
        base_model, str(adapter_dir), config=lora_config, is_trainable=is_trainable
    )
    token_gate = _install_gate(peft_model, int(gate_record["mask_token_id"]), delta is not None)
    if token_gate.mask_embedding is not None:
        parameter = token_gate.mask_embedding.delta
        with torch.no_grad():
            parameter.copy_(delta.to(parameter.device, parameter.dtype))
        parameter.requires_grad_(is_trainable)
    return peft_model


def _read_gate_record(adapter_dir: Path) -> dict[str, Any]:
    if not adapter_dir.is_dir():
        raise GatedLoraError(f"adapter directory {adapter_dir} not found: run the lora stage first")
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise GatedLoraError(
            f"{adapter_dir} is not a complete gated-LoRA adapter (missing {', '.join(missing)}): "
            "re-run the lora stage or point at a directory written by save_gated_lora"
        )
    try:
        gate_record = json.loads((adapter_dir / GATE_FILE).read_text())
        if gate_record.get("format") != GATE_FORMAT or gate_record.get("gate_rule") != GATE_RULE:
            raise ValueError(f"unknown format/gate rule {gate_record.get('format')!r}")
        int(gate_record["mask_token_id"])
        dict(gate_record["base_fingerprint"])
        if gate_record.get("mask_embedding", MASK_EMBEDDING_FILE) != MASK_EMBEDDING_FILE:
            raise ValueError(f"unknown mask_embedding file {gate_record['mask_embedding']!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise GatedLoraError(
            f"{adapter_dir / GATE_FILE} is corrupt ({error}): re-run the lora stage"
        ) from None
    return gate_record


def _read_mask_embedding(
    adapter_dir: Path, gate_record: dict[str, Any], hidden_size: int
) -> torch.Tensor | None:
    """The saved MASK-embedding delta, or None for an adapter saved without one (= zero)."""
    from safetensors.torch import load_file

    if "mask_embedding" not in gate_record:
        return None
    path = adapter_dir / MASK_EMBEDDING_FILE
    if not path.is_file():
        raise GatedLoraError(
            f"{adapter_dir} is not a complete gated-LoRA adapter (missing {MASK_EMBEDDING_FILE},"
            f" which {GATE_FILE} names): re-run the lora stage"
        )
    _check_safetensors_header(path)
    delta = load_file(str(path)).get(MASK_EMBEDDING_KEY)
    if delta is None or tuple(delta.shape) != (hidden_size,):
        found = None if delta is None else tuple(delta.shape)
        raise GatedLoraError(
            f"{path} is corrupt (expected {MASK_EMBEDDING_KEY} of shape ({hidden_size},), "
            f"found {found}): re-run the lora stage"
        )
    return delta


def _expected_fingerprint(base_model: nn.Module, given: dict[str, Any] | None) -> dict[str, Any]:
    actual = base_fingerprint(base_model)
    if given is None:
        return actual
    differing = [field for field in ARCHITECTURE_FIELDS if given.get(field) != actual[field]]
    if differing:
        raise GatedLoraError(
            f"the base_fingerprint passed does not describe the base model given ({differing[0]}:"
            f" {given.get(differing[0])!r} vs {actual[differing[0]]!r})"
        )
    return {**actual, **given}


def _check_fingerprint(adapter_dir: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    fields = [*ARCHITECTURE_FIELDS]
    if CHECKPOINT_HASH_FIELD in saved and CHECKPOINT_HASH_FIELD in expected:
        fields.append(CHECKPOINT_HASH_FIELD)
    for field in fields:
        if saved.get(field) != expected.get(field):
            raise GatedLoraError(
                f"adapter {adapter_dir} was made for another base model ({field}: adapter "
                f"{saved.get(field)!r}, base {expected.get(field)!r}): train it on this base"
            )


def _check_safetensors_header(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise GatedLoraError(
            f"{path} is corrupt ({type(error).__name__}): re-run the lora stage"
        ) from None
