"""What the ``prepare`` stage (:mod:`idlm.stages.prepare`) wrote, read back for later
stages: the tokenized splits (checked against their manifest, so a truncated shard is
caught), the tokenizer and the held-out items. Heavy libraries are imported inside
functions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from idlm.config import Config
from idlm.errors import StageError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

Split = Literal["train", "eval"]
COLUMNS = ("input_ids", "prompt_length", "kind")
MANIFEST = "manifest.json"
RERUN = "run `dvc repro prepare` first"


def read_shard(path: Path) -> Any:
    """The shard's Arrow table, memory-mapped: no copy even for multi-GB shards."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


# ---------------------------------------------------------------- readers for later stages
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_split(path: Path) -> None:
    """Every shard the manifest lists is present, whole and readable, or a one-line error."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        shards = manifest["shards"]
    except (OSError, ValueError, KeyError):
        raise StageError(f"{manifest_path}: missing or unreadable; the split is incomplete: "
                         f"rerun `dvc repro prepare`") from None
    for name, expected in shards.items():
        shard = path / name
        problem = ""
        if not shard.is_file():
            problem = "missing"
        elif shard.stat().st_size != expected["bytes"]:
            problem = f"{shard.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
        elif "sha256" in expected and sha256_of(shard) != expected["sha256"]:
            # Size and row count survive a flipped byte inside the Arrow data; the hash does not.
            problem = "contents differ from the sha256 prepare recorded"
        else:
            try:
                rows = read_shard(shard).num_rows
                problem = "" if rows == expected["rows"] else (
                    f"{rows} rows, expected {expected['rows']}")
            except Exception as exc:  # pyarrow raises several types for a damaged file
                problem = f"unreadable ({type(exc).__name__})"
        if problem:
            raise StageError(f"{shard}: corrupt or truncated shard: {problem}; "
                             f"rerun `dvc repro prepare`")


def load_split(cfg: Config, split: Split) -> Dataset:
    """A verified train or eval split with columns ``input_ids``, ``prompt_length``, ``kind``."""
    from datasets import load_from_disk

    path = cfg.out("prepare", split)
    if not (path / "state.json").is_file():
        raise StageError(f"{path}: no prepared '{split}' split; {RERUN}")
    verify_split(path)
    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:
        raise StageError(f"{path}: cannot load the '{split}' split ({type(exc).__name__}); "
                         f"rerun `dvc repro prepare`") from None
    missing = [column for column in COLUMNS if column not in dataset.column_names]
    if missing:
        raise StageError(f"{path}: columns {missing} missing; rerun `dvc repro prepare`")
    return dataset


def load_tokenizer(cfg: Config) -> PreTrainedTokenizerBase:
    """The prepared tokenizer; it always has a MASK token (checked)."""
    from transformers import AutoTokenizer

    from idlm.data.tokenizer import mask_token_id

    path = cfg.out("prepare", "tokenizer")
    if not (path / "tokenizer_config.json").is_file():
        raise StageError(f"{path}: no prepared tokenizer; {RERUN}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise StageError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); "
                         f"rerun `dvc repro prepare`") from None
    mask_token_id(tokenizer)
    return tokenizer


def load_eval_items(cfg: Config) -> list[dict[str, Any]]:
    """The held-out items (prompt, messages, reference, meta) written by prepare."""
    path = cfg.out("prepare", "eval_items.jsonl")
    if not path.is_file():
        raise StageError(f"{path}: no held-out items; {RERUN}")
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]
