"""Continuous batching: a long-lived session that admits requests while others decode.

``EngineSession`` owns the running batch and the waiting queue of one ``DecodingEngine``.
A caller (``DecodingEngine.generate``, or the server's engine thread) submits requests at
any time and calls :meth:`EngineSession.step` in a loop; each step is one forward (a
prefill of newly admitted requests, or one decode step of the running batch) and returns
what happened: which requests were admitted, the tokens committed for streaming requests
and the results of the requests that finished.

The session's ``CallShape`` is fixed when it opens (widest draft count, longest budget,
most stop ids), so batches admitted at different times can be merged. A request's output
does not depend on its batch mates or on that shape: greedy decoding reads the same
logits, and sampling draws counter-based uniforms keyed by the request's own seed and
step (see ``sampling.counter_uniforms``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from idlm.decoding.batch import CallShape, DecodeBatch
from idlm.decoding.requests import MAX_STRIDE, GenerationRequest, GenerationResult, request_error
from idlm.decoding.stats import RequestStats


class SteppableEngine(Protocol):
    """What a session drives: the public step surface of ``engine.DecodingEngine``."""

    stop_token_ids: list[int]
    vocab_size: int
    device: torch.device

    def prefill(self, chosen: list[GenerationRequest], handles: list[int], shape: CallShape,
                stop_string_ends: set[int]) -> DecodeBatch: ...

    def decode_step(self, batch: DecodeBatch, shape: CallShape,
                    stop_string_ends: set[int]) -> None: ...

    def result(self, batch: DecodeBatch, row: int, request: GenerationRequest,
               stop_string_ends: set[int]) -> GenerationResult: ...

    def empty_stats(self, request: GenerationRequest) -> RequestStats: ...


@dataclass
class StepEvents:
    """What one step did. Handles are the ints :meth:`EngineSession.submit` returned."""

    admitted: list[int] = field(default_factory=list)        # prefilled in this step
    tokens: dict[int, list[int]] = field(default_factory=dict)  # streaming handles only
    finished: list[GenerationResult] = field(default_factory=list)  # result.index = handle


def serving_shape(engine: SteppableEngine, max_stride: int, max_new_tokens: int,
                  stop_width: int | None = None) -> CallShape:
    """The fixed shape of a server's session: stride N <= ``max_stride`` (1 = AR only)."""
    if not 1 <= max_stride <= MAX_STRIDE:
        raise ValueError(f"max_stride {max_stride} is not in 1..{MAX_STRIDE}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} < 1")
    width_drafts = max_stride - 1
    stops = len(engine.stop_token_ids) if stop_width is None else stop_width
    return CallShape(width_drafts, engine.vocab_size, max(1, stops),
                     max_new_tokens + width_drafts + 1, engine.device)


class EngineSession:
    """Submit, step, cancel. Not thread-safe: one thread owns a session (and its engine)."""

    def __init__(self, engine: SteppableEngine, shape: CallShape) -> None:
        self.engine, self.shape = engine, shape
        self._requests: dict[int, GenerationRequest] = {}
        self._waiting: deque[int] = deque()
        self._streaming: dict[int, int] = {}     # handle -> tokens already handed out
        self._errors: list[GenerationResult] = []
        self._batch: DecodeBatch | None = None
        self._reported: list[bool] = []          # per batch row: result given (or cancelled)
        self._stop_string_ends: set[int] = set()
        self._next_handle = 0

    # ------------------------------------------------------------------ queries
    @property
    def max_new_tokens(self) -> int:
        return self.shape.token_width - self.shape.width_drafts - 1

    @property
    def idle(self) -> bool:
        """Nothing to do: no waiting request, no running row, no error to hand out."""
        return not self._waiting and self._batch is None and not self._errors

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._reported.count(False)

    def validate(self, request: GenerationRequest) -> str | None:
        """Why this session cannot run ``request`` (one line), or None. Reads no state."""
        engine, sampling = self.engine, request.sampling
        error = request_error(request, engine.context_length, engine.vocab_size,
                              engine.mask_token_id, engine.tokenizer is not None)
        if error is not None:
            return error
        if request.num_drafts > self.shape.width_drafts:
            return (f"stride N={request.stride} is above this session's largest "
                    f"N={self.shape.width_drafts + 1}")
        if sampling.max_new_tokens > self.max_new_tokens:
            return (f"max_new_tokens {sampling.max_new_tokens} is above this session's cap "
                    f"of {self.max_new_tokens}")
        stops = sampling.stop_token_ids
        if stops is not None and len(stops) > self.shape.stop_width:
            return (f"{len(stops)} stop token ids: this session takes at most "
                    f"{self.shape.stop_width}")
        return None

    # ------------------------------------------------------------------ commands
    def submit(self, request: GenerationRequest, *, stream: bool = False) -> int:
        """Queue ``request``; an invalid one comes back as an error result at the next step.

        ``stream``: report this request's newly committed tokens in every step's events.
        """
        handle = self._next_handle
        self._next_handle += 1
        error = self.validate(request)
        if error is not None:
            self._errors.append(GenerationResult(handle, finish_reason="error", error=error,
                                                 stats=self.engine.empty_stats(request)))
            return handle
        self._requests[handle] = request
        self._waiting.append(handle)
        if stream:
            self._streaming[handle] = 0
        return handle

    @torch.inference_mode()
    def cancel(self, handle: int) -> bool:
        """Drop a waiting or running request (no result will come). False if unknown/done."""
        if handle in self._waiting:
            self._waiting.remove(handle)
            self._forget(handle)
            return True
        batch = self._batch
        if batch is None or handle not in self._requests or handle not in batch.request_ids:
            return False
        row = batch.request_ids.index(handle)
        batch.finished[row] = True   # inactive from now on; compaction drops the row
        self._reported[row] = True
        self._forget(handle)
        batch.refresh_host()
        return True

    @torch.inference_mode()
    def step(self) -> StepEvents:
        """One forward: admit waiting requests if rows are free, else decode one step."""
        events = StepEvents(finished=self._errors)
        self._errors = []
        engine, batch = self.engine, self._batch
        free = engine.max_batch_size - (batch.rows if batch is not None else 0)
        if self._waiting and free > 0:
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            fresh = engine.prefill([self._requests[h] for h in admitted], admitted,
                                    self.shape, self._stop_string_ends)
            self._batch = fresh if batch is None else batch.concat(fresh)
            self._reported += [False] * len(admitted)
            events.admitted = admitted
        elif batch is not None:
            engine.decode_step(batch, self.shape, self._stop_string_ends)
        else:
            return events
        self._collect(events)
        self._compact()
        return events

    # ------------------------------------------------------------------ internals
    def _collect(self, events: StepEvents) -> None:
        """New tokens of streaming rows, then the results of newly finished rows."""
        batch = self._batch
        assert batch is not None
        if self._streaming:
            self._collect_tokens(events, batch)
        if batch.finished_count <= self._reported.count(True):
            return
        for row, flag in enumerate(batch.finished.tolist()):
            if flag and not self._reported[row]:
                handle = batch.request_ids[row]
                self._reported[row] = True
                events.finished.append(self.engine.result(
                    batch, row, self._requests[handle], self._stop_string_ends))
                self._forget(handle)

    def _collect_tokens(self, events: StepEvents, batch: DecodeBatch) -> None:
        """One device read for all streaming rows: their written counts and next tokens."""
        rows = [row for row, handle in enumerate(batch.request_ids)
                if handle in self._streaming and not self._reported[row]]
        if not rows:
            return
        span = self.shape.width_drafts + 1   # a step commits at most N tokens per row
        index = torch.as_tensor(rows, device=batch.tokens.device)
        sent = torch.as_tensor([self._streaming[batch.request_ids[r]] for r in rows],
                               device=batch.tokens.device)
        columns = (sent[:, None] + torch.arange(span, device=sent.device)[None, :]).clamp_(
            max=batch.tokens.shape[1] - 1)
        window = batch.tokens.index_select(0, index).gather(1, columns)
        table = torch.cat([batch.written.index_select(0, index)[:, None], window], 1).tolist()
        for row, (written, *tokens) in zip(rows, table, strict=True):
            handle = batch.request_ids[row]
            already = self._streaming[handle]
            if written <= already:
                continue
            fresh = tokens[:written - already] if written - already <= span else \
                batch.tokens[row, already:written].tolist()
            events.tokens[handle] = fresh
            self._streaming[handle] = written

    def _compact(self) -> None:
        """Drop finished rows when it pays off.

        Dropping copies the cache once; keeping a dead row costs a share of every step.
        So rows leave when an eighth of the batch is done, or someone is waiting for a slot.
        """
        batch = self._batch
        if batch is None or batch.finished_count == 0:
            return
        if batch.finished_count < max(1, batch.rows // 8) and not self._waiting \
                and batch.finished_count < batch.rows:
            return
        keep = [row for row, flag in enumerate(batch.finished.tolist()) if not flag]
        if not keep:
            self._batch, self._reported = None, []
            return
        self._batch = batch.select(torch.as_tensor(keep, device=batch.lengths.device))
        self._reported = [False] * len(keep)

    def _forget(self, handle: int) -> None:
        self._requests.pop(handle, None)
        self._streaming.pop(handle, None)
        self._stop_string_ends.discard(handle)
