"""Decoding: AR reference, ISD and R-ISD in one batched engine, statistics and checks.

Needs only torch, transformers and peft. The pure pieces (``acceptance``, ``bookkeeping``,
``sampling``, ``stats``) take and return tensors and know nothing about the model, so a
serving plugin can reuse them; ``engine`` is the loop that calls the model.
"""

from idlm.decoding.engine import DecodingEngine
from idlm.decoding.introspection import introspective_acceptance
from idlm.decoding.requests import (
    DecodingError,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)
from idlm.decoding.stats import RequestStats, aggregate, expected_tokens_per_forward

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
