"""ISD verification as pure functions on tensors (no model, no cache): reusable by a server.

Shapes, for a batch of B rows whose widest stride gives D = N-1 draft slots:

* ``anchor``: [B, D+1, ...] the AR ("anchor") rows of a window: index 0 is ``pending``,
  index i the draft ``s_i``; row i gives the distribution p_i of the token after it.
* ``masks``: [B, D, ...] the MASK rows: q_j drafts the j-th token after the bonus.
* ``drafts``: [B, D] the drafts ``s_1..s_D`` proposed last step (from that step's q).
* ``num_checked``: [B] drafts to verify this step; 0 on a cold start (and in AR mode).

Rule (docs/method.md): verify left to right; ``k`` leading drafts are accepted. If all checked
drafts are accepted the step emits them plus a *bonus* drawn from p_k; otherwise it emits
the k accepted drafts plus a *replacement* drawn from norm(max(0, p_k - q_{k+1})) and the
next step is a cold start. Either way the emitted token after the accepted drafts is
``token`` and the KV entries kept are ``pending`` plus the k accepted drafts.

An *argmax proposal* (``argmax q`` instead of a draw from q) is a deterministic proposal,
so its proposal law is one-hot at the draft: the same rule with that one-hot as q accepts
with probability p(s) and on rejection draws from p with s removed. That keeps the
sampler exact; only the q used by the test differs from the q the draft was read from.

``verify_step`` is the one step both callers run (the engine on its batch, the SGLang
plugin on its windows): greedy when every row is, else warp, draw the step's counter
uniforms and verify sampled, with each row's argmax flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from idlm.decoding.sampling import counter_uniforms, decision_slots, sample_from, warp_probs


@dataclass
class StepOutcome:
    """What one verification step decided, per row."""

    accepted: torch.Tensor            # [B] k, leading drafts accepted
    token: torch.Tensor               # [B] bonus / replacement / AR token, emitted after them
    all_accepted: torch.Tensor        # [B] bool: k == num_checked (no rejection this step)
    next_drafts: torch.Tensor         # [B, D] proposals for the next step (from the MASK rows)
    # [B, D, V] the q those proposals were read from (None when greedy); argmax-proposal
    # rows are verified against a one-hot at the draft instead.
    next_draft_probs: torch.Tensor | None


@dataclass(frozen=True)
class StepSampling:
    """Per-row sampling of one verification step, as both callers hold it."""

    temperature: torch.Tensor      # [B] float, 0 = greedy
    top_k: torch.Tensor            # [B] 0 = off
    top_p: torch.Tensor            # [B] float, 1 = off
    seeds: torch.Tensor            # [B] the request's seed ...
    steps: torch.Tensor            # [B] ... and its own step counter (the uniforms' key)
    argmax_proposal: torch.Tensor  # [B] bool: drafts are argmax q (verified as one-hot q)
    all_greedy: bool               # every row has temperature 0
    filters: tuple[bool, bool, bool]  # top-k / top-p used by a sampled row; a greedy row


def verify_step(logits: torch.Tensor, drafts: torch.Tensor, num_checked: torch.Tensor,
                draft_probs: Callable[[], torch.Tensor], sampling: StepSampling
                ) -> StepOutcome:
    """Verify one window from its picked logits [B, 2D+1, V] (D+1 AR rows, then D MASK rows).

    ``draft_probs`` gives the [B, D, V] q of ``drafts``; it is called only when some row
    samples (an all-greedy step never reads q, and building it costs a [B, D, V] tensor).
    """
    width = drafts.shape[1]
    if sampling.all_greedy:
        best = logits.argmax(dim=-1)   # one argmax over the anchor and the MASK rows
        return greedy_outcome(best[:, :width + 1], best[:, width + 1:], drafts, num_checked)
    probs = warp_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                       *sampling.filters)
    uniforms = counter_uniforms(sampling.seeds, sampling.steps,
                                decision_slots(width, logits.device))
    return verify_sampled(
        probs[:, :width + 1], probs[:, width + 1:], drafts, draft_probs(), num_checked,
        accept_uniforms=uniforms[:, 1:width + 1], token_uniforms=uniforms[:, 0],
        draft_uniforms=uniforms[:, width + 1:], argmax_proposal=sampling.argmax_proposal)


def leading_accepts(accept: torch.Tensor, num_checked: torch.Tensor) -> torch.Tensor:
    """k per row: how many drafts, from the left, pass before the first failure."""
    slots = torch.arange(accept.shape[1], device=accept.device)
    checked = accept & (slots[None, :] < num_checked[:, None])
    return checked.to(torch.int64).cumprod(dim=1).sum(dim=1)


def verify_greedy(anchor_logits: torch.Tensor, mask_logits: torch.Tensor,
                  drafts: torch.Tensor, num_checked: torch.Tensor) -> StepOutcome:
    """T = 0: accept s_i iff it is argmax p_{i-1}; emit argmax p_k; drafts are argmax q."""
    return greedy_outcome(anchor_logits.argmax(dim=-1), mask_logits.argmax(dim=-1), drafts,
                          num_checked)


def greedy_outcome(anchor_argmax: torch.Tensor, mask_argmax: torch.Tensor,
                   drafts: torch.Tensor, num_checked: torch.Tensor) -> StepOutcome:
    """``verify_greedy`` from the argmax ids of the anchor [B, D+1] and MASK [B, D] rows."""
    width = drafts.shape[1]
    accepted = leading_accepts(drafts == anchor_argmax[:, :width], num_checked)
    token = anchor_argmax.gather(1, accepted[:, None]).squeeze(1)
    return StepOutcome(accepted, token, accepted == num_checked, mask_argmax, None)


def verify_sampled(anchor_probs: torch.Tensor, mask_probs: torch.Tensor, drafts: torch.Tensor,
                   draft_probs: torch.Tensor, num_checked: torch.Tensor,
                   accept_uniforms: torch.Tensor, token_uniforms: torch.Tensor,
                   draft_uniforms: torch.Tensor, argmax_proposal: torch.Tensor) -> StepOutcome:
    """T > 0: accept s_i with probability min(1, p(s_i) / q(s_i)); residual on rejection.

    ``draft_probs`` is the q each draft was drawn from; ``*_uniforms`` are [B, D], [B] and
    [B, D] in [0, 1). ``argmax_proposal`` rows propose argmax q instead of a draw from q;
    their drafts are verified against a one-hot q at the draft (their ``draft_probs`` are
    not read), which keeps them exact without materialising a [B, D, V] one-hot.
    """
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    width = drafts.shape[1]
    one_hot_rows = argmax_proposal[:, None]
    if width:
        p_of_draft = anchor_probs[:, :width].gather(2, drafts[..., None]).squeeze(2)
        q_of_draft = draft_probs.gather(2, drafts[..., None]).squeeze(2)
        q_of_draft = torch.where(one_hot_rows, 1.0, q_of_draft)
        # u < p/q, written without a division: q(s) > 0 because s was proposed from q.
        accept = accept_uniforms.to(p_of_draft.dtype) * q_of_draft < p_of_draft
        accepted = leading_accepts(accept, num_checked)
    else:
        accepted = torch.zeros_like(num_checked)
    all_accepted = accepted == num_checked
    target = anchor_probs[rows, accepted]
    if width:
        rejected = accepted.clamp(max=width - 1)
        residual = (target - draft_probs[rows, rejected]).clamp_(min=0)
        # max(0, p - one_hot(s)) is p with s removed (p(s) <= 1).
        without_draft = target.scatter(1, drafts[rows, rejected][:, None], 0.0)
        residual = torch.where(one_hot_rows, without_draft, residual)
        # A residual with no mass can only come from rounding (p == q never rejects).
        usable = residual.sum(-1, keepdim=True) > 0
        residual = torch.where(usable, residual, target)
        target = torch.where(all_accepted[:, None], target, residual)
    token = sample_from(target, token_uniforms)
    sampled_drafts = sample_from(mask_probs, draft_uniforms)
    next_drafts = torch.where(one_hot_rows, mask_probs.argmax(-1), sampled_drafts)
    return StepOutcome(accepted, token, all_accepted, next_drafts, mask_probs)
