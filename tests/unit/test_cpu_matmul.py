"""The lean forward's CPU matmul: the same product whichever library it picks, one pick per
weight shape and row bucket per process, and torch's own path below MIN_ROWS."""

from __future__ import annotations

import pytest
import torch

from idlm.decoding import cpu_matmul
from idlm.decoding.cpu_matmul import MIN_ROWS, Matmul


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_matmul, "_CHOICES", {})


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8, 28, 64, 448])
def test_product_equals_torch_whichever_library(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 48, generator=generator)     # [out, in]
    inputs = torch.randn(rows, 48, generator=generator)
    with torch.inference_mode():
        ours = Matmul(weight)(inputs)
    assert ours.shape == (rows, 96)
    assert (ours - inputs @ weight.t()).abs().amax() <= 1e-4


def test_few_rows_take_torch_path_bit_for_bit() -> None:
    weight, inputs = torch.randn(64, 32), torch.randn(MIN_ROWS - 1, 32)
    matmul = Matmul(weight)
    assert torch.equal(matmul(inputs), torch.mm(inputs, weight.t().contiguous()))
    assert cpu_matmul.chosen() == {}   # nothing measured below MIN_ROWS


def test_one_choice_per_shape_and_bucket_shared_by_every_matmul(
        monkeypatch: pytest.MonkeyPatch) -> None:
    measured = []

    def measure(self: Matmul, inputs: torch.Tensor) -> bool:
        measured.append(inputs.shape[0])
        return True

    monkeypatch.setattr(Matmul, "_measure", measure)
    weight = torch.randn(64, 32)
    first, second = Matmul(weight), Matmul(weight.clone())
    for rows in (4, 5, 7, 8, 15, 16):
        first(torch.randn(rows, 32))
        second(torch.randn(rows, 32))
    assert measured == [4, 8, 16]
    if first.packed is not None:   # oneDNN present: every bucket took it
        assert set(cpu_matmul.chosen().values()) == {"onednn"}
        assert list(cpu_matmul.chosen()) == ["32x64@4+", "32x64@8+", "32x64@16+"]


def test_non_fp32_weights_never_pack() -> None:
    assert Matmul(torch.randn(8, 4, dtype=torch.bfloat16)).packed is None
