"""The flex_attention mask is the same rule as the dense SDPA mask (one definition)."""

from __future__ import annotations

import pytest
import torch

from idlm import objective
from tests.conftest import MASK_ID, PAD_ID, tiny_qwen3


def _batch(stride: int) -> objective.ICBatch:
    generator = torch.Generator().manual_seed(stride)
    rows = [torch.randint(1, MASK_ID, (n,), generator=generator).tolist() for n in (20, 13, 9)]
    return objective.build_ic_batch(rows, [6, 4, 2], stride, MASK_ID, PAD_ID, [0, 1, 2])


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_flex_mask_mod_equals_dense_mask(stride: int) -> None:
    from torch.nn.attention.flex_attention import create_mask

    batch = _batch(stride)
    block_mask = objective.flex_block_mask(batch)
    size = batch.kind.shape[1]
    dense_from_flex = create_mask(block_mask.mask_mod, batch.kind.shape[0], 1, size, size,
                                  device="cpu")
    assert torch.equal(dense_from_flex, objective.dense_mask(batch))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flex_logits_match_sdpa_on_gpu() -> None:
    batch = _batch(4).to("cuda")
    sdpa = tiny_qwen3(attention="sdpa").cuda()
    flex = tiny_qwen3(attention="flex_attention").cuda()
    with torch.no_grad():
        expected = objective.ic_logits(sdpa, batch, "sdpa")
        got = objective.ic_logits(flex, batch, "flex_attention")
    real = batch.kind != objective.PAD
    torch.testing.assert_close(got[real], expected[real], atol=2e-4, rtol=1e-4)
