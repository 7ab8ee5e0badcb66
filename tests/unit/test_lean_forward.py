"""The lean decode forward: transformers' logits, AR = ISD anchor, gated LoRA at MASK rows only.

Each test runs a ragged two-row batch through one ``RaggedKVCache`` as the engine does: a
prefill window, then decode windows at each row's own length (wide enough to cross a
key-length bucket, so the cache grows in between).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F

from idlm.decoding.engine import DecodingEngine
from idlm.decoding.kv_cache import RaggedKVCache
from idlm.decoding.lean_forward import DecoderForward, HFDecoder, LeanDecoder, decoder_forward
from idlm.decoding.requests import GenerationRequest, SamplingParams
from idlm.model.gate_holder import token_gate_of
from idlm.model.gated_lora import attach_gated_lora, find_token_gate
from tests.conftest import MASK_ID, tiny_qwen3
from tests.unit.test_decoding_models import pattern_prompts
from tests.unit.test_decoding_risd import perturb_lora_b

PREFIX_LENGTHS = (5, 9)   # committed tokens per row after the prefill
WINDOW = 7                # 2N - 1 at N = 4
MASK_SLOTS = slice(4, 7)  # the window's MASK tail: [pending, 3 drafts, 3 MASK]


def windows(seed: int = 0, steps: int = 18) -> list[torch.Tensor]:
    """A [2, 9] prefill and ``steps`` [2, 7] decode windows with a MASK tail."""
    generator = torch.Generator().manual_seed(seed)
    prefill = torch.randint(1, MASK_ID, (2, max(PREFIX_LENGTHS)), generator=generator)
    decode = [torch.randint(1, MASK_ID, (2, WINDOW), generator=generator) for _ in range(steps)]
    for window in decode:
        window[:, MASK_SLOTS] = MASK_ID
    return [prefill, *decode]


def run_windows(forward: DecoderForward, model: torch.nn.Module, steps: list[torch.Tensor],
                width: int | None = None, rows: int = 2) -> list[torch.Tensor]:
    """Logits of every step; each decode step keeps 3 slots (``width`` cuts the windows,
    ``rows`` 1 keeps the first row: its MASK rows are then one contiguous run)."""
    config = model.config
    cache = RaggedKVCache.for_model(config, rows, 16, model.lm_head.weight.dtype, "cpu")
    lengths = torch.zeros(rows, dtype=torch.long)
    logits = []
    with torch.inference_mode():
        for step, window in enumerate(steps):
            window = window[:rows, :width] if step else window[:rows]
            positions = lengths[:, None] + torch.arange(window.shape[1])
            key_length = int(lengths.max()) + window.shape[1]
            drafting = window == MASK_ID
            hidden = forward(window, positions, cache, lengths, key_length, drafting)
            logits.append(model.lm_head(hidden))
            lengths = torch.tensor(PREFIX_LENGTHS[:rows]) if step == 0 else lengths + 3
    return logits


def gated_model(seed: int = 3) -> torch.nn.Module:
    """A gated LoRA with non-zero B and a non-zero MASK-embedding delta."""
    model = attach_gated_lora(tiny_qwen3(seed=seed), MASK_ID, rank=4, alpha=8.0, dropout=0.0,
                              mask_embedding=True)
    perturb_lora_b(model, std=0.05)
    torch.manual_seed(seed)
    torch.nn.init.normal_(find_token_gate(model).mask_embedding.delta, std=0.1)
    return model.eval()


def forwards(model: torch.nn.Module) -> tuple[LeanDecoder, HFDecoder]:
    decoder = model.get_decoder() if not hasattr(model, "get_base_model") else (
        model.get_base_model().get_decoder())
    token_gate = token_gate_of(decoder)
    return (LeanDecoder(decoder, model.config, 64, token_gate),
            HFDecoder(decoder, token_gate))


def test_lean_logits_match_transformers() -> None:
    model = tiny_qwen3(seed=3)
    lean, transformers = forwards(model)
    steps = windows()
    for ours, theirs in zip(run_windows(lean, model, steps), run_windows(transformers, model,
                                                                         steps), strict=True):
        assert (ours - theirs).abs().amax() <= 1e-5
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_engine_greedy_tokens_match_the_transformers_path() -> None:
    model = tiny_qwen3(seed=5)
    prompts = pattern_prompts(6, seed=13)
    greedy = SamplingParams(max_new_tokens=20)
    requests = [GenerationRequest(p, mode, stride, greedy) for p in prompts
                for mode, stride in (("ar", 1), ("isd", 3))]
    lean_engine = DecodingEngine(model, MASK_ID, stop_token_ids=[])
    assert isinstance(lean_engine.decode_forward, LeanDecoder)
    assert lean_engine.forward_fallback is None
    transformers_engine = DecodingEngine(model, MASK_ID, stop_token_ids=[])
    transformers_engine.decode_forward = HFDecoder(model.get_decoder())
    assert ([r.token_ids for r in lean_engine.generate(requests)]
            == [r.token_ids for r in transformers_engine.generate(requests)])


def _rows_independent_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU's matmul gives a row the same bits whatever the row count (bf16
    oneDNN does; fp32 MKL picks a kernel, and so an accumulation order, by row count)."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(14, 64, generator=generator).to(dtype)
    weight = torch.randn(128, 64, generator=generator).to(dtype)
    return torch.equal(F.linear(inputs[:2], weight), F.linear(inputs, weight)[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ar_step_logits_equal_the_isd_anchor_logits(dtype: torch.dtype) -> None:
    """One attention call (explicit mask, GQA in SDPA, bucketed key length) for both, so
    an AR step and an ISD window's anchor row see the same arithmetic."""
    model = tiny_qwen3(seed=3).to(dtype)
    lean, _ = forwards(model)
    steps = windows(steps=3)
    isd = run_windows(lean, model, steps)
    ar = run_windows(lean, model, steps, width=1)
    # The first decode step follows the same prefill in both runs: same context.
    anchor_isd, anchor_ar = isd[1][:, 0], ar[1][:, 0]
    assert torch.equal(anchor_isd.argmax(-1), anchor_ar.argmax(-1))
    if not _rows_independent_matmul(dtype):
        assert (anchor_isd - anchor_ar).abs().amax() <= 1e-5
        pytest.skip(f"{dtype} matmul on this CPU depends on the row count: close, not equal")
    assert torch.equal(anchor_isd, anchor_ar)


@pytest.mark.parametrize("rows", [1, 2])
def test_gated_rows_only_differ_from_the_base(rows: int) -> None:
    base, gated = tiny_qwen3(seed=3), gated_model(seed=3)
    steps = windows()
    lean_base = run_windows(forwards(base)[0], base, steps, rows=rows)
    lean_gated = run_windows(forwards(gated)[0], base, steps, rows=rows)
    for ours, reference in zip(lean_gated[1:], lean_base[1:], strict=True):
        # Rows before the MASK tail never see a MASK key: bit-identical to the base.
        assert torch.equal(ours[:, :MASK_SLOTS.start], reference[:, :MASK_SLOTS.start])
        assert (ours[:, MASK_SLOTS] - reference[:, MASK_SLOTS]).abs().amax() > 0.05


@pytest.mark.parametrize("rows", [1, 2])
def test_gated_rows_match_the_peft_path(rows: int) -> None:
    gated = gated_model(seed=3)
    lean, peft_path = forwards(gated)
    steps = windows()
    for ours, theirs in zip(run_windows(lean, gated, steps, rows=rows),
                            run_windows(peft_path, gated, steps, rows=rows), strict=True):
        assert (ours - theirs).abs().amax() <= 1e-5


def test_ragged_gated_rows_match_the_peft_path() -> None:
    """Rows whose MASK tails differ (an index of gated rows, not one tail per window)."""
    from idlm.decoding.lean_forward import _gated_layout
    from idlm.decoding.lean_lora import TailRows

    gated = gated_model(seed=4)
    lean, peft_path = forwards(gated)
    steps = windows(seed=1)
    for window in steps[1:]:
        window[1, MASK_SLOTS.start] = 3   # row 1 drafts one token fewer
    assert isinstance(_gated_layout(steps[1] == MASK_ID), torch.Tensor)
    assert isinstance(_gated_layout(windows()[1] == MASK_ID), TailRows)
    for ours, theirs in zip(run_windows(lean, gated, steps), run_windows(peft_path, gated, steps),
                            strict=True):
        assert (ours - theirs).abs().amax() <= 1e-5


def test_no_gated_row_skips_the_adapter() -> None:
    """AR steps (no ``drafting``) and windows without MASK run the base's ops exactly."""
    base, gated = tiny_qwen3(seed=3), gated_model(seed=3)
    steps = [window.clamp(max=MASK_ID - 1) for window in windows(steps=3)]
    assert torch.equal(torch.stack(run_windows(forwards(gated)[0], base, steps[1:])),
                       torch.stack(run_windows(forwards(base)[0], base, steps[1:])))
    lean_gated = forwards(gated)[0]
    cache = RaggedKVCache.for_model(base.config, 2, 16, torch.float32, "cpu")
    lengths = torch.zeros(2, dtype=torch.long)
    positions = torch.arange(9).expand(2, 9)
    with torch.inference_mode():
        with_gate = lean_gated(steps[0], positions, cache, lengths, 9,
                               torch.zeros(2, 9, dtype=torch.bool))
        without = lean_gated(steps[0], positions, cache, lengths, 9, None)
    assert torch.equal(with_gate, without)


def test_models_it_cannot_run_fall_back_with_a_reason() -> None:
    ungated = get_peft_model(tiny_qwen3(seed=1), LoraConfig(r=4, target_modules="all-linear"))
    decoder = ungated.get_base_model().get_decoder()
    forward, reason = decoder_forward(decoder, ungated.config, 64)
    assert isinstance(forward, HFDecoder) and "without the MASK gate" in reason

    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=128))
    forward, reason = decoder_forward(llama.get_decoder(), llama.config, 64)
    assert isinstance(forward, HFDecoder) and "'llama' is not qwen3" in reason


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gives_the_bits_of_transformers(dtype: torch.dtype) -> None:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from idlm.decoding.layer_math import rms_norm as _rms_norm

    torch.manual_seed(0)
    hidden = torch.randn(5, 6, 48).to(dtype)
    norm = Qwen3RMSNorm(48, eps=1e-6).to(dtype)
    torch.nn.init.normal_(norm.weight)
    with torch.no_grad():
        assert torch.equal(_rms_norm(hidden, norm.weight, 1e-6), norm(hidden))
        # The q/k head norm: one weight row per head, the same row for every head here.
        per_head = norm.weight.expand(6, -1)
        assert torch.equal(_rms_norm(hidden, per_head, 1e-6), norm(hidden))


def test_lm_head_equals_the_module() -> None:
    from idlm.decoding.lean_forward import lm_head

    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(2, 7, 16)
    with torch.no_grad():
        assert (lm_head(head)(hidden) - head(hidden)).abs().amax() <= 1e-6
    with_bias = torch.nn.Linear(16, 40)
    assert lm_head(with_bias) is with_bias
