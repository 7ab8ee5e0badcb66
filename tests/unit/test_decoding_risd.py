"""R-ISD: base weights + a gated adapter whose LoRA is really non-zero at MASK rows.

Greedy R-ISD must equal the *base* model's AR greedy (engine and transformers), although
the adapter changes every MASK row's drafts; the lossless check must pass, and report
prompt, first divergence and margin when handed an adapter that is *not* gated.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from idlm.decoding.engine import DecodingEngine
from idlm.decoding.loading import load_engine
from idlm.decoding.requests import DecodingError, GenerationRequest, SamplingParams
from idlm.decoding.verify import lossless_check, transformers_greedy
from idlm.model.adapter_files import base_fingerprint, save_gated_lora
from idlm.model.gated_lora import GatedLinear, attach_gated_lora
from tests.conftest import MASK_ID, tiny_qwen3
from tests.unit.test_decoding_models import pattern_prompts, trained_ic_model

GREEDY = SamplingParams(max_new_tokens=24)


def perturb_lora_b(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, GatedLinear) or hasattr(module, "lora_B"):
            for layer in module.lora_B.values():
                torch.nn.init.normal_(layer.weight, std=std)


def gated(base_factory, std: float = 0.05) -> torch.nn.Module:
    model = attach_gated_lora(base_factory(), MASK_ID, rank=4, alpha=8.0, dropout=0.0)
    perturb_lora_b(model, std)
    return model.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    return trained_ic_model(), gated(trained_ic_model)


def test_adapter_changes_mask_rows(pair) -> None:
    base, risd = pair
    ids = torch.tensor([[101, 4, 5, 6, MASK_ID, MASK_ID]])
    with torch.no_grad():
        plain, adapted = base(input_ids=ids).logits, risd(input_ids=ids).logits
    assert torch.equal(plain[:, :4], adapted[:, :4])
    assert (plain[:, 4:] - adapted[:, 4:]).abs().amax() > 0.1


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_risd_greedy_equals_base_ar_greedy(pair, stride: int) -> None:
    base, risd = pair
    prompts = pattern_prompts(8, seed=61)
    batch = [GenerationRequest(p, "isd", stride, GREEDY) for p in prompts]
    risd_results = DecodingEngine(risd, MASK_ID, stop_token_ids=[]).generate(batch)
    base_ar = DecodingEngine(base, MASK_ID, stop_token_ids=[]).generate(
        [GenerationRequest(p, "ar", 1, GREEDY) for p in prompts])
    tokens = [r.token_ids for r in risd_results]
    assert tokens == [r.token_ids for r in base_ar]
    assert tokens == transformers_greedy(base, prompts, 24, [], 0)
    # The drafts came from the adapter, not the base: acceptance differs from plain ISD.
    plain = DecodingEngine(base, MASK_ID, stop_token_ids=[]).generate(batch)
    assert [r.stats.accepted for r in plain] != [r.stats.accepted for r in risd_results]
    assert sum(r.stats.full_accept_rounds for r in risd_results) > 0
    assert all(r.stats.mode == "risd" for r in risd_results)


def test_risd_on_a_random_base() -> None:
    base, risd = tiny_qwen3(seed=8), gated(lambda: tiny_qwen3(seed=8), std=0.2)
    report = lossless_check(base, risd, pattern_prompts(6, seed=71), MASK_ID, stride=4,
                            max_new_tokens=16, stop_token_ids=[])
    assert report["passed"] and report["mismatches"] == 0 and report["mode"] == "risd"


def test_lossless_check_reports_an_ungated_adapter() -> None:
    base = trained_ic_model()
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    ungated = get_peft_model(trained_ic_model(), config)
    perturb_lora_b(ungated, std=0.3, seed=1)
    report = lossless_check(base, ungated.eval(), pattern_prompts(4, seed=81), MASK_ID,
                            stride=3, max_new_tokens=12, stop_token_ids=[])
    assert not report["passed"] and report["mismatches"] > 0
    detail = report["mismatch_details"][0]
    assert {"prompt_index", "first_divergence", "top2_margin", "expected", "got"} <= set(detail)
    assert detail["top2_margin"] > 0


def test_adapter_for_another_base_is_one_clear_error(tmp_path) -> None:
    from transformers import AutoTokenizer  # noqa: F401 - the loader needs the package

    adapter = attach_gated_lora(tiny_qwen3(vocab=256), MASK_ID, rank=2, alpha=4.0, dropout=0.0)
    save_gated_lora(adapter, tmp_path / "adapter", base_fingerprint(adapter))
    base_dir = tmp_path / "base"
    tiny_qwen3().save_pretrained(base_dir)
    with pytest.raises(DecodingError, match="no base weights hash") as raised:
        load_engine(base_dir, tmp_path / "adapter", mode="risd", mask_token_id=MASK_ID)
    assert "\n" not in str(raised.value)
    # Past the weights check (an experiment's override), the architecture still has to fit.
    with pytest.raises(DecodingError, match="made for another base model") as raised:
        load_engine(base_dir, tmp_path / "adapter", mode="risd", mask_token_id=MASK_ID,
                    allow_other_base=True)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("use_adapter", [False, True])
def test_acceptance_sweep_and_introspection(pair, use_adapter: bool) -> None:
    from idlm.decoding.verify import acceptance_sweep

    base, risd = pair
    model = risd if use_adapter else base
    report = acceptance_sweep(model, pattern_prompts(6, seed=95), MASK_ID, strides=(2, 4),
                              max_new_tokens=16, stop_token_ids=[])
    assert report["mode"] == ("risd" if use_adapter else "isd")
    four = report["strides"]["4"]
    assert four["decoding"]["tokens"] == 6 * 16 and len(four["decoding"]["acceptance"]) == 3
    introspection = four["introspective_acceptance"]
    assert len(introspection["per_position"]) == 3 and all(introspection["positions_scored"])
    if not use_adapter:   # the IC-trained model agrees with itself most of the time
        assert introspection["mean"] > 0.7


def test_verify_all_gates_on_the_lossless_and_exactness_checks(pair) -> None:
    from idlm.decoding.verify import verify_all

    base, risd = pair
    report = verify_all(base, base, risd, pattern_prompts(4, seed=97), MASK_ID, strides=(2,),
                        max_new_tokens=8, stop_token_ids=[], exactness_prompts=1, samples=300,
                        continuation=3)
    assert report["passed"] and report["failed_checks"] == []
    assert report["exactness_isd_argmax_proposal"]["passed"]  # exact, and it gates
    assert set(report["acceptance_risd"]["strides"]) == {"2"}
