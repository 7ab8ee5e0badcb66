"""Lossless check in the models' dtype: every divergence carries its top-2 margin, and one
within the dtype's rounding is a near-tie, reported apart from real mismatches."""

from __future__ import annotations

import pytest
import torch

from idlm.decoding.verify import (
    GATING,
    NEAR_TIE_ULPS,
    _compare,
    logit_gap,
    lossless_check,
    transformers_divergences,
    transformers_greedy,
    verify_all,
)
from idlm.stages.verify import summary
from tests.conftest import MASK_ID, tiny_qwen3
from tests.unit.test_decoding_models import pattern_prompts


@pytest.mark.parametrize(("dtype", "gap_ulps", "near_tie"), [
    (torch.bfloat16, 1, True), (torch.bfloat16, 16, False),
    (torch.float32, 2, True), (torch.float32, 64, False)])
def test_logit_gap_resolution_follows_the_dtype(dtype: torch.dtype, gap_ulps: int,
                                                near_tie: bool) -> None:
    eps = torch.finfo(dtype).eps
    top = 12.0
    logits = torch.tensor([top - 3.0, top, top - gap_ulps * eps * 8, 0.0]).to(dtype)
    margin, resolution = logit_gap(logits)
    assert resolution == pytest.approx(NEAR_TIE_ULPS * eps * top)
    assert margin > 0 and (margin <= resolution) is near_tie


def test_tied_logits_are_near_ties_and_other_divergences_real() -> None:
    model, prompt = tiny_qwen3(), [7, 8, 9]
    plain = _compare(model, [prompt], [[3, 1]], [[3, 5]], "engine_ar")[0]
    with torch.no_grad():  # tokens 3 and 4 get the same, largest logit after the prompt
        hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
        model.lm_head.weight[3] = model.lm_head.weight[4] = hidden * 100 / hidden.square().sum()
    tie = _compare(model, [prompt], [[3, 1]], [[4, 1]], "engine_ar")[0]
    assert tie["first_divergence"] == 0 and tie["top2_margin"] == 0.0 and tie["near_tie"]
    assert tie["resolution"] == pytest.approx(NEAR_TIE_ULPS * torch.finfo().eps * 100, rel=1e-3)
    assert plain["first_divergence"] == 1 and not plain["near_tie"]
    assert plain["top2_margin"] > plain["resolution"] > 0


def test_a_different_model_is_a_real_mismatch_and_fails() -> None:
    report = lossless_check(tiny_qwen3(seed=0), tiny_qwen3(seed=1), pattern_prompts(3, seed=5),
                            MASK_ID, stride=3, max_new_tokens=8, stop_token_ids=[],
                            compare_transformers=False)
    assert report["dtype"] == "float32" and report["mismatches"] == 3
    assert report["near_ties"] == 0 and not report["passed"]
    assert all("top2_margin" in d and not d["near_tie"] for d in report["mismatch_details"])


def test_models_in_different_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in dtype"):
        lossless_check(tiny_qwen3(), tiny_qwen3().to(torch.bfloat16), [[1, 2]], MASK_ID)


def test_same_model_is_lossless_with_no_near_ties() -> None:
    model = tiny_qwen3()
    report = lossless_check(model, model, pattern_prompts(4, seed=6), MASK_ID, stride=4,
                            max_new_tokens=12, stop_token_ids=[], compare_transformers=False)
    assert report["passed"] and report["mismatches"] == report["near_ties"] == 0


def test_argmax_exactness_gates_and_metrics_carry_near_ties() -> None:
    assert "exactness_isd_argmax_proposal" in GATING
    model = tiny_qwen3()
    report = verify_all(model, model, model, pattern_prompts(2, seed=7), MASK_ID, stride=2,
                        strides=(2,), max_new_tokens=4, stop_token_ids=[],
                        exactness_prompts=1, samples=60, compare_transformers=False,
                        log=lambda _: None)
    assert report["exactness_isd_argmax_proposal"]["continuation"] == 5
    report["seconds"] = 1.0
    metrics = summary(report, stride=2)
    assert metrics["lossless_isd"]["near_ties"] == 0
    assert metrics["lossless_risd"]["mismatches"] == 0
    argmax = metrics["exactness_isd_argmax_proposal"]
    assert set(argmax) == {"p_value", "min_position_p_value", "steady_state_rounds",
                           "ar_p_value", "ar_min_position_p_value"}


def test_teacher_forced_transformers_check_finds_where_generate_diverges() -> None:
    model, stops = tiny_qwen3(seed=3), [5]
    prompts = pattern_prompts(6, seed=8)
    greedy = transformers_greedy(model, prompts, 10, stops, 0)
    assert greedy[0][-1] in stops and len(greedy[0]) < 10   # one ends on a stop token
    assert transformers_divergences(model, prompts, greedy, greedy, 10, stops) == []
    wrong = [list(tokens) for tokens in greedy]
    wrong[1][2] = (wrong[1][2] + 1) % 128   # a token generate would not emit
    wrong[4] = wrong[4][:3]                 # ends with neither a stop token nor the budget
    found = transformers_divergences(model, prompts, greedy, wrong, 10, stops)
    assert {d["prompt_index"] for d in found} == {1, 4}
    assert all(d["against"] == "transformers" and not d["near_tie"] for d in found)
    by_prompt = {d["prompt_index"]: d for d in found}
    assert (by_prompt[1]["first_divergence"], by_prompt[1]["expected"], by_prompt[1]["got"]) \
        == (2, greedy[1][2], wrong[1][2])
    assert (by_prompt[4]["first_divergence"], by_prompt[4]["expected"], by_prompt[4]["got"]) \
        == (3, greedy[4][3], None)
    # The engine's AR tokens are checked too; a speculative run equal to them shares it.
    twice = transformers_divergences(model, prompts, wrong, wrong, 10, stops)
    assert sorted(d["against"] for d in twice if d["prompt_index"] == 1) == [
        "transformers", "transformers_vs_engine_ar"]
