"""What the runner needs from a system under evaluation: chat prompts in, completions out.

Two implementations: ``endpoint.EndpointBackend`` (any OpenAI-compatible server, e.g.
SGLang) and ``engine_backend.EngineBackend`` (our in-process AR / ISD / R-ISD engine).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from idlm.config.downstream import EvalSampling

Messages = Sequence[Mapping[str, str]]
FinishReason = Literal["stop", "length", "error"]


@dataclass
class Completion:
    """One generation. ``error`` set means no usable output (the runner retries it on
    resume); ``stats`` carries backend numbers such as tokens per forward."""

    text: str
    finish_reason: FinishReason = "stop"
    prompt_text: str | None = None
    completion_tokens: int | None = None
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A system under evaluation.

    ``seeds`` (one per prompt) make sampling reproducible per sample, so a resumed run
    draws what the first run would have drawn. ``thinking`` turns the chat template's
    thinking mode on or off (None: the backend's own default). ``identity`` names what
    changes outputs besides the prompt and sampling (stride, url, ...): a resumed run
    under another identity starts afresh instead of mixing samples.
    """

    name: str

    @property
    def identity(self) -> dict[str, Any]: ...

    def generate(self, prompts: Sequence[Messages], sampling: EvalSampling,
                 seeds: Sequence[int] | None = None, thinking: bool | None = None
                 ) -> list[Completion]: ...


def sample_seed(base_seed: int, benchmark: str, sample_id: str) -> int:
    """A per-sample seed in [0, 2**62): stable across runs, machines and batch layouts."""
    digest = hashlib.sha256(f"{base_seed}/{benchmark}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def render_prompt(tokenizer: Any, messages: Messages, thinking: bool) -> str:
    """The chat template's generation prompt; ``enable_thinking`` reaches Qwen3 templates
    (others ignore it)."""
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)
