"""Decoding: AR reference, ISD and R-ISD in one batched engine, statistics and checks.

Needs only torch, transformers and peft. The pure pieces (``acceptance``, ``bookkeeping``,
``sampling``, ``stats``) take and return tensors and know nothing about the model, so a
serving plugin can reuse them; ``algorithms`` is the registry of what runs a request (one
small file per algorithm); ``engine`` is the loop that calls the model.

The names below load on first use (PEP 562), so the torch-free parts (``algorithms``,
``errors``) import without the engine: the CLI builds its choices from the registry
before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from idlm.decoding.engine import DecodingEngine
    from idlm.decoding.errors import DecodingError
    from idlm.decoding.introspection import introspective_acceptance
    from idlm.decoding.requests import GenerationRequest, GenerationResult, SamplingParams
    from idlm.decoding.stats import RequestStats, aggregate, expected_tokens_per_forward

_HOMES = {
    "DecodingEngine": "engine",
    "DecodingError": "errors",
    "GenerationRequest": "requests",
    "GenerationResult": "requests",
    "RequestStats": "stats",
    "SamplingParams": "requests",
    "aggregate": "stats",
    "expected_tokens_per_forward": "stats",
    "introspective_acceptance": "introspection",
}

__all__ = [
    "DecodingEngine",
    "DecodingError",
    "GenerationRequest",
    "GenerationResult",
    "RequestStats",
    "SamplingParams",
    "aggregate",
    "expected_tokens_per_forward",
    "introspective_acceptance",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
