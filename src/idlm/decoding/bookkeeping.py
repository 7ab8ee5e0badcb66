"""Window layout, attention mask, commit and stop logic as pure functions on tensors.

A step's window for row r (D = widest draft count in the batch, W = 2D+1, n = its own):

* verify:     ``[pending, s_1..s_n, MASK x n, pad ...]``  (num_checked = n)
* cold start: ``[pending, MASK x n, pad ...]``             (num_checked = 0)
* AR (n = 0): ``[pending, pad ...]``

Positions are ``lengths[r] + 0..W-1`` and the window's KV lands in cache slots with the
same numbers (see kv_cache.py). The prefill is the same shape of step with the whole prompt
in front: ``[prompt..., MASK x n, pad ...]`` from slot 0, its last prompt token playing
``pending`` (the "anchor"). After verification a row keeps ``anchor + 1 + k`` new slots:
the prompt / pending token plus the k accepted drafts; MASK and rejected-draft slots are
dropped simply by not counting them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# ``Window.logit_rows`` when the verifier reads every row of the window, in order.
ALL_ROWS = torch.empty(0, dtype=torch.long)


@dataclass
class Window:
    """The input of one forward, plus where each row's pending token sits in it."""

    input_ids: torch.Tensor     # [B, W]
    position_ids: torch.Tensor  # [B, W]
    anchor: torch.Tensor        # [B] window index of pending (0, or prompt length - 1)
    num_checked: torch.Tensor   # [B] drafts verified in this window
    drafting: torch.Tensor      # [B, W] bool: the MASK slots (R-ISD's gate, by position)
    # [2D+1] window indices the verifier reads, the same for every row (``ALL_ROWS``: all
    # of them); None: per row, from ``logit_rows()``.
    logit_rows: torch.Tensor | None = None


@dataclass(frozen=True)
class UniformLayout:
    """The constant parts of a window in which every one of B rows drafts D tokens and
    every row verifies ``checked`` (D, or 0 on a cold start) drafts: the same layout as
    ``step_window`` gives such a batch, built once and reused, so a step lays out its
    window in three ops instead of a dozen."""

    masks: torch.Tensor        # [B, D] MASK ids
    offsets: torch.Tensor      # [W] 0..W-1
    anchor: torch.Tensor       # [B] zeros
    num_checked: torch.Tensor  # [B] checked
    drafting: torch.Tensor     # [B, W]
    logit_rows: torch.Tensor   # [2D+1] (ALL_ROWS when verifying)
    checked: int

    @classmethod
    def build(cls, rows: int, width_drafts: int, checked: int, mask_token_id: int,
              device: torch.device | str) -> UniformLayout:
        width = 1 + checked + width_drafts
        offsets = torch.arange(width, device=device)
        drafting = (offsets > checked).expand(rows, width)
        rows_read = logit_rows(torch.zeros(1, dtype=torch.long, device=device),
                               torch.full((1,), checked, device=device), width_drafts,
                               width)[0]
        return cls(torch.full((rows, width_drafts), mask_token_id, device=device), offsets,
                   torch.zeros(rows, dtype=torch.long, device=device),
                   torch.full((rows,), checked, dtype=torch.long, device=device), drafting,
                   ALL_ROWS if checked == width_drafts else rows_read, checked)

    def window(self, pending: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor
               ) -> Window:
        parts = [pending[:, None], drafts, self.masks] if self.checked else \
            [pending[:, None], self.masks]
        return Window(torch.cat(parts, dim=1), lengths[:, None] + self.offsets, self.anchor,
                      self.num_checked, self.drafting, self.logit_rows)


def step_window(pending: torch.Tensor, drafts: torch.Tensor, has_drafts: torch.Tensor,
                num_drafts: torch.Tensor, lengths: torch.Tensor, mask_token_id: int,
                pad_token_id: int, max_checked: int | None = None) -> Window:
    """Lay out every row's window at once (vectorised, no per-row Python).

    The width is 1 + max_checked + D: 2N-1 when some row verifies, N when every row
    is on a cold start (then the N-1 draft slots would only hold padding).
    """
    rows, width_drafts = drafts.shape
    max_checked = width_drafts if max_checked is None else max_checked
    width = 1 + max_checked + width_drafts
    num_checked = torch.where(has_drafts, num_drafts, torch.zeros_like(num_drafts))
    index = torch.arange(width, device=pending.device)[None, :]
    draft_part = (index >= 1) & (index <= num_checked[:, None])
    mask_part = (index > num_checked[:, None]) & (index <= (num_checked + num_drafts)[:, None])
    padded_drafts = torch.cat([pending[:, None], drafts, drafts], dim=1)[:, :width]
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long, device=pending.device)
    input_ids = torch.where(draft_part, padded_drafts, input_ids)
    input_ids = torch.where(mask_part, mask_token_id, input_ids)
    input_ids[:, 0] = pending
    position_ids = lengths[:, None] + index
    return Window(input_ids, position_ids, torch.zeros_like(lengths), num_checked, mask_part)


def prefill_window(prompts: Sequence[Sequence[int]], num_drafts: Sequence[int],
                   width_drafts: int, mask_token_id: int, pad_token_id: int,
                   device: torch.device | str) -> Window:
    """``[prompt, MASK x n, pad]`` per row from position 0: prefill fused with a cold start."""
    width = max(len(prompt) for prompt in prompts) + width_drafts
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    drafting = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, drafts) in enumerate(zip(prompts, num_drafts, strict=True)):
        input_ids[row, :len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[row, len(prompt):len(prompt) + drafts] = mask_token_id
        drafting[row, len(prompt):len(prompt) + drafts] = True
    anchor = torch.as_tensor([len(prompt) - 1 for prompt in prompts], dtype=torch.long)
    positions = torch.arange(width).expand(len(prompts), width)
    return Window(input_ids.to(device), positions.to(device), anchor.to(device),
                  torch.zeros(len(prompts), dtype=torch.long, device=device),
                  drafting.to(device))


def shared_rows(window: Window) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the first row of each distinct prefill window, each row's index into those) when
    some rows repeat another row exactly (ids, positions and MASK slots); else None."""
    rows = window.input_ids.shape[0]
    if rows < 2:
        return None
    key = torch.cat([window.input_ids, window.position_ids, window.drafting.long()], dim=1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    if distinct.shape[0] == rows:
        return None
    first = torch.full((distinct.shape[0],), rows, dtype=torch.long, device=key.device)
    first.scatter_reduce_(0, inverse, torch.arange(rows, device=key.device), "amin")
    return first, inverse


def attention_mask(lengths: torch.Tensor, width: int, key_length: int) -> torch.Tensor:
    """Bool [B, 1, W, K]: query i of row r sees cache slots <= lengths[r] + i (causal).

    Slots a row has not committed but another row has (ragged lengths) fall beyond its
    own window and are hidden; every query sees at least slot 0, so no row is all-masked.
    """
    query_limit = lengths[:, None] + torch.arange(width, device=lengths.device)[None, :]
    slots = torch.arange(key_length, device=lengths.device)
    return (slots[None, None, :] <= query_limit[:, :, None])[:, None]


def logit_rows(anchor: torch.Tensor, num_checked: torch.Tensor, width_drafts: int,
               window_width: int) -> torch.Tensor:
    """[B, 2D+1] window indices whose logits the verifier needs: D+1 anchor rows, D MASK rows."""
    offsets = torch.arange(width_drafts + 1, device=anchor.device)
    anchor_rows = anchor[:, None] + offsets[None, :]
    mask_rows = (anchor + 1 + num_checked)[:, None] + offsets[None, :width_drafts]
    return torch.cat([anchor_rows, mask_rows], dim=1).clamp_(max=window_width - 1)


def kept_slots(anchor: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """[B] window slots whose KV stays committed after verification: the anchor (pending
    token, or the last prompt token), everything before it, and the k accepted drafts.
    The rest (rejected drafts, MASK and padding slots) is dropped; a server trims it."""
    return anchor + 1 + accepted


def emitted_tokens(drafts: torch.Tensor, accepted: torch.Tensor, token: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, D+1] tokens this step emits (k accepted drafts, then ``token``) and their count."""
    emitted = torch.cat([drafts, token[:, None]], dim=1)   # past the count: unread
    emitted.scatter_(1, accepted[:, None], token[:, None])
    return emitted, accepted + 1


def commit_tokens(buffer: torch.Tensor, written: torch.Tensor, budget: torch.Tensor,
                  stop_token_ids: torch.Tensor, emitted: torch.Tensor, count: torch.Tensor,
                  active: torch.Tensor, stopped: torch.Tensor, finished: torch.Tensor
                  ) -> None:
    """Append each active row's emitted tokens up to its first stop token (kept, as
    transformers keeps it) and its budget, in place, and mark the rows that end.

    ``emitted`` [B, D+1] holds ``count`` real tokens per row; ``stop_token_ids`` is [B, S]
    padded with -1. All D+1 tokens are written from ``written`` on (the buffer has D+1
    spare columns), and ``written`` then counts only the kept ones: what lies beyond it
    is never read and the next step overwrites it. A dozen ops, whatever B and D are.
    """
    slots = torch.arange(emitted.shape[1], device=emitted.device)
    is_stop = (emitted[:, :, None] == stop_token_ids[:, None, :]).any(-1)
    first_stop = torch.where(is_stop, slots, emitted.shape[1]).amin(1)
    limit = torch.minimum(count, budget - written)
    keep = torch.minimum(first_stop + 1, limit) * active
    stop_now = (first_stop < limit) & active
    buffer.scatter_(1, written[:, None] + slots, emitted)
    written += keep
    stopped |= stop_now
    finished |= stop_now | (written >= budget)


def commit_single(buffer: torch.Tensor, written: torch.Tensor, budget: torch.Tensor,
                  stop_token_ids: torch.Tensor, token: torch.Tensor, active: torch.Tensor,
                  stopped: torch.Tensor, finished: torch.Tensor) -> None:
    """AR's commit (one token per row), in place: the general path's result with fewer ops."""
    keep = active & (written < budget)
    is_stop = (token[:, None] == stop_token_ids).any(-1)
    spare = buffer.shape[1] - 1
    buffer.scatter_(1, torch.where(keep, written, spare)[:, None], token[:, None])
    written += keep
    stopped |= keep & is_stop
    finished |= active & (is_stop | (written >= budget))
