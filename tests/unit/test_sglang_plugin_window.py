"""The SGLang plugin's pure ISD step makes the engine's accept / commit / trim decisions.

``serve`` below plays SGLang's part (sglang cannot be installed on CPU): rounds of a
context pass, then one fixed-width window per request, with the plugin's own
``fill_ids`` / ``layout`` / ``step`` / ``trimmed_context`` deciding everything. A
synthetic model whose logits depend on (token, position) only gives both sides the same
logits, so the outputs, round kinds and per-draft counts must match the engine exactly,
greedy and sampled; a simulated KV cache checks that only pending + accepted drafts are
ever kept. A tiny Qwen3 with a real HF cache checks the trimming end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from idlm.decoding.engine import DecodingEngine
from idlm.decoding.requests import GenerationRequest, SamplingParams
from idlm.serving.sglang.window import (
    RowSampling,
    RowState,
    WindowSpec,
    fill_ids,
    gate,
    layout,
    step,
    trimmed_context,
)
from tests.conftest import MASK_ID, tiny_qwen3

VOCAB, MASK, PAD, POSITIONS = 40, 39, 0, 256


class TableDecoder(nn.Module):
    """Logits = a per-position favourite token + noise by input token and by position: the
    MASK rows get their own noise, so drafts are often but not always accepted."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.favourite = torch.randint(1, MASK, (POSITIONS + 1,), generator=generator)
        self.token_noise = torch.randn(VOCAB, VOCAB, generator=generator)
        self.position_noise = torch.randn(POSITIONS + 1, VOCAB, generator=generator)

    def forward(self, input_ids, position_ids, attention_mask=None, past_key_values=None,
                use_cache=None):  # noqa: ANN001, ANN201 - the engine's decoder interface
        target = self.favourite[(position_ids + 1).clamp(max=POSITIONS)]
        hidden = (2.5 * nn.functional.one_hot(target, VOCAB).float()
                  + 0.9 * self.token_noise[input_ids] + 0.9 * self.position_noise[position_ids])
        hidden[..., MASK] = -30.0   # never propose the MASK id itself
        return SimpleNamespace(last_hidden_state=hidden)


class TableLM(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            num_hidden_layers=1, num_key_value_heads=1, num_attention_heads=1, head_dim=1,
            hidden_size=VOCAB, max_position_embeddings=POSITIONS, pad_token_id=PAD,
            eos_token_id=None, layer_types=["full_attention"])
        self.decoder = TableDecoder(seed)
        self.head = nn.Linear(VOCAB, VOCAB, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(VOCAB))

    def get_decoder(self) -> TableDecoder:
        return self.decoder

    def get_output_embeddings(self) -> nn.Linear:
        return self.head


@dataclass
class Served:
    prompt: list[int]
    sampling: SamplingParams
    output: list[int] = field(default_factory=list)
    cache: list[int] = field(default_factory=list)   # token ids of the committed KV slots
    state: RowState | None = None
    initialized: bool = False
    windows: int = 0
    rounds: list[int] = field(default_factory=lambda: [0, 0, 0])  # full, reject, cold
    tried: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.output) >= self.sampling.max_new_tokens


def serve(logits_of, requests: list[Served], spec: WindowSpec) -> list[Served]:
    """SGLang's rounds with the plugin's decisions; ``logits_of(rows, window)`` -> [B, W, V]."""
    for request in requests:
        request.tried = [0] * spec.num_drafts
        request.accepted = [0] * spec.num_drafts
    while not all(r.done for r in requests):
        rows = []
        for request in (r for r in requests if not r.done):
            committed = request.prompt + request.output
            offset, fill = fill_ids(committed, spec.width, request.initialized)
            if not request.initialized and offset > 0:   # the context pass
                request.cache, request.initialized = committed[:offset], True
                continue
            request.initialized = True
            assert request.cache == committed[:offset], "committed KV is not the true prefix"
            assert len(fill) == offset + spec.width and fill[offset] == committed[-1]
            rows.append((request, offset))
        if rows:
            _window_round(logits_of, rows, spec)
    return requests


def _window_round(logits_of, rows: list[tuple[Served, int]], spec: WindowSpec) -> None:
    pending = torch.tensor([(r.prompt + r.output)[-1] for r, _ in rows])
    offsets = torch.tensor([offset for _, offset in rows])
    states = [r.state for r, _ in rows]
    window = layout(spec, pending, offsets, states)
    assert torch.equal(gate(window).view(len(rows), -1), window.input_ids == spec.mask_token_id)
    sampling = RowSampling.from_lists([r.sampling.temperature for r, _ in rows],
                                      [r.sampling.top_k for r, _ in rows],
                                      [r.sampling.top_p for r, _ in rows],
                                      [r.sampling.seed for r, _ in rows])
    result = step(spec, window, logits_of([r for r, _ in rows], window), states, sampling)
    for index, (request, offset) in enumerate(rows):
        request.cache += window.input_ids[index].tolist()      # the whole window is written
        context, free_start = trimmed_context(offset, result.kept[index],
                                              len(request.cache), page_size=1)
        assert free_start == context
        request.cache = request.cache[:context]                 # ... and trimmed
        _count(request, int(window.num_checked[index]), result.accepted[index])
        request.output = (request.output + result.emitted[index])[
            :request.sampling.max_new_tokens]
        request.state = result.states[index]
        request.windows += 1


def _count(request: Served, checked: int, accepted: int) -> None:
    """The engine's statistics rule (stats.StatsTensors.record) for one step."""
    if checked == 0:
        request.rounds[2] += 1
        return
    request.rounds[0 if accepted == checked else 1] += 1
    for slot in range(len(request.tried)):
        request.tried[slot] += slot < checked and slot <= accepted
        request.accepted[slot] += slot < accepted


def table_logits(model: TableLM):
    def logits_of(rows, window):  # noqa: ANN001, ANN202
        hidden = model.decoder(window.input_ids, window.position_ids).last_hidden_state
        return model.head(hidden)
    return logits_of


PROMPTS = [[5, 9, 3], [7], [11, 2, 8, 30, 4, 4, 17], [21, 22]]


@pytest.mark.parametrize("stride", [2, 3, 4])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_plugin_decisions_equal_the_engine(stride: int, temperature: float) -> None:
    model = TableLM(seed=stride)
    params = [SamplingParams(temperature=temperature if i != 1 else 0.0, max_new_tokens=40,
                             seed=100 + i) for i in range(len(PROMPTS))]
    engine = DecodingEngine(model, MASK, pad_token_id=PAD, stop_token_ids=[])
    expected = engine.generate([GenerationRequest(p, "isd", stride, s)
                                for p, s in zip(PROMPTS, params, strict=True)])
    served = serve(table_logits(model),
                   [Served(p, s) for p, s in zip(PROMPTS, params, strict=True)],
                   WindowSpec(stride, MASK, PAD))
    for want, got in zip(expected, served, strict=True):
        stats = want.stats
        assert got.output == want.token_ids
        assert got.windows == stats.forwards
        assert got.rounds == [stats.full_accept_rounds, stats.reject_rounds,
                              stats.cold_start_rounds]
        assert (got.tried, got.accepted) == (stats.tried, stats.accepted)
    kinds = [sum(r.rounds[i] for r in served) for i in range(3)]
    assert kinds[0] > 0 and kinds[1] > 0, f"both accepts and rejects must occur: {kinds}"


def test_argmax_proposals_match_the_engine_too() -> None:
    model = TableLM(seed=9)
    params = [SamplingParams(temperature=0.8, top_k=12, top_p=0.9, max_new_tokens=30,
                             seed=i, proposal="argmax") for i in range(3)]
    engine = DecodingEngine(model, MASK, pad_token_id=PAD, stop_token_ids=[])
    expected = engine.generate([GenerationRequest(p, "isd", 3, s)
                                for p, s in zip(PROMPTS, params, strict=False)])
    served = serve(table_logits(model), [Served(p, s) for p, s in zip(PROMPTS, params,
                                                                       strict=False)],
                   WindowSpec(3, MASK, PAD, proposal="argmax"))
    assert [s.output for s in served] == [e.token_ids for e in expected]


def test_sglang_greedy_and_no_top_k_conventions_are_translated() -> None:
    sampling = RowSampling.from_lists([1.0, 0.7, 0.0], [1, 1 << 30, 5], [1.0, 0.9, 1.0],
                                      [1, 2, 3])
    assert sampling.temperature.tolist() == pytest.approx([0.0, 0.7, 0.0])
    assert sampling.top_k.tolist() == [0, 0, 0]
    assert sampling.filters() == (False, True, True)


def test_fill_ids_and_trim_bookkeeping() -> None:
    assert fill_ids([4, 5, 6], 5, initialized=False) == (2, [4, 5, 6])          # context pass
    assert fill_ids([4, 5, 6], 5, initialized=True) == (2, [4, 5, 6, 0, 0, 0, 0])
    assert fill_ids([4], 3, initialized=False) == (0, [4, 0, 0])                 # no context
    # 10 committed before a 7-wide window; pending + 2 accepted drafts stay.
    assert trimmed_context(10, 3, 17, page_size=1) == (13, 13)
    assert trimmed_context(10, 3, 17, page_size=4) == (13, 16)                  # partial page
    with pytest.raises(ValueError, match="outside the 12 allocated"):
        trimmed_context(10, 3, 12, page_size=1)
    with pytest.raises(ValueError, match="no pending token"):
        fill_ids([], 3, initialized=True)
    with pytest.raises(ValueError, match="pad id equals the MASK id"):
        WindowSpec(4, mask_token_id=7, pad_token_id=7)


def test_window_layout_and_gate() -> None:
    spec = WindowSpec(3, MASK, PAD)
    states = [None, RowState(drafts=torch.tensor([8, 9]))]
    window = layout(spec, torch.tensor([4, 5]), torch.tensor([10, 20]), states)
    assert window.input_ids.tolist() == [[4, MASK, MASK, PAD, PAD], [5, 8, 9, MASK, MASK]]
    assert window.position_ids.tolist() == [list(range(10, 15)), list(range(20, 25))]
    assert gate(window).tolist() == [False, True, True, False, False,
                                     False, False, False, True, True]


def test_real_model_with_a_trimmed_kv_cache_decodes_like_ar() -> None:
    """A tiny Qwen3 run window by window on an HF cache cropped to the kept slots: the
    greedy output is the engine's ISD output and the model's own greedy AR output."""
    from transformers import DynamicCache

    model = tiny_qwen3(seed=3)
    spec = WindowSpec(4, MASK_ID, 0)
    caches: dict[int, DynamicCache] = {}

    def logits_of(rows, window):  # noqa: ANN001, ANN202
        out = []
        for index, request in enumerate(rows):
            cache = caches.setdefault(id(request), DynamicCache())
            if cache.get_seq_length() < len(request.cache):          # the context pass
                context = torch.tensor([request.cache])
                model(input_ids=context, past_key_values=cache, use_cache=True)
            assert cache.get_seq_length() == len(request.cache)
            out.append(model(input_ids=window.input_ids[index:index + 1],
                             position_ids=window.position_ids[index:index + 1],
                             past_key_values=cache, use_cache=True).logits[0])
        return torch.stack(out)

    prompts = [[3, 14, 15, 92, 65], [35, 89], [79]]
    params = SamplingParams(max_new_tokens=24)
    with torch.no_grad():
        served = serve(_cropping(logits_of, caches),
                       [Served(p, params) for p in prompts], spec)
    engine = DecodingEngine(model, MASK_ID, pad_token_id=0, stop_token_ids=[])
    isd = engine.generate([GenerationRequest(p, "isd", 4, params) for p in prompts])
    ar = engine.generate([GenerationRequest(p, "ar", 1, params) for p in prompts])
    assert [s.output for s in served] == [r.token_ids for r in isd] == [r.token_ids for r in ar]


def _cropping(logits_of, caches):  # noqa: ANN001, ANN202
    """Crop each request's HF cache to the slots the plugin keeps, before its next window."""
    def wrapped(rows, window):  # noqa: ANN001, ANN202
        for request in rows:
            cache = caches.get(id(request))
            drop = 0 if cache is None else cache.get_seq_length() - len(request.cache)
            if drop > 0:
                cache.crop(-drop)   # transformers 5: a negative count of tokens to drop
        return logits_of(rows, window)
    return wrapped
