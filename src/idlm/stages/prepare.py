"""The ``prepare`` stage: corpus (tiny) or SFT dataset (real) -> tokenizer + tokenized shards.

Outputs, all under ``cfg.out("prepare")`` and each written atomically:

- ``tokenizer/``       HF tokenizer (``AutoTokenizer.from_pretrained``), MASK registered
- ``train/``, ``eval/`` ``Dataset.save_to_disk`` shards with ``input_ids`` (int32 list),
                       ``prompt_length`` (int32) and ``kind`` (string); the response is
                       ``input_ids[prompt_length:]`` and ends with eos (``<|im_end|>``).
                       Each folder also holds ``manifest.json`` (rows, bytes and sha256 per shard)
                       so a truncated shard is caught by :func:`load_split`.
- ``eval_items.jsonl`` held-out items (id, kind, prompt, messages, reference, meta)
- ``metrics.json``     rows/tokens per split, rejected rows by reason, vocab, MASK id

Downstream stages read them with ``idlm.data.prepare``'s :func:`load_split`,
:func:`load_tokenizer` and :func:`load_eval_items`. Heavy libraries are imported inside functions.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idlm.config import Config
from idlm.data.prepare import COLUMNS, MANIFEST, read_shard, sha256_of
from idlm.errors import StageError
from idlm.stage import atomic_dir, write_json_atomic

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


def _log(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- sources
@dataclass
class Sources:
    """Untokenized conversations; ``held_out`` is None when eval is split off ``rows``."""

    rows: Dataset
    messages_field: str
    held_out: Dataset | None = None
    eval_items: list[dict[str, Any]] = field(default_factory=list)


def _synthetic_sources(cfg: Config) -> Sources:
    """Generated train/eval conversations and the held-out items they came from."""
    from datasets import Dataset

    from idlm.data.synthetic import generate_splits, to_messages

    spec = cfg.prepare.synthetic
    started = time.perf_counter()
    train_items, eval_items = generate_splits(spec.train_size, spec.eval_size, spec.mix,
                                              cfg.seed, progress=sys.stderr.isatty(),
                                              eval_mix=spec.eval_mix)
    _log(f"generated {len(train_items)} train + {len(eval_items)} eval items "
         f"in {time.perf_counter() - started:.1f}s")

    def rows(items: list[Any]) -> Dataset:
        return Dataset.from_dict({"messages": [to_messages(item) for item in items],
                                  "kind": [item["kind"] for item in items]})

    held_out = [{"id": item["id"], "kind": item["kind"], "prompt": item["prompt"],
                 "messages": to_messages(item)[:1], "reference": item["reference"],
                 "meta": item["meta"]} for item in eval_items]
    return Sources(rows(train_items), "messages", rows(eval_items), held_out)


def _hub_sources(cfg: Config) -> Sources:
    from idlm.data.sft import load_sft_source

    rows = load_sft_source(cfg.prepare.dataset)
    _log(f"loaded {len(rows)} rows from {cfg.prepare.dataset.name_or_path}")
    return Sources(rows, cfg.prepare.dataset.messages_field)


def _training_texts(dataset: Dataset, messages_field: str) -> Iterator[str]:
    from idlm.data.sft import normalise_messages
    from idlm.data.tokenizer import chat_texts

    for batch in dataset.select_columns([messages_field]).iter(batch_size=1000):
        for raw in batch[messages_field]:
            messages, reason = normalise_messages(raw)
            if not reason:
                yield from chat_texts(messages)


# ---------------------------------------------------------------- writing
def _shard_lengths(tables: list[Any]) -> tuple[Any, Any]:
    """(total tokens, prompt tokens) per row, straight from Arrow (no Python lists)."""
    import numpy as np
    import pyarrow.compute as pc

    totals = [pc.list_value_length(t.column("input_ids")).to_numpy() for t in tables]
    prompts = [t.column("prompt_length").to_numpy() for t in tables]
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(totals or [empty]).astype(np.int64),
            np.concatenate(prompts or [empty]).astype(np.int64))


def _split_stats(tables: list[Any], num_shards: int) -> dict[str, Any]:
    total, prompt = _shard_lengths(tables)
    response, rows = total - prompt, len(total)
    return {
        "rows": rows,
        "shards": num_shards,
        "tokens": int(total.sum()),
        "response_tokens": int(response.sum()),
        "mean_prompt_tokens": round(float(prompt.mean()), 2) if rows else 0.0,
        "mean_response_tokens": round(float(response.mean()), 2) if rows else 0.0,
        "max_tokens": int(total.max()) if rows else 0,
    }


def save_split(split: Dataset, final: Path, shard_rows: int) -> dict[str, Any]:
    """``save_to_disk`` with ~``shard_rows`` rows per shard + the shard manifest; its stats."""
    num_shards = max(1, math.ceil(len(split) / shard_rows))
    with atomic_dir(final) as tmp:
        split.save_to_disk(str(tmp), num_shards=num_shards)
        names = [entry["filename"] for entry in
                 json.loads((tmp / "state.json").read_text())["_data_files"]]
        tables = [read_shard(tmp / name) for name in names]
        shards = {name: {"rows": table.num_rows, "bytes": (tmp / name).stat().st_size,
                         "sha256": sha256_of(tmp / name)}
                  for name, table in zip(names, tables, strict=True)}
        write_json_atomic(tmp / MANIFEST, {"rows": len(split), "shards": shards})
        stats = _split_stats(tables, num_shards)
        del tables  # release the memory maps before the folder is renamed
    return stats


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
    os.replace(tmp, path)


# ---------------------------------------------------------------- the stage
def _tokenized_splits(cfg: Config, tokenizer: PreTrainedTokenizerBase,
                      sources: Sources) -> tuple[Dataset, Dataset, Counter[str]]:
    """Kept train and eval rows (``COLUMNS`` only) and the rejected rows by reason."""
    from idlm.data.sft import eval_items_from_rows, split_eval, tokenize_conversations

    prep = cfg.prepare

    def tokenize(rows: Dataset, desc: str) -> tuple[Dataset, Counter[str]]:
        return tokenize_conversations(rows, tokenizer, sources.messages_field,
                                      prep.max_length, prep.num_proc, desc)

    if sources.held_out is not None:
        train, rejected = tokenize(sources.rows, "tokenize train")
        held_out, rejected_eval = tokenize(sources.held_out, "tokenize eval")
        rejected += rejected_eval
    else:
        kept, rejected = tokenize(sources.rows, "tokenize")
        train, held_out = split_eval(kept, prep.dataset.eval_fraction, cfg.seed)
        sources.eval_items = eval_items_from_rows(sources.rows, held_out,
                                                  sources.messages_field)
    return train.select_columns(list(COLUMNS)), held_out.select_columns(list(COLUMNS)), rejected


def _ready_tokenizer(cfg: Config, texts: Iterator[str]) -> PreTrainedTokenizerBase:
    """Build or load the tokenizer and check what every later stage relies on."""
    from idlm.data.sft import check_chat_template
    from idlm.data.tokenizer import build_tokenizer, mask_token_id

    started = time.perf_counter()
    tokenizer = build_tokenizer(cfg.prepare.tokenizer, texts)
    mask_id = mask_token_id(tokenizer)
    if cfg.model.mask_token_id is not None and cfg.model.mask_token_id != mask_id:
        raise StageError(f"tokenizer gives {cfg.prepare.tokenizer.mask_token} id {mask_id} but "
                         f"model.mask_token_id is {cfg.model.mask_token_id}; make them agree")
    check_chat_template(tokenizer)
    _log(f"tokenizer ready in {time.perf_counter() - started:.1f}s: {len(tokenizer)} tokens, "
         f"mask id {mask_id}")
    return tokenizer


def run(cfg: Config) -> dict[str, Any]:
    """Build the tokenizer and the tokenized train/eval splits; return paths and metrics."""
    started = time.perf_counter()
    prep, out_dir = cfg.prepare, cfg.out("prepare")
    # A pretrained tokenizer is checked before a possibly long dataset download.
    tokenizer = _ready_tokenizer(cfg, iter(())) if prep.tokenizer.kind == "pretrained" else None
    sources = _synthetic_sources(cfg) if prep.source == "synthetic" else _hub_sources(cfg)
    if tokenizer is None:
        tokenizer = _ready_tokenizer(cfg, _training_texts(sources.rows, sources.messages_field))

    train, held_out, rejected = _tokenized_splits(cfg, tokenizer, sources)
    rows_read = len(sources.rows) + (len(sources.held_out) if sources.held_out is not None else 0)
    if len(train) == 0:
        raise StageError(f"no usable training rows (rejected by reason: {dict(rejected)})")
    with atomic_dir(out_dir / "tokenizer") as tmp:
        tokenizer.save_pretrained(str(tmp))
    stats = {"train": save_split(train, out_dir / "train", prep.shard_rows),
             "eval": save_split(held_out, out_dir / "eval", prep.shard_rows)}
    _write_jsonl_atomic(out_dir / "eval_items.jsonl", sources.eval_items)
    metrics = {
        "source": prep.source, "tokenizer_kind": prep.tokenizer.kind,
        "vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "rows_read": rows_read, "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()), "eval_items": len(sources.eval_items),
        "train": stats["train"], "eval": stats["eval"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json_atomic(out_dir / "metrics.json", metrics)
    _log(f"wrote {out_dir} in {metrics['seconds']}s")
    return {**metrics, "outputs": {name: str(out_dir / name) for name in
                                   ("tokenizer", "train", "eval", "eval_items.jsonl",
                                    "metrics.json")}}
