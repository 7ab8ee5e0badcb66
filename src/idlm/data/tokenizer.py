"""Tokenizers: a byte-level BPE trained on the tiny corpus, or the base model's own.

Both end up as an HF fast tokenizer (``AutoTokenizer.from_pretrained(dir)`` loads it)
with a ChatML chat template, ``<|im_end|>`` as eos, ``<|endoftext|>`` as pad and the
MASK token registered as ``mask_token``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from idlm.config import TokenizerSpec
from idlm.errors import StageError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"

# Qwen3's ChatML without tools or thinking (the tiny corpus has no reasoning traces).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def special_tokens(mask_token: str) -> list[str]:
    """Qwen-style specials in id order: they take ids 0..5 of a trained vocabulary."""
    return [PAD_TOKEN, IM_START, IM_END, THINK_START, THINK_END, mask_token]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int,
                        mask_token: str = "<|MASK|>") -> PreTrainedTokenizerFast:
    """Byte-level BPE with one token per digit (arithmetic needs aligned digits)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(mask_token)
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=IM_END, pad_token=PAD_TOKEN, mask_token=mask_token,
        extra_special_tokens=[IM_START, THINK_START, THINK_END],
        clean_up_tokenization_spaces=False, model_max_length=1 << 20)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_pretrained_tokenizer(name_or_path: str, revision: str | None,
                              mask_token: str) -> PreTrainedTokenizerBase:
    """The base model's tokenizer with the MASK token registered (Qwen3: id 151669, no resize)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    if tokenizer.mask_token != mask_token:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    if not tokenizer.chat_template:
        raise StageError(f"tokenizer '{name_or_path}' has no chat template; "
                         "prepare needs one to find where each response starts")
    return tokenizer


def build_tokenizer(spec: TokenizerSpec, texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """``train`` on ``texts`` or load ``pretrained`` (``texts`` is then not read)."""
    if spec.kind == "train":
        return train_bpe_tokenizer(texts, spec.vocab_size, spec.mask_token)
    if not spec.name_or_path:
        raise StageError("prepare.tokenizer.name_or_path is required when kind is 'pretrained'")
    from idlm.config.paths import looks_local, resolve_path

    name = str(resolve_path(spec.name_or_path)) if looks_local(spec.name_or_path) else (
        spec.name_or_path)
    return load_pretrained_tokenizer(name, spec.revision, spec.mask_token)


def mask_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The MASK id every I-DLM stage needs; a clear error if prepare did not register one."""
    token_id = tokenizer.mask_token_id
    if tokenizer.mask_token is None or token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise StageError(f"tokenizer '{name}' has no mask token: prepare registers "
                         "prepare.tokenizer.mask_token; rerun `dvc repro prepare`")
    return int(token_id)


def chat_texts(messages: list[dict[str, str]]) -> Iterable[str]:
    """What BPE training sees of one conversation: role headers and contents, no specials."""
    for message in messages:
        yield f"{message['role']}\n{message['content']}\n"
