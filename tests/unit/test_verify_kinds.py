"""verify's per-kind TPF / acceptance and the formula TPF, on a tiny random Qwen3 (no training).

The per-kind figures must add back up to the overall ones (they come from the same
requests), the formula must match hand-computed values, and the stage's metrics and plot
must carry every kind present.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idlm.config import load_profile
from idlm.decoding.stats import RequestStats, expected_tokens_per_forward
from idlm.decoding.trained import chat_prompts, held_out_items, item_kinds
from idlm.decoding.verify import acceptance_sweep, by_kind, formula_check
from idlm.stages.verify import plot_acceptance, summary
from tests.conftest import MASK_ID, tiny_qwen3
from tests.unit.test_decoding_models import pattern_prompts

KINDS = ["arithmetic", "code", "arithmetic", "instruction", "code", "arithmetic"]


def test_formula_matches_hand_computed_values() -> None:
    # N=4, p=0.9: (2 + 0.9 + 0.81) / (2 - 0.729) = 3.71 / 1.271
    assert round(expected_tokens_per_forward(0.9, 4), 2) == 2.92
    assert expected_tokens_per_forward(1.0, 2) == 2.0
    assert expected_tokens_per_forward(0.5, 2) == pytest.approx(2 / 1.5)


def test_formula_check_pools_every_tried_draft() -> None:
    decoding = {"tried": [10, 6, 2], "accepted": [9, 5, 1], "tokens_per_forward": 2.5}
    check = formula_check(decoding, 4)
    assert check["mean_acceptance"] == pytest.approx(15 / 18)
    p = 15 / 18
    predicted = (2 + p + p ** 2) / (2 - p ** 3)
    assert check["tokens_per_forward"] == pytest.approx(predicted)
    assert check["measured_over_formula"] == pytest.approx(2.5 / predicted)
    empty = formula_check({"tried": [0, 0], "accepted": [0, 0], "tokens_per_forward": 1.0}, 3)
    assert empty == {"mean_acceptance": None, "tokens_per_forward": None,
                     "measured_over_formula": None}


def test_by_kind_totals_per_kind_from_hand_made_stats() -> None:
    stats = [RequestStats("isd", 3, tokens=10, forwards=5, tried=[4, 2], accepted=[2, 1]),
             RequestStats("isd", 3, tokens=6, forwards=4, tried=[3, 1], accepted=[1, 0]),
             RequestStats("isd", 3, tokens=9, forwards=3, tried=[2, 2], accepted=[2, 2])]
    figures = by_kind(stats, ["code", "arithmetic", "code"], 3)
    assert list(figures) == ["arithmetic", "code"]
    code = figures["code"]
    assert (code["prompts"], code["tokens"], code["forwards"]) == (2, 19, 8)
    assert code["tokens_per_forward"] == pytest.approx(19 / 8)
    assert code["acceptance"] == pytest.approx([4 / 6, 3 / 4])
    assert figures["arithmetic"]["acceptance"] == pytest.approx([1 / 3, 0.0])
    assert code["formula"]["mean_acceptance"] == pytest.approx(7 / 10)


@pytest.fixture(scope="module")
def sweeps() -> dict[str, dict]:
    prompts = pattern_prompts(len(KINDS), seed=95)
    return {mode: acceptance_sweep(tiny_qwen3(seed=seed), prompts, MASK_ID, strides=(2, 4),
                                   max_new_tokens=12, stop_token_ids=[], kinds=KINDS)
            for mode, seed in (("isd", 3), ("risd", 4))}


@pytest.mark.parametrize("stride", ["2", "4"])
def test_per_kind_figures_add_up_to_the_overall_ones(sweeps: dict, stride: str) -> None:
    sweep = sweeps["isd"]["strides"][stride]
    overall, kinds = sweep["decoding"], sweep["by_kind"]
    assert set(kinds) == set(KINDS)
    assert {k: v["prompts"] for k, v in kinds.items()} == {
        "arithmetic": 3, "code": 2, "instruction": 1}
    tokens = sum(v["tokens"] for v in kinds.values())
    forwards = sum(v["forwards"] for v in kinds.values())
    assert tokens == overall["tokens"] == len(KINDS) * 12
    assert forwards == overall["forwards"]
    assert overall["tokens_per_forward"] == pytest.approx(tokens / forwards)
    for position in range(int(stride) - 1):
        assert sum(v["tried"][position] for v in kinds.values()) == overall["tried"][position]
        assert (sum(v["accepted"][position] for v in kinds.values())
                == overall["accepted"][position])
    assert sum(overall["tried"]) > 0  # the sums above compared something
    formula = sweep["formula"]
    assert formula["mean_acceptance"] == pytest.approx(
        sum(overall["accepted"]) / sum(overall["tried"]))
    assert formula["measured_over_formula"] == pytest.approx(
        overall["tokens_per_forward"] / formula["tokens_per_forward"])


def test_sweep_rejects_kinds_that_do_not_match_the_prompts() -> None:
    with pytest.raises(ValueError, match="2 kinds for 3 prompts"):
        acceptance_sweep(tiny_qwen3(), pattern_prompts(3, seed=1), MASK_ID, strides=(2,),
                         kinds=["code", "code"])


def _report(sweeps: dict) -> dict:
    report = {"passed": True, "failed_checks": [], "seconds": 1.0}
    for mode, sweep in sweeps.items():
        report[f"acceptance_{mode}"] = sweep
        report[f"lossless_{mode}"] = {"mismatches": 0, "prompts": 6, "tokens_compared": 72}
        report[f"exactness_{mode}"] = {"isd": {"p_value": 0.5}, "ar": {"p_value": 0.4}}
    return report


def test_metrics_hold_per_kind_and_formula_tpf_at_the_serving_stride(sweeps: dict) -> None:
    metrics = summary(_report(sweeps), stride=4)
    four = sweeps["isd"]["strides"]["4"]
    for kind in ("arithmetic", "code", "instruction"):
        assert metrics[f"tpf_n4_{kind}"] == four["by_kind"][kind]["tokens_per_forward"]
        assert (metrics[f"risd_tpf_n4_{kind}"]
                == sweeps["risd"]["strides"]["4"]["by_kind"][kind]["tokens_per_forward"])
    assert metrics["tpf_formula_n4"] == four["formula"]["tokens_per_forward"]
    assert metrics["tpf_over_formula_n4"] == four["formula"]["measured_over_formula"]
    assert "tpf_n2_code" not in metrics  # only the serving stride is flattened
    assert set(metrics["isd_n2"]["tokens_per_forward_by_kind"]) == set(KINDS)
    # The keys that were there before stay, with the same values.
    assert metrics["tokens_per_forward"] == four["decoding"]["tokens_per_forward"]
    assert metrics["isd_n4"]["acceptance_per_position"] == four["decoding"]["acceptance"]
    assert {"passed", "failed_checks", "seconds", "lossless_isd", "exactness_risd",
            "introspective_acceptance", "risd_tokens_per_forward"} <= set(metrics)
    json.dumps(metrics)  # metrics.json must serialise


def test_plot_gets_a_per_kind_panel_only_when_there_are_kinds(sweeps: dict,
                                                              tmp_path: Path) -> None:
    from PIL import Image

    report = _report(sweeps)
    with_kinds = plot_acceptance(report, tmp_path / "kinds.png", stride=4)
    overall_only = plot_acceptance(report, tmp_path / "overall.png")
    width = Image.open(overall_only).size[0]
    assert Image.open(with_kinds).size[0] == 2 * width


def test_held_out_items_keep_their_kind(tmp_path: Path) -> None:
    cfg = load_profile("tiny", [f"outputs={tmp_path}"])
    items = [{"id": f"eval-{i}", "kind": kind, "messages": [{"role": "user", "content": kind}]}
             for i, kind in enumerate(("arithmetic", "code"))]
    path = cfg.out("prepare", "eval_items.jsonl")
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))

    class Tokenizer:  # what render_prompt and chat_prompts call, nothing more
        def apply_chat_template(self, messages: list, **_: object) -> str:
            return messages[0]["content"]

        def __call__(self, text: str, add_special_tokens: bool) -> dict:
            return {"input_ids": [len(text)]}

    assert item_kinds(held_out_items(cfg, 3)) == ["arithmetic", "code", "arithmetic"]
    assert item_kinds([{"messages": []}]) == ["unknown"]
    assert chat_prompts(cfg, Tokenizer(), 3) == [[10], [4], [10]]
