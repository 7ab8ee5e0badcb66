"""Introspective acceptance: does the model's own AR distribution accept its MASK drafts?

Teacher-forced (docs/method.md): take a generation (prompt + response), lay it out as the IC
training layout ``[x_0 | MASK x R]`` (``idlm.objective``) once per block offset (one x_0
with a MASK half per offset, ``[x_0 | MASK x R | MASK x R ...]``: each half sees only x_0),
so every response position is drafted from every slot of a block, and compare each MASK row's
draft distribution q with the clean row's AR distribution p for the same token:

* greedy: the draft argmax q is accepted iff it equals argmax p;
* sampled (T > 0): a draft x ~ q is accepted with probability min(1, p(x)/q(x)), whose
  expectation is sum_x min(p(x), q(x)) = 1 - TV(p, q).

Draft position i (1-based) is the i-th MASK of a block: it drafts the token i+1 places
after the last clean token it sees, which is what ISD's draft s_i is.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from idlm.decoding.engine import decoder_parts, gate_positions
from idlm.decoding.sampling import warp_probs
from idlm.model.gate_holder import token_gate_of


@torch.inference_mode()
def introspective_acceptance(model: torch.nn.Module, sequences: Sequence[Sequence[int]],
                             prompt_lengths: Sequence[int], stride: int, mask_token_id: int,
                             pad_token_id: int = 0, temperature: float = 0.0,
                             top_k: int = 0, top_p: float = 1.0, batch_size: int = 16
                             ) -> dict[str, Any]:
    """Per draft position: acceptance rate of the model's MASK drafts by its own AR head."""
    from idlm.objective import MASKED, build_ic_batch, hidden_states

    if stride < 2:
        raise ValueError(f"stride must be >= 2 (got {stride})")
    decoder, head, _ = decoder_parts(model)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtype = head.weight.dtype
    gated = token_gate_of(decoder) is not None
    block = stride - 1
    accepted, counted = torch.zeros(block, dtype=torch.float64), torch.zeros(block)
    # Longest first, so a batch's rows are of about one length (little padding). Each row
    # holds one x_0 and a MASK half per block offset (one clean forward, not one per offset).
    jobs = sorted((index for index in range(len(sequences))
                   if 0 < prompt_lengths[index] < len(sequences[index])),
                  key=lambda index: -len(sequences[index]))
    offsets = tuple(range(block))
    for first in range(0, len(jobs), batch_size):
        chosen = jobs[first:first + batch_size]
        batch = build_ic_batch([sequences[i] for i in chosen],
                               [prompt_lengths[i] for i in chosen], stride, mask_token_id,
                               pad_token_id, [offsets] * len(chosen))
        batch = batch.to(head.weight.device)
        # A gated adapter is gated by layout (MASK rows), not by token id, as in decoding.
        gate = gate_positions(decoder, batch.kind == MASKED) if gated else nullcontext()
        with gate:
            hidden = hidden_states(causal_lm, batch, "sdpa", dtype)
        rows, slot, clean_index = _draft_rows(batch, [len(sequences[i]) for i in chosen],
                                              MASKED)
        draft_logits = head(hidden[rows[:, 0], rows[:, 1]])
        clean_logits = head(hidden[rows[:, 0], clean_index])
        score = _acceptance(clean_logits, draft_logits, temperature, top_k, top_p)
        accepted.index_add_(0, slot, score.to(torch.float64).cpu())
        counted.index_add_(0, slot, torch.ones_like(score).cpu())
    rates = [float(a / c) if c else None for a, c in zip(accepted, counted, strict=True)]
    total = float(accepted.sum() / counted.sum()) if counted.sum() else None
    return {"stride": stride, "temperature": temperature, "per_position": rates,
            "positions_scored": counted.long().tolist(), "mean": total}


def _draft_rows(batch: Any, lengths: list[int], masked_kind: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MASK rows that draft a real token: (batch, row) pairs, their slot, their clean twin.

    A MASK at position j drafts x[j+1]; the clean row at position j (index j in the x_0
    half) holds p for the same token. The last position has nothing left to draft.
    """
    length = torch.as_tensor(lengths, device=batch.kind.device)[:, None]
    drafting = (batch.kind == masked_kind) & (batch.position_ids + 1 < length)
    rows = drafting.nonzero()
    positions = batch.position_ids[rows[:, 0], rows[:, 1]]
    slot = (positions - batch.block_start[rows[:, 0], rows[:, 1]]).cpu()
    return rows, slot, positions


def _acceptance(clean_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float,
                top_k: int, top_p: float) -> torch.Tensor:
    if temperature <= 0:
        return (clean_logits.argmax(-1) == draft_logits.argmax(-1)).float()
    rows = clean_logits.shape[0]
    settings = (torch.full((rows,), temperature), torch.full((rows,), top_k),
                torch.full((rows,), top_p))
    settings = tuple(s.to(clean_logits.device) for s in settings)
    p = warp_probs(clean_logits[:, None], *settings)[:, 0]
    q = warp_probs(draft_logits[:, None], *settings)[:, 0]
    return torch.minimum(p, q).sum(-1)
