"""The batched decoding engine: AR, ISD and R-ISD over one ragged KV cache.

The loop here only calls the model and moves state; the decisions live in pure
functions (``bookkeeping``, ``acceptance``, ``sampling``, ``stats``) and in the registry
``algorithms`` (what runs a request: ``ar``, ``isd``, ``risd``, ``argmax``). One step is
one decoder forward over every running row's window, then one verification
(``acceptance.verify_step``, the SGLang plugin's too), then one commit; the host reads
two numbers per step (the longest row and how many finished).

R-ISD is ISD on a model that carries a gated LoRA (``idlm.model.gated_lora``). The engine
sets the gate itself, from the window layout (``algorithms.gate``): on at the MASK slots
it placed, off everywhere else. That is the token rule ``input_ids == MASK`` whenever the
context holds no MASK id, and stays lossless when it does (a random base can emit the
MASK id as an ordinary token; AR would treat it as one, so R-ISD must too).

The decoder forward is ``lean_forward``'s: a functional Qwen3 over the model's weights
that reads the gated LoRA as fused low-rank updates at the MASK rows (transformers'
decoder only for models it cannot run; ``forward_fallback`` says why).

Scheduling (admission, streaming, retirement) lives in ``scheduler.EngineSession``:
``generate`` runs one session per call, a server keeps one open (``open_session``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from idlm.decoding import algorithms
from idlm.decoding import bookkeeping as book
from idlm.decoding.acceptance import StepOutcome, verify_step
from idlm.decoding.batch import CallShape, DecodeBatch, new_batch
from idlm.decoding.kv_cache import RaggedKVCache
from idlm.decoding.lean_forward import decoder_forward, gate_positions, lm_head
from idlm.decoding.requests import (
    DecodingError,
    GenerationRequest,
    GenerationResult,
    request_error,
)
from idlm.decoding.sampling import counter_uniforms, decision_slots, sample_from, warp_probs
from idlm.decoding.scheduler import EngineSession, serving_shape
from idlm.decoding.stats import COLD_START, FULL_ACCEPT, REJECT, RequestStats
from idlm.model.gate_holder import token_gate_of

logger = logging.getLogger(__name__)

# Capacity reserved up front beyond the prompt; the cache grows by doubling after that.
INITIAL_GENERATION_CAPACITY = 256


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(decoder, LM head, config) of a causal LM or of a PEFT model wrapping one."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.get_decoder(), causal_lm.get_output_embeddings(), causal_lm.config


class DecodingEngine:
    """Serve many requests at once; each has its own mode, stride, sampling and length."""

    def __init__(self, model: torch.nn.Module, mask_token_id: int, *,
                 pad_token_id: int | None = None, stop_token_ids: Sequence[int] | None = None,
                 tokenizer: Any = None, max_batch_size: int = 64,
                 context_length: int | None = None, compile: bool = False) -> None:
        self.model = model.eval()
        self.decoder, self.head, config = decoder_parts(model)
        self.logits = lm_head(self.head)   # hidden -> logits (the head, laid out for speed)
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = _pad_id(pad_token_id, config, self.mask_token_id)
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids is not None else _eos(config)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context_length = context_length or config.max_position_embeddings
        self.config = config
        self.vocab_size = self.head.weight.shape[0]
        self.device = self.head.weight.device
        self.cache_dtype = self.head.weight.dtype
        self.gated = _check_gate(self.decoder, self.mask_token_id)
        self.forwards_run = 0   # decoder calls so far (benchmarks divide wall time by it)
        # The constant parts of uniform windows, by (rows, D, drafts checked).
        self._layouts: dict[tuple[int, int, int], book.UniformLayout] = {}
        _check_full_attention(config)
        # The lean forward, or transformers' decoder with the reason (None when lean).
        self.decode_forward, self.forward_fallback = decoder_forward(
            self.decoder, config, self.context_length,
            token_gate_of(self.decoder), compile)
        if self.forward_fallback is not None:
            logger.warning("decoding engine: %s", self.forward_fallback)
        if self.mask_token_id >= self.vocab_size:
            raise DecodingError(f"MASK id {self.mask_token_id} is outside the model's "
                                f"{self.vocab_size}-row vocabulary")

    @property
    def name(self) -> str:
        """The drafting system this engine runs: ``isd``, or ``risd`` on a gated model."""
        return algorithms.for_request("isd", algorithms.DEFAULT_PROPOSAL, self.gated).name

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Decode every request; invalid ones get an error result, the rest are unaffected."""
        results: list[GenerationResult | None] = [None] * len(requests)
        valid = []
        for index, request in enumerate(requests):
            error = request_error(request, self.context_length, self.vocab_size,
                                  self.mask_token_id, self.tokenizer is not None)
            if error is None:
                valid.append(index)
            else:
                results[index] = GenerationResult(index, finish_reason="error", error=error,
                                                  stats=self.empty_stats(request))
        if valid:
            self._run(requests, valid, results)
        return [result for result in results if result is not None]

    def open_session(self, *, max_stride: int, max_new_tokens: int | None = None
                     ) -> EngineSession:
        """A continuous-batching session of fixed shape (a server's: one engine thread).

        ``max_stride`` 1 admits AR only; ``max_new_tokens`` defaults to the context length.
        """
        cap = self.context_length if max_new_tokens is None else max_new_tokens
        return EngineSession(self, serving_shape(self, max_stride, cap))

    # ------------------------------------------------------------------ scheduling
    def _run(self, requests: Sequence[GenerationRequest], valid: list[int],
             results: list[GenerationResult | None]) -> None:
        """One session shaped for this call; results come back as rows finish."""
        session = EngineSession(self, self._call_shape([requests[i] for i in valid]))
        handles = {session.submit(requests[index]): index for index in valid}
        while not session.idle:
            for result in session.step().finished:
                result.index = handles[result.index]
                results[result.index] = result

    def _call_shape(self, requests: list[GenerationRequest]) -> CallShape:
        stops = [len(r.sampling.stop_token_ids) if r.sampling.stop_token_ids is not None
                 else len(self.stop_token_ids) for r in requests]
        width_drafts = max(r.num_drafts for r in requests)
        longest = max(r.sampling.max_new_tokens for r in requests)
        return CallShape(width_drafts, self.vocab_size, max([1, *stops]),
                         longest + width_drafts + 1, self.device)

    def _budget(self, request: GenerationRequest) -> int:
        return min(request.sampling.max_new_tokens, self.context_length - len(request.prompt_ids))

    # ------------------------------------------------------------------ step surface
    # What ``scheduler.EngineSession`` drives (its ``SteppableEngine`` protocol).
    def prefill(self, chosen: list[GenerationRequest], handles: list[int], shape: CallShape,
                 stop_string_ends: set[int]) -> DecodeBatch:
        """Prompt + first cold start in one forward (the prompt is never run again)."""
        prompts = [list(r.prompt_ids) for r in chosen]
        budgets = [self._budget(r) for r in chosen]
        capacity = (max(map(len, prompts)) + 2 * shape.width_drafts + 1
                    + min(max(budgets), INITIAL_GENERATION_CAPACITY))
        cache = RaggedKVCache.for_model(self.config, len(chosen), capacity, self.cache_dtype,
                                        self.device)
        batch = new_batch(chosen, handles, budgets, self.stop_token_ids, shape, cache,
                          gated=self.gated)
        window = book.prefill_window(prompts, [r.num_drafts for r in chosen],
                                     shape.width_drafts, self.mask_token_id, self.pad_token_id,
                                     self.device)
        self._advance(batch, window, shape, stop_string_ends, prefill=True)
        return batch

    def decode_step(self, batch: DecodeBatch, shape: CallShape, stop_string_ends: set[int]) -> None:
        """One decode step of the running batch (``stop_string_ends`` collects the handles
        that a stop string ended)."""
        if shape.width_drafts == 0:
            self._step_ar(batch, stop_string_ends)
            return
        window = self._uniform_window(batch, shape.width_drafts)
        if window is None:
            window = book.step_window(batch.pending, batch.drafts, batch.has_drafts,
                                      batch.num_drafts, batch.lengths, self.mask_token_id,
                                      self.pad_token_id, batch.max_checked)
        self._advance(batch, window, shape, stop_string_ends)

    def _uniform_window(self, batch: DecodeBatch, width_drafts: int) -> book.Window | None:
        """The common step in a few ops: every row drafts D and every row verifies D
        drafts, or every row is on a cold start (what the host read last step says);
        None otherwise (mixed strides, some rows cold: the general layout)."""
        if batch.min_drafts != width_drafts:
            return None
        if batch.min_checked == width_drafts:
            checked = width_drafts
        elif batch.max_checked == 0:
            checked = 0
        else:
            return None
        layout = self._layouts.get((batch.rows, width_drafts, checked))
        if layout is None:
            layout = book.UniformLayout.build(batch.rows, width_drafts, checked,
                                              self.mask_token_id, self.device)
            self._layouts[(batch.rows, width_drafts, checked)] = layout
        return layout.window(batch.pending, batch.drafts, batch.lengths)

    # ------------------------------------------------------------------ one step
    def _advance(self, batch: DecodeBatch, window: book.Window, shape: CallShape,
                 stop_string_ends: set[int], prefill: bool = False) -> None:
        logits = self._forward(batch, window, shape.width_drafts, prefill)
        outcome = self._verify(batch, logits, window.num_checked)
        written_before = batch.written.clone() if self._has_stop_strings(batch) else None
        self._commit(batch, window, outcome)
        if written_before is not None:
            self._apply_stop_strings(batch, written_before, stop_string_ends)
        batch.refresh_host()

    def _step_ar(self, batch: DecodeBatch, stop_string_ends: set[int]) -> None:
        """An all-AR batch: the same cache and rules with one query per row and fewer ops."""
        self.forwards_run += 1
        # No MASK row: an adapter's gate stays off and the lean forward skips the LoRA.
        hidden = self.decode_forward(batch.pending[:, None], batch.lengths[:, None],
                                     batch.cache, batch.lengths, batch.max_length + 1, None)
        logits = self.logits(hidden)
        if batch.all_greedy:
            token = logits[:, 0].argmax(-1)
        else:
            probs = warp_probs(logits, batch.temperature, batch.top_k, batch.top_p,
                               *batch.filters)
            uniforms = counter_uniforms(batch.seeds, batch.step_index,
                                        decision_slots(0, logits.device))
            token = sample_from(probs[:, 0], uniforms[:, 0])
        active = ~batch.finished
        written_before = batch.written.clone() if self._has_stop_strings(batch) else None
        book.commit_single(batch.tokens, batch.written, batch.budget, batch.stop_ids, token,
                           active, batch.stopped, batch.finished)
        if written_before is not None:
            self._apply_stop_strings(batch, written_before, stop_string_ends)
        batch.stats.record_unverified(active)
        batch.lengths += active
        batch.pending = token
        batch.step_index += 1
        batch.refresh_host()

    def _forward(self, batch: DecodeBatch, window: book.Window, width_drafts: int,
                 prefill: bool = False) -> torch.Tensor:
        """Logits [B, 2D+1, V] at the rows the verifier reads (never the whole prompt)."""
        width = window.input_ids.shape[1]
        self.forwards_run += 1
        shared = book.shared_rows(window) if prefill else None
        if shared is None:
            hidden = self.decode_forward(window.input_ids, window.position_ids, batch.cache,
                                         batch.lengths, batch.max_length + width,
                                         algorithms.gate(window))
        else:
            hidden = self._shared_prefill(batch, window, *shared)
        if window.logit_rows is not None:   # a uniform window: the rows are known
            picked = hidden if window.logit_rows is book.ALL_ROWS else \
                hidden.index_select(1, window.logit_rows)
            return self.logits(picked)
        rows = book.logit_rows(window.anchor, window.num_checked, width_drafts, width)
        picked = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.logits(picked)

    def _shared_prefill(self, batch: DecodeBatch, window: book.Window, first: torch.Tensor,
                        inverse: torch.Tensor) -> torch.Tensor:
        """Rows with the same prefill window (one prompt sampled many times: ``n`` > 1, the
        exactness checks) run it once; their KV and hidden states are copied to the rest.
        Each row still verifies and samples on its own."""
        width = window.input_ids.shape[1]
        cache = RaggedKVCache.for_model(self.config, first.numel(), batch.cache.capacity,
                                        self.cache_dtype, self.device)
        lengths = batch.lengths.index_select(0, first)
        hidden = self.decode_forward(window.input_ids.index_select(0, first),
                                     window.position_ids.index_select(0, first), cache,
                                     lengths, int(lengths.max()) + width,
                                     algorithms.gate(window).index_select(0, first))
        cache.select_rows(inverse)
        batch.cache.keys, batch.cache.values = cache.keys, cache.values
        return hidden.index_select(0, inverse)

    def _verify(self, batch: DecodeBatch, logits: torch.Tensor, num_checked: torch.Tensor
                ) -> StepOutcome:
        """The shared step (``acceptance.verify_step``) on the batch's rows."""
        return verify_step(logits, batch.drafts, num_checked, batch.draft_probs_or_one_hot,
                           batch.step_sampling())

    def _commit(self, batch: DecodeBatch, window: book.Window, outcome: StepOutcome) -> None:
        """Emit, stop, advance lengths and hand the MASK proposals to the next step."""
        active = ~batch.finished
        emitted, count = book.emitted_tokens(batch.drafts, outcome.accepted, outcome.token)
        book.commit_tokens(batch.tokens, batch.written, batch.budget, batch.stop_ids, emitted,
                           count, active, batch.stopped, batch.finished)
        batch.stats.record(active, window.num_checked, outcome.accepted, outcome.all_accepted)
        batch.lengths += (window.anchor + count) * active
        batch.pending = outcome.token
        batch.drafts = outcome.next_drafts
        batch.draft_probs = outcome.next_draft_probs
        batch.has_drafts = outcome.all_accepted & batch.drafting
        batch.step_index += 1

    # ------------------------------------------------------------------ stop strings
    def _has_stop_strings(self, batch: DecodeBatch) -> bool:
        return any(p.stop_strings for p in batch.params)

    def _apply_stop_strings(self, batch: DecodeBatch, written_before: torch.Tensor,
                            stop_string_ends: set[int]) -> None:
        """Host-side text check, only for the rows that asked for stop strings."""
        rows = [row for row, p in enumerate(batch.params) if p.stop_strings]
        before, after = written_before.tolist(), batch.written.tolist()
        for row in rows:
            if after[row] == before[row]:
                continue
            strings = batch.params[row].stop_strings
            lookback = 4 * max(map(len, strings)) + 1
            start = max(0, before[row] - lookback)
            tokens = batch.tokens[row, start:after[row]].tolist()
            for end in range(before[row] + 1, after[row] + 1):
                text = self.tokenizer.decode(tokens[:end - start])
                if any(stop in text for stop in strings):
                    batch.written[row] = end
                    batch.finished[row] = True
                    batch.stopped[row] = True
                    stop_string_ends.add(batch.request_ids[row])
                    break

    # ------------------------------------------------------------------ results
    def result(self, batch: DecodeBatch, row: int, request: GenerationRequest,
                stop_string_ends: set[int]) -> GenerationResult:
        written = int(batch.written[row])
        token_ids = batch.tokens[row, :written].tolist()
        stats = self.empty_stats(request)
        drafts = request.num_drafts
        forwards, rounds, stats.tried, stats.accepted = batch.stats.summary(row, drafts)
        stats.tokens, stats.forwards = written, forwards
        stats.full_accept_rounds = rounds[FULL_ACCEPT]
        stats.reject_rounds, stats.cold_start_rounds = rounds[REJECT], rounds[COLD_START]
        if batch.request_ids[row] in stop_string_ends:
            reason = "stop_string"
        else:
            reason = "stop" if bool(batch.stopped[row]) else "length"
        text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else None
        return GenerationResult(batch.request_ids[row], token_ids, reason, stats, text=text)

    def empty_stats(self, request: GenerationRequest) -> RequestStats:
        """Labelled by system (``isd`` / ``risd`` for every drafting request, else ``ar``)."""
        drafting = request.mode in algorithms.modes() and algorithms.for_mode(request.mode).drafts
        return RequestStats(mode=self.name if drafting else "ar",
                            stride=request.stride if drafting else 1)


@torch.inference_mode()
def clean_logits(model: torch.nn.Module, input_ids: torch.Tensor, first_row: int = 0
                 ) -> torch.Tensor:
    """Plain causal logits with any gated adapter off (the AR law, even if ids hold MASK),
    at rows ``first_row`` onwards (the LM head is not applied to the rows before)."""
    decoder, head, _ = decoder_parts(model)
    gated = token_gate_of(decoder) is not None
    gate = gate_positions(decoder, torch.zeros_like(input_ids, dtype=torch.bool)) if gated \
        else nullcontext()
    with gate:
        return head(decoder(input_ids=input_ids).last_hidden_state[:, first_row:])


def _pad_id(pad_token_id: int | None, config: Any, mask_token_id: int) -> int:
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    if pad == mask_token_id:
        raise DecodingError("the pad id equals the MASK id: window padding would turn the "
                            "gated LoRA on; pass a different pad_token_id")
    return pad


def _eos(config: Any) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def _check_gate(decoder: torch.nn.Module, mask_token_id: int) -> bool:
    token_gate = token_gate_of(decoder)
    if token_gate is None:
        return False
    if token_gate.mask_token_id != mask_token_id:
        raise DecodingError(f"the gated adapter turns on at MASK id {token_gate.mask_token_id} "
                            f"but the engine drafts with MASK id {mask_token_id}")
    return True


def _check_full_attention(config: Any) -> None:
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise DecodingError(f"layer types {sorted(kinds)}: the engine supports full attention "
                            "only (no sliding-window layers)")
