"""Decoding statistics: tokens per forward, acceptance per draft position, round kinds.

Counting (as in the tiny prototype, notes/tiny-prototype.md): TPF = tokens emitted
(including the stop token) / forwards the request took part in. The prefill counts as one
forward because it is fused with the first cold start (it emits the first token); AR
counts its prefill the same way. Acceptance at draft position i is conditional: position
i is *tried* only when positions < i were accepted in the same verify round.

Round kinds: V (all drafts accepted), R (a rejection), C (cold start: no drafts to verify,
including the fused prefill). AR requests have forwards and tokens only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

FULL_ACCEPT, REJECT, COLD_START = 0, 1, 2


@dataclass
class StatsTensors:
    """Per-row outcome counts kept on the device while a batch decodes.

    One step adds 1 to one slot of its row, so recording is one scatter whatever D is:
    slots ``0..D`` count rejecting verify rounds by drafts accepted k, slots ``D+1..2D+1``
    full-accept rounds by k, the last slot forwards without a verify (cold starts, the
    fused prefill, AR steps). Forwards, round kinds and per-position acceptance are read
    from these counts when a request finishes (``summary``).
    """

    counts: torch.Tensor   # [B, 2D+3]

    @classmethod
    def zeros(cls, rows: int, width_drafts: int, device: torch.device | str) -> StatsTensors:
        return cls(torch.zeros(rows, 2 * width_drafts + 3, dtype=torch.long, device=device))

    @property
    def width_drafts(self) -> int:
        return (self.counts.shape[1] - 3) // 2

    def record(self, active: torch.Tensor, num_checked: torch.Tensor, accepted: torch.Tensor,
               all_accepted: torch.Tensor) -> None:
        """Add one step's outcome for the ``active`` rows (one scatter)."""
        full = self.width_drafts + 1
        slot = torch.where(num_checked > 0, accepted + full * all_accepted, 2 * full)
        self.counts.scatter_add_(1, slot[:, None], active.to(torch.long)[:, None])

    def record_unverified(self, active: torch.Tensor) -> None:
        """A forward that verifies nothing (an AR step) for the ``active`` rows."""
        self.counts[:, -1] += active

    def summary(self, row: int, drafts: int) -> tuple[int, list[int], list[int], list[int]]:
        """Row ``row``'s (forwards, rounds V/R/C, tried, accepted) over its first ``drafts``
        positions; a row that drafts nothing (AR) has no rounds."""
        counts = self.counts[row].tolist()
        full = self.width_drafts + 1
        rejecting, accepting, unverified = counts[:full], counts[full:2 * full], counts[-1]
        forwards = sum(counts)
        if drafts == 0:
            return forwards, [0, 0, 0], [], []
        rounds = [sum(accepting), sum(rejecting), unverified]
        # Position i is tried when the i drafts before it passed: a rejecting round with
        # k >= i tried it (and failed at k); a full-accept round tried positions < k.
        tried = [sum(rejecting[i:]) + sum(accepting[i + 1:]) for i in range(drafts)]
        accepted = [sum(rejecting[i + 1:]) + sum(accepting[i + 1:]) for i in range(drafts)]
        return forwards, rounds, tried, accepted

    def select(self, rows: torch.Tensor) -> StatsTensors:
        return StatsTensors(self.counts.index_select(0, rows))

    def concat(self, other: StatsTensors) -> StatsTensors:
        return StatsTensors(torch.cat([self.counts, other.counts]))


@dataclass
class RequestStats:
    """One request's decoding statistics (plain Python, JSON-friendly)."""

    mode: str = "ar"
    stride: int = 1
    tokens: int = 0
    forwards: int = 0
    full_accept_rounds: int = 0
    reject_rounds: int = 0
    cold_start_rounds: int = 0
    tried: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def acceptance(self) -> list[float | None]:
        return [a / t if t else None for a, t in zip(self.accepted, self.tried, strict=True)]

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "stride": self.stride, "tokens": self.tokens,
                "forwards": self.forwards, "tokens_per_forward": self.tokens_per_forward,
                "full_accept_rounds": self.full_accept_rounds,
                "reject_rounds": self.reject_rounds, "cold_start_rounds": self.cold_start_rounds,
                "tried": self.tried, "accepted": self.accepted, "acceptance": self.acceptance}


def aggregate(stats: Iterable[RequestStats]) -> dict[str, Any]:
    """Totals over requests: TPF is total tokens / total forwards (not a mean of ratios)."""
    stats = list(stats)
    positions = max((len(s.tried) for s in stats), default=0)
    tried, accepted = [0] * positions, [0] * positions
    for item in stats:
        for slot, (t, a) in enumerate(zip(item.tried, item.accepted, strict=True)):
            tried[slot] += t
            accepted[slot] += a
    total = RequestStats(
        mode=",".join(sorted({s.mode for s in stats})),
        stride=max((s.stride for s in stats), default=1),
        tokens=sum(s.tokens for s in stats), forwards=sum(s.forwards for s in stats),
        full_accept_rounds=sum(s.full_accept_rounds for s in stats),
        reject_rounds=sum(s.reject_rounds for s in stats),
        cold_start_rounds=sum(s.cold_start_rounds for s in stats),
        tried=tried, accepted=accepted)
    summary = total.as_dict()
    summary["requests"] = len(stats)
    summary["compute_efficiency"] = compute_efficiency(total.tokens_per_forward, total.stride)
    return summary


def expected_tokens_per_forward(acceptance: float, stride: int) -> float:
    """TPF at i.i.d. per-draft acceptance p (docs/method.md):
    (2 + p + .. + p^{N-2}) / (2 - p^{N-1})."""
    numerator = 2 + sum(acceptance ** power for power in range(1, stride - 1))
    return numerator / (2 - acceptance ** (stride - 1))


def compute_efficiency(tokens_per_forward: float, stride: int) -> float:
    """TPF^2 / (2N-1) queries per forward: the paper's measure (AR = 1)."""
    return tokens_per_forward ** 2 / (2 * stride - 1) if stride > 1 else tokens_per_forward
