"""Chat SFT data: load, apply the chat template, tokenize, reject bad rows by reason.

Rows hold a conversation in one field, as ``[{role, content}]`` or ShareGPT
``[{from: human|gpt|system, value}]`` (OpenThoughts3's ``conversations``). Each kept row
becomes ``input_ids`` (prompt + response, ending with eos) and ``prompt_length`` (the
prompt tokens incl. the assistant header, i.e. the chat template with
``add_generation_prompt=True`` over all but the last assistant turn). A row is never
dropped silently: every rejection is counted under its reason.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idlm.config import HubData
from idlm.config.paths import looks_local, resolve_path
from idlm.errors import StageError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "system": "system"}
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_KIND = "sft"


def normalise_messages(raw: Any) -> tuple[Messages, str]:
    """``(messages, "")`` in role/content form, or ``([], reason)`` for a malformed row."""
    if not isinstance(raw, list):
        return [], "missing_messages" if raw is None else "messages_not_a_list"
    if not raw:
        return [], "empty_conversation"
    messages: Messages = []
    for turn in raw:
        if not isinstance(turn, dict):
            return [], "bad_turn"
        role = turn.get("role") or turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if not isinstance(role, str) or role not in ROLES or not isinstance(content, str):
            return [], "bad_turn"
        messages.append({"role": ROLES[role], "content": content})
    if messages[-1]["role"] != "assistant":
        return [], "no_final_assistant_turn"
    if not any(message["role"] == "user" for message in messages[:-1]):
        return [], "no_user_turn"
    if not messages[-1]["content"].strip():
        return [], "empty_response"
    return messages, ""


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail early (one line) if the template cannot mark where a response starts and ends."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    _ids, _prompt_length, reason = encode_conversation(tokenizer, probe, max_length=1 << 30)
    if reason:
        raise StageError(f"chat template of '{tokenizer.name_or_path}' fails on a probe "
                         f"conversation ({reason}): the prompt must be a token prefix of the "
                         f"conversation and the response must end with eos")


def _cut_after_last_eos(ids: list[int], eos_id: int) -> list[int] | None:
    """Templates end a turn with ``eos`` + newline; the response stops at eos."""
    for position in range(len(ids) - 1, -1, -1):
        if ids[position] == eos_id:
            return ids[: position + 1]
    return None


def _check_encoding(prompt_ids: list[int], full_ids: list[int], eos_id: int,
                    max_length: int) -> tuple[list[int], int, str]:
    ids = _cut_after_last_eos(full_ids, eos_id)
    if ids is None:
        return [], 0, "no_eos_after_response"
    if ids[: len(prompt_ids)] != prompt_ids:
        return [], 0, "prompt_not_a_prefix"
    if len(ids) - len(prompt_ids) < 2:  # eos alone is no response
        return [], 0, "empty_response"
    if len(ids) > max_length:
        return [], 0, "too_long"
    return ids, len(prompt_ids), ""


def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> tuple[str, str] | None:
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template may reject odd rows (e.g. role order); counted, not fatal
        return None
    return prompt, full


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: Messages,
                        max_length: int) -> tuple[list[int], int, str]:
    """``(input_ids, prompt_length, "")`` or ``([], 0, reason)`` for one conversation."""
    return encode_batch(tokenizer, [messages], max_length)[0]


def encode_batch(tokenizer: PreTrainedTokenizerBase, conversations: list[Messages],
                 max_length: int) -> list[tuple[list[int], int, str]]:
    rendered = [_render(tokenizer, messages) for messages in conversations]
    ok = [pair for pair in rendered if pair is not None]
    # One batched call each: the Rust tokenizer runs the batch in parallel.
    prompts = tokenizer([p for p, _ in ok], add_special_tokens=False)["input_ids"] if ok else []
    fulls = tokenizer([f for _, f in ok], add_special_tokens=False)["input_ids"] if ok else []
    encoded = iter(zip(prompts, fulls, strict=True))
    results: list[tuple[list[int], int, str]] = []
    for pair in rendered:
        if pair is None:
            results.append(([], 0, "template_error"))
            continue
        prompt_ids, full_ids = next(encoded)
        results.append(_check_encoding(prompt_ids, full_ids, tokenizer.eos_token_id, max_length))
    return results


def _encode_rows(batch: dict[str, list[Any]], indices: list[int], *,
                 tokenizer: PreTrainedTokenizerBase, messages_field: str,
                 max_length: int) -> dict[str, list[Any]]:
    raw_column = batch.get(messages_field, [None] * len(indices))
    normalised = [normalise_messages(raw) for raw in raw_column]
    valid = [messages for messages, reason in normalised if not reason]
    encoded = iter(encode_batch(tokenizer, valid, max_length))
    out: dict[str, list[Any]] = {"input_ids": [], "prompt_length": [], "reject": []}
    for _messages, reason in normalised:
        ids, prompt_length, reason = ([], 0, reason) if reason else next(encoded)
        out["input_ids"].append(ids)
        out["prompt_length"].append(prompt_length)
        out["reject"].append(reason)
    kinds = batch.get("kind") or [DEFAULT_KIND] * len(indices)
    out["kind"] = [kind if isinstance(kind, str) and kind else DEFAULT_KIND for kind in kinds]
    out["row_index"] = indices
    return out


def tokenize_conversations(dataset: Dataset, tokenizer: PreTrainedTokenizerBase,
                           messages_field: str, max_length: int, num_proc: int,
                           desc: str = "tokenize") -> tuple[Dataset, Counter[str]]:
    """Kept rows (``input_ids``, ``prompt_length``, ``kind``, ``row_index``) + rejects by reason."""
    from datasets import Features, List, Value

    if messages_field not in dataset.column_names:
        raise StageError(f"dataset has no column '{messages_field}' (columns: "
                         f"{', '.join(dataset.column_names)}); set prepare.dataset.messages_field")
    features = Features({"input_ids": List(Value("int32")), "prompt_length": Value("int32"),
                         "reject": Value("string"), "kind": Value("string"),
                         "row_index": Value("int64")})
    encoded = dataset.map(
        _encode_rows, batched=True, batch_size=1000, with_indices=True,
        remove_columns=dataset.column_names, features=features,
        num_proc=num_proc if num_proc > 1 else None, desc=desc,
        fn_kwargs={"tokenizer": tokenizer, "messages_field": messages_field,
                   "max_length": max_length})
    rejected = Counter(reason for reason in encoded["reject"] if reason)
    kept = encoded.filter(lambda reasons: [not r for r in reasons], input_columns="reject",
                          batched=True, num_proc=num_proc if num_proc > 1 else None,
                          desc=f"{desc}: drop rejected")
    return kept.remove_columns("reject"), rejected


def split_eval(dataset: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded random split; at least one eval row whenever the fraction is non-zero."""
    rows = len(dataset)
    eval_rows = 0 if eval_fraction == 0 or rows < 2 else (
        min(rows - 1, max(1, round(rows * eval_fraction))))
    if eval_rows == 0:
        return dataset, dataset.select([])
    parts = dataset.train_test_split(test_size=eval_rows, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS and p.is_file())
    builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders or len(builders) != 1:
        raise StageError(f"{path}: expected a save_to_disk folder, or .jsonl/.json/.parquet "
                         f"files of one format")
    return builders.pop() or "json", [str(p) for p in files]


def load_sft_source(spec: HubData) -> Dataset:
    """Rows from a hub id at a pinned revision, or from a local folder/file; ``max_rows`` cap."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    from idlm.data.refresh import IMPORT_PATH

    if not spec.name_or_path and not spec.import_url:
        raise StageError("prepare.dataset.name_or_path (or import_url) is required when "
                         "prepare.source is 'hub'")
    local = IMPORT_PATH if spec.import_url else spec.name_or_path
    if spec.import_url and not resolve_path(local).is_dir():
        raise StageError(f"prepare.dataset.import_url is set but {local} is missing: the flow "
                         "imports it first (or run `idlm data refresh`)")
    if spec.import_url or looks_local(local):
        path = resolve_path(local)
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = load_from_disk(str(path))
            dataset = loaded[spec.split] if isinstance(loaded, DatasetDict) else loaded
        else:
            builder, files = _local_files(path)
            dataset = load_dataset(builder, data_files=files, split="train")
    else:
        split = f"{spec.split}[:{spec.max_rows}]" if spec.max_rows else spec.split
        # The refreshed commit when there is one: exactly the data DVC was told about.
        dataset = load_dataset(spec.name_or_path, revision=spec.version or spec.revision,
                               split=split)
    if spec.max_rows is not None and len(dataset) > spec.max_rows:
        dataset = dataset.select(range(spec.max_rows))
    return dataset


def eval_items_from_rows(source: Dataset, eval_split: Dataset,
                         messages_field: str) -> list[dict[str, Any]]:
    """Held-out prompts + gold responses of the eval split, for the evaluation stage."""
    items: list[dict[str, Any]] = []
    indices = list(eval_split["row_index"])
    rows = source.select(indices) if indices else []
    for row_index, kind, row in zip(indices, eval_split["kind"], rows, strict=True):
        messages, _reason = normalise_messages(row[messages_field])
        users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
        items.append({"id": f"eval-{row_index:09d}", "kind": kind, "prompt": users[-1],
                      "messages": messages[:-1], "reference": messages[-1]["content"],
                      "meta": {"row_index": row_index}})
    return items
