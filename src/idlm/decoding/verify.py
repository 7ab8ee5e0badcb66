"""The checks behind the ``verify`` stage, as library functions returning plain dicts.

* :func:`lossless_check`: speculative greedy (ISD on the IC model, or R-ISD on base + gated
  adapter) against the reference model's AR greedy, token for token, compared both with
  the engine's own AR path and with what transformers' greedy ``generate`` would emit
  (its argmax after every prefix, teacher-forced), both models in one dtype.
  Every divergence names the prompt, the first divergent index and the reference's top-2
  logit margin there; a margin within a few ulps of the logits in that dtype is a
  *near-tie* (float noise can flip it), reported apart from real mismatches (a bug).
* :func:`idlm.decoding.exactness.exactness_check`: at T > 0, joint and per-position
  chi-square tests of sampled continuations against the *exact* AR law of the same model,
  for ISD / R-ISD with sampled and with argmax proposals, and AR as calibration.
* :func:`acceptance_sweep`: TPF, per-position acceptance and round kinds for several
  strides, overall and per prompt kind, the TPF that the formula (docs/method.md) predicts from
  the measured acceptance, and the teacher-forced introspective acceptance.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from idlm.decoding.engine import DecodingEngine, clean_logits, decoder_parts
from idlm.decoding.exactness import exactness_check
from idlm.decoding.introspection import introspective_acceptance
from idlm.decoding.requests import GenerationRequest, SamplingParams
from idlm.decoding.stats import RequestStats, aggregate, expected_tokens_per_forward

MAX_REPORTED_MISMATCHES = 20
# A divergence whose top-2 margin is at most this many ulps of the top logit (in the
# models' dtype) is a near-tie: two kernels may round it either way.
NEAR_TIE_ULPS = 4
# The checks whose failure fails the verify stage (argmax proposals are exact too).
GATING = ("lossless_risd", "lossless_isd", "exactness_isd", "exactness_risd",
          "exactness_isd_argmax_proposal")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def lossless_check(reference_model: torch.nn.Module, speculative_model: torch.nn.Module,
                   prompts: Sequence[Sequence[int]], mask_token_id: int, stride: int = 4,
                   max_new_tokens: int = 64, stop_token_ids: Sequence[int] | None = None,
                   max_batch_size: int = 64, compare_transformers: bool = True
                   ) -> dict[str, Any]:
    """Greedy ISD/R-ISD on ``speculative_model`` == AR greedy of ``reference_model``?

    Passes with no real mismatch; near-ties (margins below the dtype's resolution) are
    counted and listed but do not fail it.
    """
    return _lossless(reference_model, speculative_model, prompts, mask_token_id, stride,
                     max_new_tokens, stop_token_ids, max_batch_size, compare_transformers)[0]


def _lossless(reference_model: torch.nn.Module, speculative_model: torch.nn.Module,
              prompts: Sequence[Sequence[int]], mask_token_id: int, stride: int,
              max_new_tokens: int, stop_token_ids: Sequence[int] | None, max_batch_size: int,
              compare_transformers: bool) -> tuple[dict[str, Any], list[list[int]], list]:
    """:func:`lossless_check`'s report, the reference's AR greedy tokens and the
    speculative run's results (an acceptance sweep at the same stride reuses them)."""
    dtype = _same_dtype(reference_model, speculative_model)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(
        None if stop_token_ids is None else tuple(stop_token_ids)))
    reference = DecodingEngine(reference_model, mask_token_id, max_batch_size=max_batch_size)
    speculative = DecodingEngine(speculative_model, mask_token_id,
                                 max_batch_size=max_batch_size)
    requests = [GenerationRequest(list(p), "ar", 1, sampling) for p in prompts]
    ar = [r.token_ids for r in reference.generate(requests)]
    isd_results = speculative.generate(
        [GenerationRequest(list(p), "isd", stride, sampling) for p in prompts])
    divergences = _compare(reference_model, prompts, ar, [r.token_ids for r in isd_results],
                           "engine_ar")
    if compare_transformers:
        stops = reference.stop_token_ids if stop_token_ids is None else list(stop_token_ids)
        divergences += transformers_divergences(
            reference_model, prompts, ar, [r.token_ids for r in isd_results], max_new_tokens,
            stops)
    real = sorted({d["prompt_index"] for d in divergences if not d["near_tie"]})
    near = sorted({d["prompt_index"] for d in divergences if d["near_tie"]} - set(real))
    return {"prompts": len(prompts), "mode": speculative.name, "stride": stride,
            "dtype": str(dtype).removeprefix("torch."),
            "tokens_compared": sum(map(len, ar)), "mismatches": len(real),
            "near_ties": len(near), "mismatch_details": divergences[:MAX_REPORTED_MISMATCHES],
            "passed": not real, "stats": aggregate(r.stats for r in isd_results)}, ar, \
        isd_results


def _same_dtype(reference_model: torch.nn.Module, speculative_model: torch.nn.Module
                ) -> torch.dtype:
    """The one dtype both models compute in (a lossless check across dtypes means nothing)."""
    dtypes = {decoder_parts(m)[1].weight.dtype for m in (reference_model, speculative_model)}
    if len(dtypes) != 1:
        raise ValueError(f"the reference and speculative models differ in dtype "
                         f"({', '.join(sorted(map(str, dtypes)))}): load both in the serving "
                         "dtype")
    return dtypes.pop()


@torch.inference_mode()
def transformers_greedy(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                        max_new_tokens: int, stop_token_ids: Sequence[int], pad_token_id: int,
                        max_batch_size: int = 64) -> list[list[int]]:
    """``generate`` on prompts of one length at a time, up to ``max_batch_size`` together:
    no padding (the cleanest reference there is), and 4x faster than one prompt per call
    on the tiny verify. A row that stops before the others is cut after its stop token,
    as the engine keeps it."""
    device = decoder_parts(model)[1].weight.device
    stops = set(stop_token_ids)
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    outputs: list[list[int]] = [[] for _ in prompts]
    for length, indices in by_length.items():
        for start in range(0, len(indices), max_batch_size):
            chunk = indices[start:start + max_batch_size]
            ids = torch.as_tensor([list(prompts[i]) for i in chunk], device=device)
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=max_new_tokens, eos_token_id=list(stop_token_ids) or None,
                pad_token_id=pad_token_id, top_k=None, top_p=None, temperature=None)
            for row, index in enumerate(chunk):
                tokens = generated[row, length:].tolist()
                end = next((i + 1 for i, token in enumerate(tokens) if token in stops),
                           len(tokens))
                outputs[index] = tokens[:end]
    return outputs


@torch.inference_mode()
def transformers_divergences(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                             ar: Sequence[Sequence[int]], speculative: Sequence[Sequence[int]],
                             max_new_tokens: int, stop_token_ids: Sequence[int]
                             ) -> list[dict[str, Any]]:
    """Where transformers' greedy decoding of ``model`` leaves the engine's AR tokens
    (``transformers_vs_engine_ar``) and the speculative ones (``transformers``).

    Greedy ``generate`` emits the argmax after each prefix, so one teacher-forced
    transformers forward over prompt + candidate (unpadded, one sequence at a time) decides
    it: the first prefix whose argmax is not the candidate's next token is where
    ``generate`` would diverge, and a candidate that matches throughout and ends as
    ``generate`` ends (a stop token, or the token budget) is what it returns. On the tiny
    verify this is one forward per sequence instead of 64 decode steps per prompt length
    (8 s of each lossless check). A speculative candidate equal to the AR one shares its
    result.
    """
    against_ar = [_transformers_divergence(model, prompt, ar[index], max_new_tokens,
                                           stop_token_ids, index, "transformers_vs_engine_ar")
                  for index, prompt in enumerate(prompts)]
    against_speculative = [
        [{**d, "against": "transformers"} for d in against_ar[index]]
        if list(speculative[index]) == list(ar[index]) else
        _transformers_divergence(model, prompt, speculative[index], max_new_tokens,
                                 stop_token_ids, index, "transformers")
        for index, prompt in enumerate(prompts)]
    return [d for found in against_ar + against_speculative for d in found]


def _transformers_divergence(model: torch.nn.Module, prompt: Sequence[int],
                             tokens: Sequence[int], max_new_tokens: int,
                             stop_token_ids: Sequence[int], index: int, against: str
                             ) -> list[dict[str, Any]]:
    device = decoder_parts(model)[1].weight.device
    tokens = list(tokens)
    ids = torch.as_tensor([list(prompt) + tokens], device=device)
    # Row j predicts generated token j (the last prompt row predicts the first).
    logits = clean_logits(model, ids, first_row=len(prompt) - 1)[0]
    greedy = logits.argmax(-1).tolist()
    first = next((i for i, (want, got) in enumerate(zip(greedy, tokens, strict=False))
                  if want != got), None)
    ended = len(tokens) >= max_new_tokens or bool(tokens and tokens[-1] in stop_token_ids)
    if first is None and ended:
        return []
    first = len(tokens) if first is None else first   # generate would go on past the end
    return [_divergence(index, against, first, greedy, tokens, logit_gap(logits[first]))]


def _divergence(index: int, against: str, first: int, expected: Sequence[int],
                got: Sequence[int], gap: tuple[float, float]) -> dict[str, Any]:
    """One divergence record: where, the two tokens there (None past an end) and the
    reference's top-2 margin against its dtype's resolution."""
    margin, resolution = gap
    return {"prompt_index": index, "against": against, "first_divergence": first,
            "expected": expected[first] if first < len(expected) else None,
            "got": got[first] if first < len(got) else None,
            "top2_margin": margin, "resolution": resolution, "near_tie": margin <= resolution}


def _compare(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
             expected: list[list[int]], actual: list[list[int]], against: str
             ) -> list[dict[str, Any]]:
    found = []
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        if want == got:
            continue
        first = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                     min(len(want), len(got)))
        gap = top2_margin(model, list(prompts[index]) + want[:first])
        found.append(_divergence(index, against, first, want, got, gap))
    return found


@torch.inference_mode()
def top2_margin(model: torch.nn.Module, context: Sequence[int]) -> tuple[float, float]:
    """(gap between the reference's two largest next-token logits after ``context``, the
    gap that rounding in the model's dtype can account for: ``NEAR_TIE_ULPS`` ulps of the
    top logit)."""
    device = decoder_parts(model)[1].weight.device
    logits = clean_logits(model, torch.as_tensor([list(context)], device=device),
                          first_row=len(context) - 1)[0, -1]
    return logit_gap(logits)


def logit_gap(logits: torch.Tensor) -> tuple[float, float]:
    """(top-1 minus top-2 of ``logits`` [V], its dtype's resolution at that magnitude)."""
    top = logits.float().topk(2).values
    eps = torch.finfo(logits.dtype).eps
    resolution = NEAR_TIE_ULPS * eps * max(abs(float(top[0])), 1.0)
    return float(top[0] - top[1]), resolution


def acceptance_sweep(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                     mask_token_id: int, strides: Sequence[int] = (2, 3, 4),
                     max_new_tokens: int = 64, max_batch_size: int = 64,
                     stop_token_ids: Sequence[int] | None = None,
                     kinds: Sequence[str] | None = None,
                     known: tuple[list[list[int]], int, list] | None = None
                     ) -> dict[str, Any]:
    """Greedy TPF / acceptance per position / round kinds per stride, and introspection.

    With ``kinds`` (one per prompt) each stride also gets ``by_kind``: the same figures
    from the same requests, grouped by kind, so they add back up to the overall ones.
    ``known``: (this model's AR greedy tokens, a stride, its greedy results on the same
    prompts and budget), as a lossless check that found them equal computed them; those
    runs are not decoded again.
    """
    if kinds is not None and len(kinds) != len(prompts):
        raise ValueError(f"{len(kinds)} kinds for {len(prompts)} prompts")
    stops = None if stop_token_ids is None else tuple(stop_token_ids)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=stops)
    engine = DecodingEngine(model, mask_token_id, max_batch_size=max_batch_size)
    ar_tokens, known_stride, known_results = known or (None, None, None)
    if ar_tokens is None:
        ar_tokens = [r.token_ids for r in engine.generate(
            [GenerationRequest(list(p), "ar", 1, sampling) for p in prompts])]
    sequences = [list(p) + tokens for p, tokens in zip(prompts, ar_tokens, strict=True)]
    prompt_lengths = [len(p) for p in prompts]
    report: dict[str, Any] = {"mode": engine.name, "strides": {}}
    for stride in strides:
        results = known_results if stride == known_stride else engine.generate(
            [GenerationRequest(list(p), "isd", stride, sampling) for p in prompts])
        decoding = aggregate(r.stats for r in results)
        sweep = report["strides"][str(stride)] = {
            "decoding": decoding, "formula": formula_check(decoding, stride),
            "introspective_acceptance": introspective_acceptance(
                model, sequences, prompt_lengths, stride, mask_token_id,
                engine.pad_token_id)}
        if kinds is not None:
            sweep["by_kind"] = by_kind([r.stats for r in results], kinds, stride)
    return report


def by_kind(stats: Sequence[RequestStats], kinds: Sequence[str], stride: int
            ) -> dict[str, dict[str, Any]]:
    """TPF and conditional acceptance per prompt kind (totals per kind, not mean ratios)."""
    groups: dict[str, list[RequestStats]] = {}
    for item, kind in zip(stats, kinds, strict=True):
        groups.setdefault(kind, []).append(item)
    figures = {}
    for kind, group in sorted(groups.items()):
        total = aggregate(group)
        figures[kind] = {"prompts": total["requests"],
                         "tokens_per_forward": total["tokens_per_forward"],
                         "acceptance": total["acceptance"], "tokens": total["tokens"],
                         "forwards": total["forwards"], "tried": total["tried"],
                         "accepted": total["accepted"],
                         "formula": formula_check(total, stride)}
    return figures


def formula_check(decoding: dict[str, Any], stride: int) -> dict[str, float | None]:
    """Measured TPF against the i.i.d. formula (docs/method.md) at measured acceptance ``p``.

    ``p`` pools every tried draft (accepted / tried over all positions): under the
    formula's own assumption every position accepts with the same ``p``, and pooling is
    that ``p``'s maximum-likelihood estimate. A ratio far from 1 means acceptance is not
    i.i.d. across positions (or rounds end early at the token budget or a stop token).
    """
    tried, accepted = sum(decoding["tried"]), sum(decoding["accepted"])
    if not tried:  # no verify round ran: nothing to estimate p from
        return {"mean_acceptance": None, "tokens_per_forward": None,
                "measured_over_formula": None}
    mean_acceptance = accepted / tried
    predicted = expected_tokens_per_forward(mean_acceptance, stride)
    return {"mean_acceptance": mean_acceptance, "tokens_per_forward": predicted,
            "measured_over_formula": decoding["tokens_per_forward"] / predicted}


def verify_all(ic_model: torch.nn.Module, base_model: torch.nn.Module,
               risd_model: torch.nn.Module, prompts: Sequence[Sequence[int]],
               mask_token_id: int, *, stride: int = 4, strides: Sequence[int] = (2, 3, 4),
               max_new_tokens: int = 64, stop_token_ids: Sequence[int] | None = None,
               exactness_prompts: int = 4, samples: int = 2000,
               continuation: int | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               significance: float = 0.01, max_batch_size: int = 64,
               exactness_batch_size: int | None = None,
               compare_transformers: bool = True, kinds: Sequence[str] | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every check of the ``verify`` stage; ``passed`` gates on all but the sweeps.

    ``kinds`` (one per prompt) splits the acceptance sweeps by prompt kind; ``continuation``
    None samples 2N+1 tokens in the exactness checks (the steady state), which decode
    ``exactness_batch_size`` rows together (default: ``max_batch_size``).
    """
    common = {"max_new_tokens": max_new_tokens, "stop_token_ids": stop_token_ids,
              "max_batch_size": max_batch_size}
    law = {"stride": stride, "temperature": temperature, "top_k": top_k, "top_p": top_p,
           "samples": samples, "continuation": continuation, "significance": significance,
           "max_batch_size": exactness_batch_size or max_batch_size}
    few = prompts[:exactness_prompts]
    decoded: dict[str, tuple[list[list[int]], int, list] | None] = {}

    def lossless(mode: str, reference: torch.nn.Module, speculative: torch.nn.Module
                 ) -> dict[str, Any]:
        report, ar, results = _lossless(reference, speculative, prompts, mask_token_id,
                                        stride, compare_transformers=compare_transformers,
                                        **common)
        # Equal token for token (no divergence at all): the sweep of the same model at the
        # same stride would decode exactly this again.
        exact = not any(d["against"] == "engine_ar" for d in report["mismatch_details"])
        decoded[mode] = (ar, stride, results) if exact and not report["mismatches"] \
            and not report["near_ties"] else None
        return report

    def sweep(mode: str, model: torch.nn.Module) -> dict[str, Any]:
        return acceptance_sweep(model, prompts, mask_token_id, strides, kinds=kinds,
                                known=decoded.get(mode), **common)

    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "lossless_risd": lambda: lossless("risd", base_model, risd_model),
        "lossless_isd": lambda: lossless("isd", ic_model, ic_model),
        "exactness_isd": lambda: exactness_check(ic_model, few, mask_token_id, **law),
        "exactness_risd": lambda: exactness_check(risd_model, few, mask_token_id, **law),
        # Same model, prompts and law as exactness_isd: its AR calibration is reused.
        "exactness_isd_argmax_proposal": lambda: exactness_check(
            ic_model, few, mask_token_id, proposal="argmax", ar=report["exactness_isd"]["ar"],
            **law),
        "acceptance_isd": lambda: sweep("isd", ic_model),
        "acceptance_risd": lambda: sweep("risd", risd_model),
    }
    log = log or _stderr
    report: dict[str, Any] = {}
    for number, (name, check) in enumerate(checks.items(), 1):
        began = time.perf_counter()
        report[name] = check()
        verdict = report[name].get("passed")
        if name not in GATING:
            verdict = None  # informational: acceptance sweeps measure, they do not gate
        log(f"verify [{number}/{len(checks)}] {name}: "
            f"{'' if verdict is None else ('passed, ' if verdict else 'FAILED, ')}"
            f"{time.perf_counter() - began:.1f}s")
    report["failed_checks"] = [name for name in GATING if not report[name]["passed"]]
    report["passed"] = not report["failed_checks"]
    return report
