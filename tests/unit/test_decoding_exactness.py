"""At T > 0 the sampled output follows the model's AR law, in the steady state.

Continuations are 2N+1 tokens, so drafts made by a full window (not only cold-start
drafts) get verified, and each position is tested on its own as well as the whole
continuation. Two tiny models: a random one whose head is scaled up (peaked laws, MASK
rows that disagree with the AR rows: rejections with non-trivial residuals everywhere)
and the IC-trained one (drafts well: mostly steady-state rounds). Seeds are fixed.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from idlm.decoding.engine import DecodingEngine
from idlm.decoding.exactness import (
    Warp,
    chi_square,
    chi_square_p_value,
    exactness_check,
    position_statistics,
)
from idlm.decoding.requests import GenerationRequest, SamplingParams
from tests.conftest import MASK_ID, tiny_qwen3
from tests.unit.test_decoding_risd import gated

PROMPTS = [[5, 9, 13], [7]]
TRAINED_PROMPTS = [[102, 40, 42], [101, 7]]
SHARPNESS = 30.0   # lm_head scale: logits of a random init are ~0.1, far too flat
SAMPLES = 800


def sharp_random_model() -> torch.nn.Module:
    model = tiny_qwen3(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPNESS)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return sharp_random_model()


def check(model: torch.nn.Module, stride: int, prompts: list[list[int]],
          **options: object) -> dict:
    return exactness_check(model, prompts, MASK_ID, stride=stride, temperature=1.0,
                           samples=SAMPLES, significance=0.01, max_batch_size=256,
                           **options)


def trained_model() -> torch.nn.Module:
    from tests.unit.test_decoding_models import trained_ic_model

    return trained_ic_model()


# The random model rejects often (residuals at every position) but rarely reaches the
# steady state; the IC-trained one drafts well, so most of its rounds are steady.
@pytest.mark.parametrize(("kind", "proposal", "stride", "top_k", "top_p", "steady"), [
    ("random", "sample", 3, 0, 1.0, 10), ("trained", "argmax", 4, 8, 0.9, 200),
    ("trained", "sample", 3, 0, 1.0, 200)])
def test_isd_samples_follow_the_ar_law_in_the_steady_state(
        model, kind: str, proposal: str, stride: int, top_k: int, top_p: float,
        steady: int) -> None:
    chosen = model if kind == "random" else trained_model()
    prompts = PROMPTS if kind == "random" else TRAINED_PROMPTS
    report = check(chosen, stride, prompts, top_k=top_k, top_p=top_p, proposal=proposal,
                   seed=stride)
    isd = report["isd"]
    assert report["continuation"] == 2 * stride + 1
    assert len(isd["per_position"]["p_value"]) == 2 * stride + 1
    # Drafts proposed by full windows were verified, and every position has bins to test.
    assert isd["steady_state_rounds"] >= steady
    assert sum(isd["per_position"]["dof"]) >= 20 and isd["dof"] >= 10
    assert report["passed"] and isd["per_position"]["passed"]
    assert report["ar"]["passed"]


def test_risd_samples_follow_the_base_law_in_the_steady_state() -> None:
    risd = gated(trained_model, std=0.05)
    report = check(risd, 3, TRAINED_PROMPTS[:1], proposal="argmax", seed=11)
    assert report["mode"] == "risd" and report["continuation"] == 7
    assert report["isd"]["steady_state_rounds"] >= 100 and report["passed"]


def test_ar_calibration_is_reused_only_as_given(model) -> None:
    """The AR side does not depend on the proposal, so a check may take an earlier one's:
    the ISD side is then what a fresh run gives, and AR is not sampled again."""
    sampled = check(model, 3, PROMPTS[:1], seed=2)
    reused = check(model, 3, PROMPTS[:1], seed=2, proposal="argmax", ar=sampled["ar"])
    fresh = check(model, 3, PROMPTS[:1], seed=2, proposal="argmax")
    assert reused["ar"] is sampled["ar"] and reused["ar"] == fresh["ar"]
    assert reused["isd"] == fresh["isd"]


def test_per_position_test_finds_an_error_late_in_the_continuation(model) -> None:
    """Exact AR samples, then a bug that only hits position 4 (where stride 3 first
    verifies a full window's draft): that position fails, the ones before it do not move."""
    engine = DecodingEngine(model, MASK_ID, stop_token_ids=[], max_batch_size=256)
    prompt, late = PROMPTS[0], 4
    results = engine.generate([GenerationRequest(prompt, "ar", 1, SamplingParams(
        temperature=1.0, max_new_tokens=7, seed=i)) for i in range(SAMPLES)])
    clean = [tuple(r.token_ids) for r in results]
    # One sample in four repeats the token before instead of drawing its own.
    broken = [s[:late] + (s[late - 1],) + s[late + 1:] if i % 4 == 0 else s
              for i, s in enumerate(clean)]

    def p_values(samples: list[tuple[int, ...]]) -> list[float]:
        statistics = position_statistics(model, prompt, Counter(samples), Warp(1.0, 0, 1.0),
                                         5.0)
        return [chi_square_p_value(s, d) for s, d in statistics]

    exact, wrong = p_values(clean), p_values(broken)
    assert min(exact) >= 0.01 / len(exact)
    assert wrong[:late] == pytest.approx(exact[:late], rel=1e-9)
    assert wrong[late] < 1e-6


def test_chi_square_pieces() -> None:
    exact = {(1,): 0.5, (2,): 0.3, (3,): 0.2}
    statistic, bins = chi_square(Counter({(1,): 50, (2,): 30, (3,): 20}), exact, 100, 5.0)
    assert statistic == pytest.approx(0.0) and bins == 3
    assert chi_square_p_value(0.0, 2) == pytest.approx(1.0)
    assert chi_square_p_value(9.21, 2) == pytest.approx(0.01, abs=1e-4)
