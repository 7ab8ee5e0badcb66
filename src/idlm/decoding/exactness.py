"""Exactness at T > 0: sampled continuations against the exact AR law of the same model.

Both tests read the same samples and the model's own teacher-forced probabilities, for ISD /
R-ISD and, as the tests' calibration, for AR sampling (exact by construction):

* **joint**: Pearson's chi-square of whole continuations against their exact probabilities,
  rare continuations pooled into one bin.
* **per position**: at each position t, the drawn tokens against the AR conditional given
  each sample's own prefix: observed counts O_t(v) against E_t(v) = sum_i p(v | x_i,<t),
  a quadratic form in the exact covariance of that sum of independent draws (rare tokens
  pooled). Long continuations spread the joint law over many rare outcomes and weaken
  the joint test; each position keeps its power, so a sampler that is right on the first
  tokens but wrong once drafts come from a full window fails at those positions.

Continuations default to 2N+1 tokens: the first window is a cold start (1 token), a full
accept adds N, so only from the third window on are drafts verified that a full window
(pending, drafts, MASKs; not padding) proposed: the steady state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from idlm.decoding.engine import DecodingEngine, decoder_parts, gate_positions
from idlm.decoding.requests import GenerationRequest, GenerationResult, SamplingParams
from idlm.decoding.sampling import warp_probs
from idlm.model.gate_holder import token_gate_of

# Elements of float64 probabilities held at once while scoring continuations (256 MiB).
SCORING_ELEMENTS = 1 << 25


def steady_state_continuation(stride: int) -> int:
    """The shortest continuation whose last window verifies drafts a full window made."""
    return 2 * stride + 1


@dataclass(frozen=True)
class Warp:
    """The sampling law under test (temperature, top-k, top-p)."""

    temperature: float
    top_k: int
    top_p: float


@dataclass
class PromptTally:
    """One prompt's test statistics (they add over prompts: independent samples)."""

    chi2: float
    bins: int
    total_variation: float
    positions: list[tuple[float, int]] = field(default_factory=list)  # (statistic, dof)
    steady_state_rounds: int = 0


def exactness_check(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                    mask_token_id: int, stride: int = 4, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, samples: int = 2000,
                    continuation: int | None = None, significance: float = 0.01,
                    proposal: str = "sample", seed: int = 0, max_batch_size: int = 64,
                    min_expected: float = 5.0, ar: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Joint and per-position chi-square tests of ISD and AR samples against the AR law.

    Each prompt gets ``samples`` continuations of ``continuation`` tokens (default 2N+1)
    per mode (seeds ``seed..``). Bins with an expected count below ``min_expected`` are
    pooled. A mode passes when the joint p-value is >= ``significance`` and every
    position's p-value is >= ``significance`` / positions (Bonferroni), so a sampler that
    is exact fails with probability at most 2 x ``significance``. AR's figures show what
    the tests do on a sampler that is exact by construction. ``ar``: the AR side of an
    earlier check of the same model, prompts and law (it does not depend on the
    proposal), which is then reused instead of sampled again.
    """
    continuation = continuation or steady_state_continuation(stride)
    engine = DecodingEngine(model, mask_token_id, max_batch_size=max_batch_size,
                            stop_token_ids=[])
    warp = Warp(temperature, top_k, top_p)
    report: dict[str, Any] = {"mode": engine.name, "stride": stride, "proposal": proposal,
                              "temperature": temperature, "top_k": top_k, "top_p": top_p,
                              "samples_per_prompt": samples, "continuation": continuation,
                              "significance": significance,
                              "test": "chi-square GOF, joint and per position"}
    if ar is not None:
        report["ar"] = ar
    for mode, offset in (("isd", 0), ("ar", 1 << 32)):
        if mode in report:
            continue
        sampling = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                   max_new_tokens=continuation, seed=seed + offset + i,
                                   proposal=proposal) for i in range(samples)]
        tallies = []
        for prompt in prompts:
            results = engine.generate([GenerationRequest(list(prompt), mode, stride, s)
                                       for s in sampling])
            tallies.append(tally_prompt(model, prompt, results, warp, min_expected))
        report[mode] = combine(tallies, significance)
    report["passed"] = report["isd"]["passed"]
    return report


def tally_prompt(model: torch.nn.Module, prompt: Sequence[int],
                 results: Sequence[GenerationResult], warp: Warp, min_expected: float
                 ) -> PromptTally:
    """Both tests' statistics for one prompt's samples."""
    counts = Counter(tuple(r.token_ids) for r in results)
    samples = len(results)
    exact = continuation_probabilities(model, prompt, list(counts), warp)
    chi2, bins = chi_square(counts, exact, samples, min_expected)
    return PromptTally(chi2, bins, total_variation(counts, exact, samples),
                       position_statistics(model, prompt, counts, warp, min_expected),
                       sum(steady_state_rounds(r) for r in results))


def combine(tallies: Sequence[PromptTally], significance: float) -> dict[str, Any]:
    """Statistics and degrees of freedom summed over prompts; the verdict of both tests."""
    chi2 = sum(t.chi2 for t in tallies)
    dof = sum(t.bins - 1 for t in tallies)
    p_value = chi_square_p_value(chi2, dof)
    length = min(len(t.positions) for t in tallies)
    statistics = [sum(t.positions[i][0] for t in tallies) for i in range(length)]
    freedoms = [sum(t.positions[i][1] for t in tallies) for i in range(length)]
    position_p = [chi_square_p_value(s, d) for s, d in zip(statistics, freedoms, strict=True)]
    position_level = significance / max(length, 1)
    positions_passed = all(p >= position_level for p in position_p)
    return {"chi2": chi2, "dof": dof, "p_value": p_value,
            "total_variation": [t.total_variation for t in tallies],
            "per_position": {"chi2": statistics, "dof": freedoms, "p_value": position_p,
                             "significance": position_level, "passed": positions_passed},
            "min_position_p_value": min(position_p, default=1.0),
            "steady_state_rounds": sum(t.steady_state_rounds for t in tallies),
            "passed": p_value >= significance and positions_passed}


def steady_state_rounds(result: GenerationResult) -> int:
    """Verify rounds whose drafts a full window proposed (a lower bound from the counts).

    Every verify round follows a cold start or a full-accept verify round; at most
    ``cold_start_rounds`` of them follow a cold start, the rest follow a full window.
    """
    stats = result.stats
    return max(0, stats.full_accept_rounds + stats.reject_rounds - stats.cold_start_rounds)


def _warped_chunks(model: torch.nn.Module, prompt: Sequence[int],
                   continuations: Sequence[tuple[int, ...]], warp: Warp
                   ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(which continuations, their ids [c, L], warped AR probabilities [c, L, V] float64)
    per chunk: row t is the law of token t given the prompt and the tokens before it."""
    decoder, head, _ = decoder_parts(model)
    device, prompt = head.weight.device, list(prompt)
    length, vocab = len(continuations[0]), head.weight.shape[0]
    chunk = max(1, SCORING_ELEMENTS // (length * vocab))
    gated = token_gate_of(decoder) is not None
    for start in range(0, len(continuations), chunk):
        rows = continuations[start:start + chunk]
        ids = torch.as_tensor([prompt + list(c) for c in rows], device=device)
        # The AR law: any gated adapter off, even where the ids hold the MASK id.
        gate = gate_positions(decoder, torch.zeros_like(ids, dtype=torch.bool)) if gated \
            else nullcontext()
        with gate:
            hidden = decoder(input_ids=ids).last_hidden_state[:, len(prompt) - 1:-1]
        settings = [torch.full((len(rows),), value, device=device)
                    for value in (warp.temperature, warp.top_k, warp.top_p)]
        probs = warp_probs(head(hidden), *settings, filter_top_k=warp.top_k > 0,
                           filter_top_p=warp.top_p < 1)
        yield slice(start, start + len(rows)), ids[:, len(prompt):], probs.double()


@torch.inference_mode()
def continuation_probabilities(model: torch.nn.Module, prompt: Sequence[int],
                               continuations: list[tuple[int, ...]], warp: Warp
                               ) -> dict[tuple[int, ...], float]:
    """Exact probability of each continuation under the warped AR distribution."""
    if not continuations:
        return {}
    joint: list[float] = []
    for _, tokens, probs in _warped_chunks(model, prompt, continuations, warp):
        joint += probs.gather(2, tokens[..., None]).squeeze(2).prod(dim=1).tolist()
    return dict(zip(continuations, joint, strict=True))


@torch.inference_mode()
def position_statistics(model: torch.nn.Module, prompt: Sequence[int], counts: Counter,
                        warp: Warp, min_expected: float) -> list[tuple[float, int]]:
    """(statistic, dof) per continuation position: the tokens drawn at t against the AR
    conditional of each sample's own prefix (two passes: bins first, then covariance)."""
    continuations = list(counts)
    if not continuations:
        return []
    weights = torch.tensor([counts[c] for c in continuations], dtype=torch.float64)
    expected = observed = None
    for rows, tokens, probs in _warped_chunks(model, prompt, continuations, warp):
        w = weights[rows].to(probs.device)
        if expected is None:
            expected, observed = torch.zeros_like(probs[0]), torch.zeros_like(probs[0])
        expected += torch.einsum("c,clv->lv", w, probs)
        observed.scatter_add_(1, tokens.T, w[None].expand(tokens.shape[1], -1))
    bins = [torch.nonzero(row >= min_expected).squeeze(1) for row in expected]
    second = [torch.zeros(len(b), len(b), dtype=torch.float64, device=expected.device)
              for b in bins]
    for rows, _, probs in _warped_chunks(model, prompt, continuations, warp):
        w = weights[rows].to(probs.device)
        for position, kept in enumerate(bins):
            picked = probs[:, position, kept]
            second[position] += (picked * w[:, None]).T @ picked
    return [_quadratic_form(observed[t], expected[t], bins[t], second[t], min_expected)
            for t in range(len(bins))]


def _quadratic_form(observed: torch.Tensor, expected: torch.Tensor, kept: torch.Tensor,
                    second_moment: torch.Tensor, min_variance: float) -> tuple[float, int]:
    """d' C^+ d over the kept bins, d = O - E, C = diag(E) - sum_i w_i p_i p_i' (the exact
    covariance of O), on the directions whose variance is >= ``min_variance``; their count
    is the dof. The pooled bin is implied (counts add up).

    A direction of small variance holds rare events (a near-certain token missed), whose
    counts are Poisson-like, not normal: kept, they would give an exact sampler tiny
    p-values, so they are left out like Pearson's rare bins.
    """
    pooled_expected = float(expected.sum() - expected[kept].sum())
    pooled_observed = float(observed.sum() - observed[kept].sum())
    if pooled_expected <= 1e-9 and pooled_observed > 0.5:
        return float("inf"), max(len(kept), 1)  # drawn where the AR law has no mass
    if len(kept) == 0:
        return 0.0, 0
    difference = observed[kept] - expected[kept]
    covariance = torch.diag(expected[kept]) - second_moment
    values, vectors = torch.linalg.eigh(covariance)
    usable = values >= min_variance
    if not bool(usable.any()):
        return 0.0, 0
    projected = vectors[:, usable].T @ difference
    return float((projected ** 2 / values[usable]).sum()), int(usable.sum())


def chi_square(counts: Counter, exact: dict[tuple[int, ...], float], samples: int,
               min_expected: float) -> tuple[float, int]:
    """Pearson's statistic and the number of bins (rare outcomes pooled into one)."""
    statistic, bins, pooled_observed, pooled_expected = 0.0, 0, 0, float(samples)
    for outcome, probability in exact.items():
        expected = samples * probability
        if expected >= min_expected:
            statistic += (counts[outcome] - expected) ** 2 / expected
            bins += 1
            pooled_expected -= expected
        else:
            pooled_observed += counts[outcome]
    if pooled_expected > 1e-9:
        statistic += (pooled_observed - pooled_expected) ** 2 / pooled_expected
        bins += 1
    elif pooled_observed:
        return float("inf"), max(bins, 2)
    return statistic, max(bins, 1)


def chi_square_p_value(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square(dof): the regularized upper incomplete gamma."""
    if dof <= 0:
        return 1.0
    if statistic == float("inf"):
        return 0.0
    value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                    torch.tensor(statistic / 2, dtype=torch.float64))
    return float(value)


def total_variation(counts: Counter, exact: dict[tuple[int, ...], float], samples: int
                    ) -> float:
    """TV between the empirical law and the exact one (unobserved mass counted in full)."""
    seen = sum(abs(counts[o] / samples - p) for o, p in exact.items())
    return 0.5 * (seen + max(0.0, 1.0 - sum(exact.values())))
