"""The real SFT path, offline: local JSONL in OpenThoughts3's schema, real Qwen3 vocabulary."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from idlm.config import HubData
from idlm.data.qwen_vocab import build_qwen3_tokenizer
from idlm.data.sft import (
    eval_items_from_rows,
    load_sft_source,
    normalise_messages,
    split_eval,
    tokenize_conversations,
)
from idlm.errors import StageError


def sharegpt(question: str, reasoning: str, answer: str, **extra: object) -> dict:
    """One OpenThoughts3-style row: ShareGPT turns plus the dataset's other columns."""
    response = f"<think>\n{reasoning}\n</think>\n\n{answer}"
    return {"difficulty": 3, "source": "fixture", "domain": "math", **extra,
            "conversations": [{"from": "human", "value": question},
                              {"from": "gpt", "value": response}]}


GOOD_ROWS = [sharegpt(f"What is {a}+{b}?", f"{a} plus {b} is {a + b}.", f"**{a + b}**")
             for a, b in ((2, 3), (10, 32), (7, 7), (120, 5), (1, 99), (64, 64))]
BAD_ROWS = {
    "no_final_assistant_turn": {"conversations": [{"from": "human", "value": "Hi"}]},
    "messages_not_a_list": {"conversations": "just a string"},
    "empty_conversation": {"conversations": []},
    "bad_turn": {"conversations": [{"from": "human", "value": 5},
                                   {"from": "gpt", "value": "five"}]},
    "missing_messages": {"difficulty": 1},
    "empty_response": {"conversations": [{"from": "human", "value": "Say nothing."},
                                         {"from": "gpt", "value": "  "}]},
    "no_user_turn": {"conversations": [{"from": "gpt", "value": "Unprompted."}]},
    "too_long": sharegpt("Count to 400.", "Counting.", " ".join(str(n) for n in range(400))),
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def qwen() -> PreTrainedTokenizerBase:
    return build_qwen3_tokenizer(mask_token="<|MASK|>")


@pytest.fixture
def openthoughts_file(tmp_path: Path) -> Path:
    rows = GOOD_ROWS[:3] + list(BAD_ROWS.values()) + GOOD_ROWS[3:]
    return write_jsonl(tmp_path / "openthoughts.jsonl", rows)


def test_normalise_accepts_both_schemas_and_names_each_defect() -> None:
    sharegpt_turns = [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                      {"from": "gpt", "value": "A"}]
    role_turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                  {"role": "assistant", "content": "A"}]
    assert normalise_messages(sharegpt_turns) == (role_turns, "")
    assert normalise_messages(role_turns) == (role_turns, "")
    for reason, row in BAD_ROWS.items():
        if reason != "too_long":
            assert normalise_messages(row.get("conversations")) == ([], reason)


def test_openthoughts_rows_are_kept_or_counted_by_reason(
        qwen: PreTrainedTokenizerBase, openthoughts_file: Path) -> None:
    source = load_sft_source(HubData(name_or_path=str(openthoughts_file),
                                     messages_field="conversations"))
    assert len(source) == len(GOOD_ROWS) + len(BAD_ROWS)
    kept, rejected = tokenize_conversations(source, qwen, "conversations", max_length=256,
                                            num_proc=1)
    assert rejected == Counter({reason: 1 for reason in BAD_ROWS})
    assert len(kept) == len(GOOD_ROWS)
    assert kept.column_names == ["input_ids", "prompt_length", "kind", "row_index"]
    assert list(kept["row_index"]) == [0, 1, 2, 11, 12, 13]
    for row, good in zip(kept, GOOD_ROWS, strict=True):
        question, answer = (turn["value"] for turn in good["conversations"])
        ids, prompt_length = row["input_ids"], row["prompt_length"]
        assert qwen.decode(ids[:prompt_length]) == (
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
        assert qwen.decode(ids[prompt_length:]) == answer + "<|im_end|>"
        assert ids[-1] == 151645 and row["kind"] == "sft"


def test_role_content_schema_with_system_turn_and_two_workers(
        qwen: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "system", "content": "Answer tersely."},
                          {"role": "user", "content": f"Name {n}"},
                          {"role": "assistant", "content": f"Item {n}."}]} for n in range(8)]
    rows.append({"messages": [{"role": "user", "content": "Hi"}]})
    folder = tmp_path / "rows"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", rows[:4])
    write_jsonl(folder / "part-1.jsonl", rows[4:])
    source = load_sft_source(HubData(name_or_path=str(folder)))
    kept, rejected = tokenize_conversations(source, qwen, "messages", max_length=128, num_proc=2)
    assert rejected == {"no_final_assistant_turn": 1} and len(kept) == 8
    first = kept[0]
    assert qwen.decode(first["input_ids"][: first["prompt_length"]]).startswith(
        "<|im_start|>system\nAnswer tersely.<|im_end|>\n<|im_start|>user\nName 0")
    assert qwen.decode(first["input_ids"][first["prompt_length"]:]) == (
        "<think>\n\n</think>\n\nItem 0.<|im_end|>")


def test_missing_messages_column_is_one_clear_error(qwen: PreTrainedTokenizerBase) -> None:
    rows = Dataset.from_dict({"text": ["hello"]})
    with pytest.raises(StageError, match="no column 'conversations'.*messages_field"):
        tokenize_conversations(rows, qwen, "conversations", 64, 1)


def test_local_sources_and_max_rows(tmp_path: Path, openthoughts_file: Path) -> None:
    capped = load_sft_source(HubData(name_or_path=str(openthoughts_file), max_rows=4))
    assert len(capped) == 4
    on_disk = tmp_path / "saved"
    Dataset.from_list(GOOD_ROWS).save_to_disk(on_disk)
    assert load_sft_source(HubData(name_or_path=str(on_disk)))["domain"] == ["math"] * 6
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(StageError, match="expected a save_to_disk folder"):
        load_sft_source(HubData(name_or_path=str(tmp_path / "notes.txt")))


def test_eval_split_is_seeded_and_eval_items_carry_prompts(qwen: PreTrainedTokenizerBase,
                                                           openthoughts_file: Path) -> None:
    source = load_sft_source(HubData(name_or_path=str(openthoughts_file)))
    kept, _ = tokenize_conversations(source, qwen, "conversations", 256, 1)
    train, held_out = split_eval(kept, eval_fraction=0.3, seed=0)
    again = split_eval(kept, eval_fraction=0.3, seed=0)[1]
    assert (len(train), len(held_out)) == (4, 2)
    assert list(held_out["row_index"]) == list(again["row_index"])
    assert not set(train["row_index"]) & set(held_out["row_index"])
    items = eval_items_from_rows(source, held_out, "conversations")
    for item in items:
        row = source[item["meta"]["row_index"]]
        question, answer = (turn["value"] for turn in row["conversations"])
        assert item["prompt"] == question and item["reference"] == answer
        assert item["messages"] == [{"role": "user", "content": question}]
    assert len(split_eval(kept, eval_fraction=0.0, seed=0)[1]) == 0
    assert len(split_eval(kept, eval_fraction=0.001, seed=0)[1]) == 1
