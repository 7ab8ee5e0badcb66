"""What a caller asks the engine for and what it gets back; per-request validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from idlm.decoding import algorithms
from idlm.decoding.algorithms import MAX_STRIDE as MAX_STRIDE
from idlm.decoding.errors import DecodingError as DecodingError
from idlm.decoding.stats import RequestStats

# For type checkers; the registry (``idlm.decoding.algorithms``) is what validates them.
Mode = Literal["ar", "isd"]
Proposal = Literal["sample", "argmax"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature`` 0 is greedy; top_k 0 and top_p 1 are off.

    ``stop_token_ids`` None means the engine's default (the model's eos). ``proposal``
    ``argmax`` proposes argmax q instead of a draw from q; verification then takes the
    proposal as one-hot (accept with probability p(s), else draw from p without s), so the
    output still follows the AR distribution exactly, with more drafts accepted.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    proposal: Proposal = "sample"

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt (token ids) to continue, in AR or ISD mode at its own stride."""

    prompt_ids: Sequence[int]
    mode: Mode = "isd"
    stride: int = 4
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @property
    def num_drafts(self) -> int:
        """MASK slots per window: N-1 for ISD (R-ISD, argmax), none for AR."""
        return algorithms.for_mode(self.mode).num_drafts(self.stride)


@dataclass
class GenerationResult:
    """Token ids (prompt excluded), why decoding stopped, statistics, or the error."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Literal["stop", "length", "stop_string", "error"] = "length"
    stats: RequestStats = field(default_factory=RequestStats)
    error: str | None = None
    text: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason, "error": self.error,
                "stats": self.stats.as_dict()}


def request_error(request: GenerationRequest, context_length: int, vocab_size: int,
                  mask_token_id: int, can_decode_text: bool) -> str | None:
    """Why ``request`` cannot run (one line), or None. Checked before anything is batched."""
    prompt = list(request.prompt_ids)
    sampling = request.sampling
    if (problem := algorithms.mode_error(request.mode)) is not None:
        return problem
    if not prompt:
        return "empty prompt: give at least one token"
    if (problem := algorithms.for_mode(request.mode).stride_error(request.stride)) is not None:
        return problem
    if mask_token_id in prompt:  # the engine would read it as a drafting slot
        return (f"the prompt contains the MASK token (id {mask_token_id}) at position "
                f"{prompt.index(mask_token_id)}: MASK is reserved for drafting")
    bad = [token for token in prompt if not 0 <= token < vocab_size]
    if bad:
        return f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})"
    if len(prompt) >= context_length:
        return (f"prompt of {len(prompt)} tokens leaves no room in the model's context of "
                f"{context_length} tokens")
    return sampling_error(sampling, can_decode_text)


def sampling_error(sampling: SamplingParams, can_decode_text: bool) -> str | None:
    if sampling.temperature < 0:
        return f"temperature {sampling.temperature} < 0"
    if not 0 < sampling.top_p <= 1:
        return f"top_p {sampling.top_p} is not in (0, 1]"
    if sampling.top_k < 0:
        return f"top_k {sampling.top_k} < 0 (0 disables it)"
    if sampling.max_new_tokens < 1:
        return f"max_new_tokens {sampling.max_new_tokens} < 1"
    if (problem := algorithms.proposal_error(sampling.proposal)) is not None:
        return problem
    if sampling.stop_strings and not can_decode_text:
        return "stop strings need a tokenizer: build the engine with tokenizer=..."
    if not 0 <= sampling.seed < 1 << 63:
        return f"seed {sampling.seed} is not in [0, 2**63)"
    return None
