"""Sampling primitives on tensors: warped distributions, counter-based uniforms, draws.

Randomness is *counter-based*: the uniform a request uses for a decision is a hash of
(its seed, its own step counter, the decision's slot). Nothing depends on which rows
share the batch or on a global generator's state, so a request's sampled output is the
same alone or in a batch of 64, and any step can be replayed.

Draws are by inverse CDF in float64 (one uniform per token, not one per vocabulary
entry), which is exact for one-hot distributions: greedy rows run through the same code
as sampled rows and still pick the argmax.
"""

from __future__ import annotations

import torch

# Decision slots within one step of one request. Fixed numbers, not offsets computed from
# the batch's widest stride, so a request's stream never depends on its batch-mates.
TOKEN_SLOT = 0
ACCEPT_SLOT = 1          # + draft index
DRAFT_SLOT = 1 << 10     # + MASK index

_MASK32 = 0xFFFFFFFF


def _mul32(values: torch.Tensor, constant: int) -> torch.Tensor:
    """(values * constant) mod 2**32 without int64 overflow (16-bit halves of the constant)."""
    high, low = constant >> 16, constant & 0xFFFF
    return (values * low + (((values * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (Wellons' lowbias32) on int64 tensors holding uint32 values."""
    values = values ^ (values >> 16)
    values = _mul32(values, 0x7FEB352D)
    values = values ^ (values >> 15)
    values = _mul32(values, 0x846CA68B)
    return values ^ (values >> 16)


def counter_uniforms(seeds: torch.Tensor, steps: torch.Tensor, slots: torch.Tensor
                     ) -> torch.Tensor:
    """Uniforms in [0, 1) of shape [rows, len(slots)], float64, a pure function of the inputs."""
    seeds = seeds.to(torch.int64)
    state = _mix32((seeds & _MASK32) ^ 0x9E3779B9)
    state = _mix32(state ^ ((seeds >> 32) & _MASK32))
    state = _mix32(state ^ (steps.to(torch.int64) & _MASK32))[:, None]
    slot_state = _mix32(state ^ (slots.to(state.device, torch.int64)[None, :] * 2))
    high = _mix32(slot_state ^ 0x68E31DA4) >> 5          # 27 bits
    low = _mix32(slot_state ^ 0x1B56C4E9) >> 6           # 26 bits
    return (high * (1 << 26) + low).to(torch.float64) / float(1 << 53)


def decision_slots(width_drafts: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The slots of one ISD step, in the verifier's order: the emitted token, then the D
    accept tests, then the D draft draws (what ``counter_uniforms`` is keyed by)."""
    drafts = torch.arange(width_drafts)
    return torch.cat([torch.tensor([TOKEN_SLOT]), ACCEPT_SLOT + drafts,
                      DRAFT_SLOT + drafts]).to(device)


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One draw per row of ``probs`` [..., V] (unnormalised is fine) by inverse CDF."""
    cdf = probs.to(torch.float64).cumsum(-1)
    threshold = (uniforms.to(torch.float64) * cdf[..., -1]).unsqueeze(-1)
    # First index whose cumulative mass exceeds u * total: zero-mass tokens are never chosen.
    index = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return index.clamp_(max=probs.shape[-1] - 1)


def warp_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, filter_top_k: bool = True, filter_top_p: bool = True,
               greedy_rows: bool = True) -> torch.Tensor:
    """Per-row temperature, top-k, top-p: [rows, positions, V] logits -> probabilities.

    Rows with temperature 0 become one-hot on the argmax (greedy). ``filter_*`` and
    ``greedy_rows`` let the caller skip work no row in the batch needs (known per batch).
    """
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature).to(logits.dtype)[:, None, None]
    if filter_top_k or filter_top_p:
        scaled = _filter_top_k_top_p(scaled, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)
    if not greedy_rows:
        return probs
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None, None], one_hot, probs)


def _filter_top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                        ) -> torch.Tensor:
    """Keep each row's top-k tokens, then the smallest head holding top-p of the mass."""
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=scaled.device)
    k = torch.where(top_k > 0, top_k, vocab).to(scaled.device)[:, None, None]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    # The top token always stays, so top_p never empties a row.
    keep = (mass_before < top_p.to(scaled.dtype)[:, None, None]) | (ranks == 0)
    filtered = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, order, filtered)
