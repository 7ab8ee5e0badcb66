"""The running batch: per-row decoding state as device tensors, plus its KV cache.

Everything a step reads or writes for a row lives in one [rows, ...] tensor, so a step
is a fixed number of tensor ops whatever the batch size, and finished rows leave (and
admitted rows join) by one ``index_select`` / ``cat`` per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from idlm.decoding import algorithms
from idlm.decoding.acceptance import StepSampling
from idlm.decoding.kv_cache import RaggedKVCache
from idlm.decoding.requests import GenerationRequest, SamplingParams
from idlm.decoding.stats import StatsTensors


@dataclass(frozen=True)
class CallShape:
    """Widths shared by every batch of one ``generate`` call (so batches can be merged)."""

    width_drafts: int        # D: the widest request's N-1
    vocab_size: int
    stop_width: int          # S: most stop ids of any request
    token_width: int         # largest token budget + D + 1 spare columns
    device: torch.device


@dataclass
class DecodeBatch:
    """Row state. Host lists (``request_ids``, ``params``) mirror the row order."""

    request_ids: list[int]
    params: list[SamplingParams]
    lengths: torch.Tensor          # [B] committed KV slots
    pending: torch.Tensor          # [B] emitted token whose KV is not in the cache yet
    drafts: torch.Tensor           # [B, D]
    draft_probs: torch.Tensor | None  # [B, D, V] q each draft came from (None: all greedy;
                                      # argmax-proposal rows: unread, q is one-hot)
    has_drafts: torch.Tensor       # [B] bool: next step verifies (else cold start)
    num_drafts: torch.Tensor       # [B] N-1 (0 for AR)
    drafting: torch.Tensor         # [B] bool: num_drafts > 0
    temperature: torch.Tensor      # [B] float
    top_k: torch.Tensor            # [B]
    top_p: torch.Tensor            # [B] float
    seeds: torch.Tensor            # [B]
    argmax_proposal: torch.Tensor  # [B] bool: drafts are argmax q (verified as one-hot q)
    step_index: torch.Tensor       # [B] the request's own step counter (RNG key)
    tokens: torch.Tensor           # [B, token_width] generated ids
    written: torch.Tensor          # [B] how many of them are real
    budget: torch.Tensor           # [B] max new tokens (capped by the context)
    stop_ids: torch.Tensor         # [B, S] padded with -1
    finished: torch.Tensor         # [B] bool
    stopped: torch.Tensor          # [B] bool: ended by a stop token / string
    stats: StatsTensors
    cache: RaggedKVCache
    cache_vocab: int = 0           # V, for one-hot q of greedy drafts
    max_length: int = 0            # host copy of lengths.max(), refreshed once per step
    finished_count: int = 0        # host copy of finished.sum(), refreshed once per step
    max_checked: int = 0           # host copy of the most drafts any row verifies next step
    min_checked: int = 0           # ... and the fewest
    min_drafts: int = 0            # host copy of num_drafts.min()

    def refresh_host(self) -> None:
        """The step's one device->host read: what the next window's shape depends on."""
        if not self.request_ids:
            self.max_length = self.finished_count = self.max_checked = 0
            self.min_checked = self.min_drafts = 0
            return
        checked = self.num_drafts * self.has_drafts
        values = torch.stack([self.lengths.max(), self.finished.sum(), checked.max(),
                              checked.min(), self.num_drafts.min()]).tolist()
        (self.max_length, self.finished_count, self.max_checked, self.min_checked,
         self.min_drafts) = values

    @property
    def rows(self) -> int:
        return len(self.request_ids)

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)

    @property
    def filters(self) -> tuple[bool, bool, bool]:
        """Whether any sampled row uses top-k / top-p, and whether any row is greedy."""
        sampled = [p for p in self.params if not p.greedy]
        return (any(p.top_k > 0 for p in sampled), any(p.top_p < 1 for p in sampled),
                len(sampled) < len(self.params))

    def step_sampling(self) -> StepSampling:
        """The rows' sampling for this step's verification (the flags read on the host)."""
        return StepSampling(self.temperature, self.top_k, self.top_p, self.seeds,
                            self.step_index, self.argmax_proposal, self.all_greedy,
                            self.filters)

    def draft_probs_or_one_hot(self) -> torch.Tensor:
        """q of the current drafts; greedy drafts were argmax picks, i.e. one-hot q."""
        if self.draft_probs is not None:
            return self.draft_probs
        return torch.nn.functional.one_hot(self.drafts, self.cache_vocab).to(torch.float32)

    def select(self, rows: torch.Tensor) -> DecodeBatch:
        """The batch restricted to ``rows`` (device index tensor), cache included."""
        host_rows = rows.tolist()
        changes: dict[str, object] = {
            "request_ids": [self.request_ids[r] for r in host_rows],
            "params": [self.params[r] for r in host_rows],
            "stats": self.stats.select(rows),
        }
        for name in _row_tensor_fields():
            value = getattr(self, name)
            changes[name] = None if value is None else value.index_select(0, rows)
        self.cache.select_rows(rows)
        selected = DecodeBatch(**{**self.__dict__, **changes})
        selected.refresh_host()
        return selected

    def concat(self, other: DecodeBatch) -> DecodeBatch:
        """This batch's rows followed by ``other``'s (same CallShape)."""
        changes: dict[str, object] = {
            "request_ids": self.request_ids + other.request_ids,
            "params": self.params + other.params,
            "stats": self.stats.concat(other.stats),
        }
        for name in _row_tensor_fields():
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "draft_probs" and (mine is None) != (theirs is None):
                mine, theirs = self.draft_probs_or_one_hot(), other.draft_probs_or_one_hot()
            changes[name] = None if mine is None else torch.cat([mine, theirs])
        self.cache.concat(other.cache)
        merged = DecodeBatch(**{**self.__dict__, **changes})
        merged.refresh_host()
        return merged


def _row_tensor_fields() -> list[str]:
    skip = {"request_ids", "params", "stats", "cache", "cache_vocab", "max_length",
            "finished_count", "max_checked", "min_checked", "min_drafts"}
    return [f.name for f in fields(DecodeBatch) if f.name not in skip]


def new_batch(requests: Sequence[GenerationRequest], request_ids: Sequence[int],
              budgets: Sequence[int], default_stop_ids: Sequence[int], shape: CallShape,
              cache: RaggedKVCache, *, gated: bool) -> DecodeBatch:
    """Row tensors for freshly admitted requests (before their prefill); ``gated``: the
    model carries the gated adapter (which algorithm runs a request depends on it)."""
    device, rows = shape.device, len(requests)
    params = [request.sampling for request in requests]
    runs = [algorithms.for_request(r.mode, r.sampling.proposal, gated) for r in requests]

    def column(values: Sequence[float | int | bool], dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(list(values), dtype=dtype).to(device)

    stop_ids = torch.full((rows, shape.stop_width), -1, dtype=torch.long)
    for row, p in enumerate(params):
        ids = list(default_stop_ids if p.stop_token_ids is None else p.stop_token_ids)
        stop_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    zeros = torch.zeros(rows, dtype=torch.long, device=device)
    num_drafts = column([a.num_drafts(r.stride) for a, r in zip(runs, requests, strict=True)],
                        torch.long)
    return DecodeBatch(
        request_ids=list(request_ids), params=params,
        lengths=zeros.clone(), pending=zeros.clone(),
        drafts=torch.zeros(rows, shape.width_drafts, dtype=torch.long, device=device),
        draft_probs=None, has_drafts=zeros.bool(),
        num_drafts=num_drafts, drafting=num_drafts > 0,
        temperature=column([max(p.temperature, 0.0) for p in params], torch.float32),
        top_k=column([p.top_k for p in params], torch.long),
        top_p=column([p.top_p for p in params], torch.float32),
        seeds=column([p.seed for p in params], torch.long),
        argmax_proposal=column([a.argmax_proposal for a in runs], torch.bool),
        step_index=zeros.clone(),
        tokens=torch.zeros(rows, shape.token_width, dtype=torch.long, device=device),
        written=zeros.clone(), budget=column(budgets, torch.long), stop_ids=stop_ids.to(device),
        finished=zeros.bool(), stopped=zeros.bool(),
        stats=StatsTensors.zeros(rows, shape.width_drafts, device), cache=cache,
        cache_vocab=shape.vocab_size)
