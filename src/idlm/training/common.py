"""What the training stages share: inputs from upstream stages, fingerprints, saving."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from idlm.config import Config, TrainSettings
from idlm.errors import StageError
from idlm.stage import atomic_dir
from idlm.training.batches import Rows, ar_batch, ic_batch


@dataclass
class StageInputs:
    """Tokenizer, special ids and data rows prepared upstream, plus where to run."""

    tokenizer: Any
    mask_token_id: int
    pad_token_id: int
    train: Rows
    heldout: Rows
    data_fingerprint: str
    device: str
    attention: str


def load_inputs(cfg: Config, device: str) -> StageInputs:
    from idlm.data.prepare import load_split, load_tokenizer
    from idlm.data.tokenizer import mask_token_id
    from idlm.model.factory import attention_implementation

    tokenizer = load_tokenizer(cfg)
    train, heldout = load_split(cfg, "train"), load_split(cfg, "eval")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mask_id = cfg.model.mask_token_id if cfg.model.mask_token_id is not None else mask_token_id(
        tokenizer)
    fingerprint = fingerprint_of(train._fingerprint, heldout._fingerprint, len(tokenizer))
    return StageInputs(tokenizer, mask_id, pad, Rows.from_dataset(train),
                       Rows.from_dataset(heldout), fingerprint, device,
                       attention_implementation(cfg.model.attention, device))


def fingerprint_of(*parts: Any) -> str:
    """A stable hash of anything JSON-serialisable (configs, upstream hashes)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_pin_path(cfg: Config) -> Path:
    return cfg.out("base", "base.json")


def read_base_pin(cfg: Config) -> dict[str, Any]:
    path = base_pin_path(cfg)
    if not path.is_file():
        raise StageError(f"{path} not found: run `dvc repro base` first")
    return json.loads(path.read_text())


def base_model_path(cfg: Config, pin: dict[str, Any]) -> Path:
    """Tiny pins are relative to the outputs folder; resolved checkpoints are absolute."""
    path = cfg.out(pin["path"]) if pin["kind"] == "tiny" else Path(pin["path"])
    if not path.exists():
        raise StageError(f"base model folder {path} is missing: rerun `dvc repro base`")
    return path


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """HF folder (safetensors + config + tokenizer), replaced in one rename."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def copy_tree(source: Path, target: Path) -> Path:
    with atomic_dir(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return target


@torch.no_grad()
def heldout_losses(model: torch.nn.Module, inputs: StageInputs, stride: int | None,
                   limit: int = 256, batch_size: int = 32) -> dict[str, float]:
    """Held-out AR loss (the quality check after every phase) and MASK loss at ``stride``."""
    from idlm.objective import ar_loss, ic_loss

    was_training = model.training
    model.eval()
    count = min(limit, len(inputs.heldout))
    sums = {"heldout_ar_loss": 0.0, "heldout_mask_loss": 0.0}
    for first in range(0, count, batch_size):
        indices = list(range(first, min(first + batch_size, count)))
        batch = ar_batch(inputs.heldout, indices, inputs.pad_token_id)
        loss = ar_loss(model, batch["input_ids"].to(inputs.device),
                       batch["labels"].to(inputs.device))
        sums["heldout_ar_loss"] += float(loss) * len(indices)
        if stride is not None:
            ic = ic_batch(inputs.heldout, indices, stride, inputs.mask_token_id,
                          inputs.pad_token_id, [0] * len(indices)).to(inputs.device)
            mask_loss = ic_loss(model, ic, 0.0, inputs.attention, _dtype(model)).mask_ce
            sums["heldout_mask_loss"] += float(mask_loss) * len(indices)
    model.train(was_training)
    result = {k: v / max(count, 1) for k, v in sums.items()}
    if stride is None:
        result.pop("heldout_mask_loss")
    return result


def heldout_accuracy(cfg: Config, model: torch.nn.Module, inputs: StageInputs,
                     per_kind: int) -> dict[str, float]:
    """AR greedy answer accuracy per held-out kind (``accuracy_<kind>``); {} when off."""
    from idlm.training.diagnostics import heldout_accuracy as measure

    return measure(model, inputs.tokenizer, inputs.mask_token_id, inputs.pad_token_id,
                   cfg.out("prepare", "eval_items.jsonl"), per_kind)


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def batch_for_world(opt: TrainSettings, world: int) -> TrainSettings:
    """``opt`` with ``grad_accum`` derived from ``global_batch_size`` for this world size
    (unchanged when no global batch is set): the same rows per step on any topology."""
    if opt.global_batch_size is None:
        return opt
    per_micro_step = opt.micro_batch_size * world
    if opt.global_batch_size % per_micro_step:
        raise StageError(f"global_batch_size {opt.global_batch_size} is not a multiple of "
                         f"micro_batch_size {opt.micro_batch_size} x {world} ranks: change one "
                         "of them (or cluster.nodes / gpus_per_node)")
    return opt.model_copy(update={"grad_accum": opt.global_batch_size // per_micro_step})

