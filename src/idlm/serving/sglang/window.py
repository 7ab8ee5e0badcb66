"""The ISD step SGLang runs on each request's window, as pure functions on tensors.

SGLang's dLLM loop gives every request a fixed-width block per round; ours is the ISD
window of W = 2N-1 slots starting at the pending token's position:

* verify:     ``[pending, s_1..s_D, MASK x D]``   (D = N-1)
* cold start: ``[pending, MASK x D, pad x D]``

The decisions come from the engine's own pure pieces, unchanged: ``bookkeeping``
(layout, logit rows, emitted tokens, kept slots), ``acceptance.verify_step`` (the
engine's own verification, with counter-based uniforms keyed by the request's seed, its
step counter and the decision slot) and ``algorithms`` (what the spec runs, the gate).
So a request served by SGLang makes the same accept / commit / trim decisions as in our
engine, given the same logits.

Between rounds a request carries a :class:`RowState` (drafts to verify, their q, its
step counter, and how many window slots to keep): the glue stores it on SGLang's
``Req.dllm_algo_state``. KV bookkeeping per round: the committed cache ends just before
the pending token; after the step it keeps ``kept`` window slots (pending + accepted
drafts) and frees the rest (:func:`trimmed_context`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from idlm.decoding import algorithms
from idlm.decoding import bookkeeping as book
from idlm.decoding.acceptance import StepOutcome, StepSampling, verify_step

TOP_K_OFF = 1 << 30   # SGLang's "whole vocabulary" top-k


@dataclass(frozen=True)
class WindowSpec:
    """The server-wide ISD settings (from the bundle's algorithm config)."""

    stride: int
    mask_token_id: int
    pad_token_id: int = 0
    proposal: str = algorithms.DEFAULT_PROPOSAL   # or "argmax" (verified as one-hot: exact)
    gated: bool = False        # the bundle carries the gated adapter (R-ISD)

    def __post_init__(self) -> None:
        if self.stride < 2:
            raise ValueError(f"ISD stride {self.stride}: use N >= 2")
        if self.pad_token_id == self.mask_token_id:
            raise ValueError("the pad id equals the MASK id: padding would open the gate")
        algorithms.for_request("isd", self.proposal, self.gated)   # fails at startup

    @property
    def algorithm(self) -> algorithms.Algorithm:
        """What the windows run: isd, risd (gated) or argmax (either), as in the engine."""
        return algorithms.for_request("isd", self.proposal, self.gated)

    @property
    def num_drafts(self) -> int:
        return self.stride - 1

    @property
    def width(self) -> int:
        """The block size SGLang must use: one pending slot, D drafts, D MASKs."""
        return 2 * self.stride - 1


@dataclass
class RowState:
    """One request's ISD state between rounds."""

    drafts: torch.Tensor | None = None       # [D] proposals to verify (None: cold start)
    draft_probs: torch.Tensor | None = None  # [D, V] q they came from (None: argmax picks)
    step_index: int = 0                      # the request's own step counter (RNG key)
    kept: int = 0                            # window slots to keep after the last step


@dataclass(frozen=True)
class RowSampling:
    """Per-row sampling, as the verifier takes it (temperature 0 = greedy)."""

    temperature: torch.Tensor   # [B] float32
    top_k: torch.Tensor         # [B] long, 0 = off
    top_p: torch.Tensor         # [B] float32
    seeds: torch.Tensor         # [B] long

    @classmethod
    def from_lists(cls, temperature: Sequence[float], top_k: Sequence[int],
                   top_p: Sequence[float], seeds: Sequence[int],
                   device: torch.device | str = "cpu") -> RowSampling:
        """SGLang marks greedy requests as top_k 1 (temperature reset to 1) and "no top-k"
        as 1 << 30: make them temperature 0 / top_k 0, as our engine takes them."""
        greedy = [k == 1 or t <= 0 for t, k in zip(temperature, top_k, strict=True)]
        top_k = [0 if k >= TOP_K_OFF or k < 0 else k for k in top_k]
        return cls(
            torch.tensor([0.0 if g else float(t) for g, t in zip(greedy, temperature,
                                                                  strict=True)],
                         dtype=torch.float32, device=device),
            torch.tensor([0 if g else int(k) for g, k in zip(greedy, top_k, strict=True)],
                         dtype=torch.long, device=device),
            torch.tensor([float(p) for p in top_p], dtype=torch.float32, device=device),
            torch.tensor([int(s) for s in seeds], dtype=torch.long, device=device))

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature <= 0).all())

    def filters(self) -> tuple[bool, bool, bool]:
        """As the engine decides them: top-k / top-p in use by a sampled row; any greedy row."""
        sampled = self.temperature > 0
        return (bool((sampled & (self.top_k > 0)).any()),
                bool((sampled & (self.top_p < 1)).any()), bool((~sampled).any()))

    def for_step(self, steps: torch.Tensor, argmax_proposal: bool) -> StepSampling:
        """This round's verifier input: the rows' step counters, the spec's argmax flag."""
        greedy = self.all_greedy   # a greedy step reads no filters: skip their host reads
        flags = torch.full(steps.shape, argmax_proposal, dtype=torch.bool, device=steps.device)
        return StepSampling(self.temperature, self.top_k, self.top_p, self.seeds, steps, flags,
                            greedy, (False, False, False) if greedy else self.filters())


@dataclass
class StepResult:
    """What one window decided, per row, on the host (what the scheduler consumes)."""

    emitted: list[list[int]]   # accepted drafts, then the bonus / replacement token
    kept: list[int]            # window slots whose KV stays (pending + accepted drafts)
    accepted: list[int]
    states: list[RowState]


def layout(spec: WindowSpec, pending: torch.Tensor, offsets: torch.Tensor,
           states: Sequence[RowState | None]) -> book.Window:
    """Every row's window (always W wide), positions ``offsets[r] + 0..W-1``."""
    rows, device = pending.shape[0], pending.device
    drafts = torch.zeros(rows, spec.num_drafts, dtype=torch.long, device=device)
    has_drafts = torch.zeros(rows, dtype=torch.bool, device=device)
    for row, state in enumerate(states):
        if state is not None and state.drafts is not None:
            drafts[row] = state.drafts.to(device)
            has_drafts[row] = True
    num_drafts = torch.full((rows,), spec.num_drafts, dtype=torch.long, device=device)
    return book.step_window(pending, drafts, has_drafts, num_drafts, offsets,
                            spec.mask_token_id, spec.pad_token_id, max_checked=spec.num_drafts)


def gate(window: book.Window) -> torch.Tensor:
    """R-ISD's per-token gate, flattened like SGLang's token rows: on at the MASK slots the
    window placed, off everywhere else (pending, drafts, padding, any context)."""
    return algorithms.gate(window).reshape(-1)


def step(spec: WindowSpec, window: book.Window, logits: torch.Tensor,
         states: Sequence[RowState | None], sampling: RowSampling) -> StepResult:
    """Verify each row's window from its logits [B, W, V] and decide what to commit."""
    drafts_width = spec.num_drafts
    rows = book.logit_rows(window.anchor, window.num_checked, drafts_width, spec.width)
    picked = logits.gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))
    drafts = window.input_ids[:, 1:1 + drafts_width]
    steps = torch.tensor([s.step_index if s is not None else 0 for s in states],
                         dtype=torch.long, device=logits.device)
    outcome = _verify(spec, picked, drafts, window.num_checked, states, sampling, steps)
    emitted, count = book.emitted_tokens(drafts, outcome.accepted, outcome.token)
    kept = book.kept_slots(window.anchor, outcome.accepted)
    host = torch.cat([emitted.flatten(), count, kept, outcome.accepted,
                      outcome.all_accepted.long()]).tolist()
    size = emitted.numel()
    count_h, kept_h, accepted_h, full_h = (host[size + i * len(states):
                                                size + (i + 1) * len(states)]
                                           for i in range(4))
    width = emitted.shape[1]
    emitted_h = [host[r * width:r * width + count_h[r]] for r in range(len(states))]
    new_states = [RowState(
        drafts=outcome.next_drafts[r] if full_h[r] else None,
        draft_probs=(outcome.next_draft_probs[r] if full_h[r] and
                     outcome.next_draft_probs is not None else None),
        step_index=int(steps[r]) + 1, kept=kept_h[r]) for r in range(len(states))]
    return StepResult(emitted_h, kept_h, accepted_h, new_states)


def _verify(spec: WindowSpec, picked: torch.Tensor, drafts: torch.Tensor,
            num_checked: torch.Tensor, states: Sequence[RowState | None],
            sampling: RowSampling, steps: torch.Tensor) -> StepOutcome:
    """The engine's verification step (``acceptance.verify_step``) on the windows' rows."""
    return verify_step(picked, drafts, num_checked,
                       lambda: _draft_probs(states, drafts, picked.shape[-1]),
                       sampling.for_step(steps, spec.algorithm.argmax_proposal))


def _draft_probs(states: Sequence[RowState | None], drafts: torch.Tensor,
                 vocab: int) -> torch.Tensor:
    """[B, D, V] q of each row's drafts; argmax picks (greedy rows) are one-hot q."""
    one_hot = torch.nn.functional.one_hot(drafts, vocab).to(torch.float32)
    for row, state in enumerate(states):
        if state is not None and state.draft_probs is not None:
            one_hot[row] = state.draft_probs.to(one_hot.device, torch.float32)
    return one_hot


# ---------------------------------------------------------------- scheduler bookkeeping
def fill_ids(committed: Sequence[int], width: int, initialized: bool
             ) -> tuple[int, list[int]]:
    """(window offset, the request's fill ids for this round).

    The committed cache always ends just before the last emitted token (the pending one,
    whose KV the next window computes), so the window starts at ``len(committed) - 1``.
    First round: the fill is the committed tokens and SGLang's context pass encodes
    ``[0, offset)``; later rounds (and one-token prompts, which have no context to encode):
    the fill ends with the window, pending first, the rest written by the algorithm.
    """
    if not committed:
        raise ValueError("a request with no tokens has no pending token to decode from")
    offset = len(committed) - 1
    if not initialized and offset > 0:
        return offset, list(committed)
    return offset, [*committed, *([0] * (width - 1))]


def trimmed_context(block_offset: int, kept: int, allocated: int, page_size: int
                    ) -> tuple[int, int]:
    """(committed KV length after the window, first KV slot to free). Slots are freed
    from the next page boundary on, as SGLang frees a partial page: the rest of a
    partly kept page is overwritten by the next window before anything reads it."""
    context = block_offset + kept
    if not 0 <= context <= allocated:
        raise ValueError(f"keeping {kept} window slots from {block_offset} leaves {context} "
                         f"committed slots, outside the {allocated} allocated")
    return context, -(-context // page_size) * page_size
