"""The optional torch.compile'd forward (idlm.decoding.compiled): the same tokens as the eager
engine for AR, ISD and R-ISD, the layers really run compiled, and a compile that fails (no
C++ compiler) falls back to eager decoding with the eager tokens."""

from __future__ import annotations

import logging

import pytest
import torch

from idlm.decoding.engine import DecodingEngine
from idlm.decoding.requests import GenerationRequest, SamplingParams
from idlm.model.gated_lora import attach_gated_lora
from tests.conftest import MASK_ID
from tests.unit.test_decoding_models import pattern_prompts, trained_ic_model
from tests.unit.test_decoding_risd import perturb_lora_b

GREEDY = SamplingParams(max_new_tokens=20)


def tokens(engine: DecodingEngine, prompts: list[list[int]], mode: str, stride: int
           ) -> list[list[int]]:
    requests = [GenerationRequest(p, mode, stride, GREEDY) for p in prompts]
    return [r.token_ids for r in engine.generate(requests)]


def eager_layer_calls(engine: DecodingEngine) -> list[int]:
    """Counts the forwards that run the eager layers (the compiled graph does not)."""
    calls = [0]
    eager = engine.decode_forward.layer_stack

    def counting(*args: object) -> torch.Tensor:
        calls[0] += 1
        return eager(*args)

    engine.decode_forward.layer_stack = counting
    return calls


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return trained_ic_model()


def test_compiled_ar_and_isd_give_the_eager_tokens(model: torch.nn.Module) -> None:
    eager = DecodingEngine(model, MASK_ID, stop_token_ids=[])
    compiled = DecodingEngine(model, MASK_ID, stop_token_ids=[], compile=True)
    calls = eager_layer_calls(compiled)
    ragged = pattern_prompts(6, seed=21)
    for prompts in (ragged[:1], ragged):   # one row, then several: both shape classes
        for mode, stride in (("ar", 1), ("isd", 2), ("isd", 4)):
            assert tokens(compiled, prompts, mode, stride) == tokens(eager, prompts, mode,
                                                                     stride)
    assert compiled.decode_forward.compiled.failure is None
    assert calls[0] == 0   # every forward (prefills included) ran the compiled graph


def test_compiled_risd_gives_the_eager_tokens() -> None:
    gated = attach_gated_lora(trained_ic_model(), MASK_ID, rank=4, alpha=8.0, dropout=0.0)
    perturb_lora_b(gated, seed=3)
    eager = DecodingEngine(gated, MASK_ID, stop_token_ids=[])
    compiled = DecodingEngine(gated, MASK_ID, stop_token_ids=[], compile=True)
    calls = eager_layer_calls(compiled)
    prompts = pattern_prompts(4, seed=22)
    assert tokens(compiled, prompts, "isd", 4) == tokens(eager, prompts, "isd", 4)
    # The steps with MASK rows ran the eager layers (their LoRA update), the prefill not.
    assert calls[0] > 0 and compiled.decode_forward.compiled.failure is None


def test_a_failed_compile_falls_back_to_the_eager_tokens(
        model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from torch._inductor import config as inductor

    # No C++ compiler and no cached kernels: inductor cannot build the graph.
    torch._dynamo.reset()
    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/g++"))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)
    eager = DecodingEngine(model, MASK_ID, stop_token_ids=[])
    compiled = DecodingEngine(model, MASK_ID, stop_token_ids=[], compile=True)
    prompts = pattern_prompts(3, seed=23)
    with caplog.at_level(logging.WARNING, logger="idlm.decoding.compiled"):
        assert tokens(compiled, prompts, "isd", 4) == tokens(eager, prompts, "isd", 4)
    assert compiled.decode_forward.compiled.failure is not None
    assert "torch.compile failed" in caplog.text and "decoding eagerly" in caplog.text
    torch._dynamo.reset()
