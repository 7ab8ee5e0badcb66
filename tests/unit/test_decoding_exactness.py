"""At T > 0 the sampled output follows the model's AR law: a chi-square test that passes
for exact samplers (ISD, R-ISD, AR) and fails for the labelled-inexact argmax proposal."""

from __future__ import annotations

import pytest

from idlm.decoding.verify import chi_square, chi_square_p_value, exactness_check
from tests.conftest import MASK_ID
from tests.unit.test_decoding_models import pattern_prompts, trained_ic_model
from tests.unit.test_decoding_risd import gated

PROMPTS = [[102, 40, 42], [101, 7]]


@pytest.fixture(scope="module")
def model():
    return trained_ic_model()


@pytest.mark.parametrize(("stride", "top_k", "top_p"), [(3, 0, 1.0), (4, 8, 0.9)])
def test_isd_samples_follow_the_ar_law(model, stride: int, top_k: int, top_p: float) -> None:
    report = exactness_check(model, PROMPTS, MASK_ID, stride=stride, temperature=1.0,
                             top_k=top_k, top_p=top_p, samples=1500, continuation=4,
                             significance=0.01, seed=stride)
    assert report["passed"] and report["isd"]["dof"] >= 10
    assert report["ar"]["passed"]


def test_argmax_proposal_is_caught_as_inexact(model) -> None:
    report = exactness_check(model, PROMPTS, MASK_ID, stride=3, temperature=1.0,
                             samples=1500, continuation=4, proposal="argmax")
    assert not report["passed"] and report["isd"]["p_value"] < 1e-6
    assert not report["exact_by_construction"]


def test_risd_samples_follow_the_base_law() -> None:
    risd = gated(trained_ic_model, std=0.05)
    report = exactness_check(risd, pattern_prompts(2, seed=91), MASK_ID, stride=4,
                             temperature=0.8, samples=1500, continuation=4)
    assert report["mode"] == "risd" and report["passed"]


def test_chi_square_pieces() -> None:
    from collections import Counter

    exact = {(1,): 0.5, (2,): 0.3, (3,): 0.2}
    statistic, bins = chi_square(Counter({(1,): 50, (2,): 30, (3,): 20}), exact, 100, 5.0)
    assert statistic == pytest.approx(0.0) and bins == 3
    assert chi_square_p_value(0.0, 2) == pytest.approx(1.0)
    assert chi_square_p_value(9.21, 2) == pytest.approx(0.01, abs=1e-4)
