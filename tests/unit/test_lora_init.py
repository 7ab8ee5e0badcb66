"""`lora.init: ic`: the adapter starts as the best rank-r approximation of the IC model's
weight change, the MASK-embedding delta as its MASK row's change; non-MASK rows stay the
base's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from idlm.errors import StageError
from idlm.model.gated_lora import GatedLinear, attach_gated_lora, find_token_gate
from idlm.model.lora_init import TunedWeights, init_from_tuned
from tests.unit.test_gated_lora import (
    MASK_TOKEN_ID,
    SEQUENCE_LENGTH,
    assert_mask_rows_only_differ,
    logits_of,
    tiny_base,
)

RANK = 4


def tuned_copy(folder: Path, rank: int, seed: int = 1) -> torch.nn.Module:
    """The base plus a random rank-``rank`` change of every linear layer and of the MASK
    embedding row (what IC fine-tuning changes), saved as an HF folder."""
    tuned = tiny_base()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                out_features, in_features = module.weight.shape
                left = torch.randn(out_features, rank, generator=generator) * 0.1
                right = torch.randn(rank, in_features, generator=generator) * 0.1
                module.weight += left @ right
        tuned.get_input_embeddings().weight[MASK_TOKEN_ID] += torch.randn(
            tuned.config.hidden_size, generator=generator)
    tuned.save_pretrained(folder)
    return tuned.eval()


def gated(rank: int = RANK) -> torch.nn.Module:
    return attach_gated_lora(tiny_base(), MASK_TOKEN_ID, rank=rank, alpha=2.0 * rank,
                             dropout=0.0, mask_embedding=True).eval()


def test_a_change_within_the_rank_is_reproduced_at_mask_rows(tmp_path: Path) -> None:
    tuned = tuned_copy(tmp_path, RANK)
    model = gated()
    assert init_from_tuned(model, TunedWeights(tmp_path), MASK_TOKEN_ID) == 14  # 7 per layer
    all_masks = torch.full((2, SEQUENCE_LENGTH), MASK_TOKEN_ID)
    # Every row is gated: every layer is the tuned one, and so are the logits.
    torch.testing.assert_close(logits_of(model, all_masks), logits_of(tuned, all_masks),
                               rtol=1e-4, atol=1e-4)


def test_a_larger_change_is_cut_to_its_top_directions(tmp_path: Path) -> None:
    tuned_copy(tmp_path, rank=3 * RANK)
    model = gated()
    init_from_tuned(model, TunedWeights(tmp_path), MASK_TOKEN_ID)
    layer = next(m for m in model.modules() if isinstance(m, GatedLinear))
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.linalg.matrix_rank(delta) == RANK
    assert find_token_gate(model).mask_embedding.delta.abs().sum() > 0


def test_non_mask_rows_stay_the_base(tmp_path: Path) -> None:
    tuned_copy(tmp_path, RANK)
    model = gated()
    init_from_tuned(model, TunedWeights(tmp_path), MASK_TOKEN_ID)
    assert_mask_rows_only_differ(model, tiny_base())


def test_a_missing_ic_model_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="dvc repro ic"):
        TunedWeights(tmp_path / "nothing")
