"""Packed batches give the unpacked loss; micro-batches mix the kinds of task."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from idlm import objective
from idlm.training.batches import Rows, micro_batch_indices
from idlm.training.precision import CHOICE_FILE, cpu_autocast
from tests.conftest import MASK_ID, PAD_ID, tiny_qwen3


def _rows(lengths: list[int], prompts: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, MASK_ID, (n,), generator=generator).tolist() for n in lengths]


def test_first_fit_decreasing_never_overfills_a_row() -> None:
    widths = [30, 10, 25, 5, 20, 40]
    placement, width = objective.pack_segments(widths, 40)
    assert width == 40
    for row in {r for r, _ in placement}:
        spans = sorted((start, start + widths[i]) for i, (r, start) in enumerate(placement)
                       if r == row)
        assert spans[-1][1] <= 40
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert max(r for r, _ in placement) + 1 == 4  # 130 tokens need 4 rows of 40
    # A sequence longer than the pack width gets a row of its own width.
    assert objective.pack_segments([50, 10], 40)[1] == 50


@pytest.mark.parametrize("stride", [None, 2, 4])
def test_packed_loss_equals_unpacked(stride: int | None) -> None:
    model = tiny_qwen3(seed=3).eval()
    lengths, prompts = [12, 7, 15, 9, 6], [4, 2, 5, 3, 2]
    rows = _rows(lengths, prompts)
    offsets = [0, 1, 2, 0, 1]
    plain = objective.build_ic_batch(rows, prompts, stride, MASK_ID, PAD_ID, offsets)
    packed = objective.build_ic_batch(rows, prompts, stride, MASK_ID, PAD_ID, offsets,
                                      pack_width=32)
    assert packed.input_ids.shape[0] < plain.input_ids.shape[0]
    with torch.no_grad():
        if stride is None:
            expected, got = objective.clean_loss(model, plain), objective.clean_loss(model, packed)
            reference = objective.ar_loss(model, *_ar_tensors(rows, prompts))
            assert torch.allclose(expected, reference, atol=1e-5)
        else:
            expected = objective.ic_loss(model, plain, 0.5).total
            got = objective.ic_loss(model, packed, 0.5).total
    assert torch.allclose(got, expected, atol=1e-5)


def _ar_tensors(rows: list[list[int]], prompts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD_ID)
    labels = torch.full((len(rows), width), objective.IGNORE)
    for i, (seq, prompt) in enumerate(zip(rows, prompts, strict=True)):
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, prompt - 1:len(seq) - 1] = torch.tensor(seq[prompt:])
    return ids, labels


def test_packed_segments_never_attend_each_other() -> None:
    rows, prompts = _rows([6, 5, 7], [2, 2, 3]), [2, 2, 3]
    batch = objective.build_ic_batch(rows, prompts, 3, MASK_ID, PAD_ID, [0, 1, 0], pack_width=64)
    dense = objective.dense_mask(batch)[:, 0]
    segment = batch.segment
    crossing = (segment[:, :, None] != segment[:, None, :]) & dense
    pads = segment[:, :, None] == -1
    assert not (crossing & ~pads).any()


def test_micro_batches_mix_the_kinds_of_task() -> None:
    """Lengths follow the task (arithmetic ~85 tokens, code ~60, ...): batches grouped by
    length were mostly one task each, which is what kept the tiny base from learning."""
    generator = torch.Generator().manual_seed(0)
    kinds = torch.randint(0, 4, (4096,), generator=generator)
    lengths = (40 + 30 * kinds + torch.randint(0, 10, (4096,), generator=generator)).tolist()
    rows = Rows([[1] * n for n in lengths], [2] * len(lengths), lengths)
    for step in range(40):
        batch = kinds[micro_batch_indices(rows, 0, step, 0, 32, 0, 1, 1)]
        share = torch.bincount(batch, minlength=4).max().item() / 32
        assert share < 0.6, f"step {step}: {share:.0%} of the micro-batch is one kind"


def test_bf16_choice_is_measured_once_and_kept(tmp_path: Path) -> None:
    calls: list[bool] = []

    def timed_pass(bf16: bool) -> None:
        calls.append(bf16)
        torch.ones(64, 64).matmul(torch.ones(64, 64))

    choice = cpu_autocast("auto", "cpu", tmp_path, timed_pass, rank=0)
    record = json.loads((tmp_path / CHOICE_FILE).read_text())
    assert record["bf16"] is choice and set(calls) == {False, True}
    calls.clear()
    assert cpu_autocast("auto", "cpu", tmp_path, timed_pass, rank=0) is choice
    assert calls == []  # a resumed run keeps the recorded choice
    assert cpu_autocast(False, "cpu", tmp_path, timed_pass, 0) is False
    assert cpu_autocast(True, "cuda:0", tmp_path, timed_pass, 0) is False  # DeepSpeed's bf16


def test_a_losing_bf16_is_not_timed_to_the_end(tmp_path: Path) -> None:
    """A bf16 warm-up pass 20x fp32's: no timed bf16 pass; 2.5x: timing stops once it has
    lost (after the warm-up and one or two timed passes, not three)."""
    for slowdown, bf16_passes in ((20.0, {1}), (2.5, {2, 3})):
        calls: list[bool] = []

        def timed_pass(bf16: bool, slowdown: float = slowdown, calls: list = calls) -> None:
            calls.append(bf16)
            time.sleep(0.02 * (slowdown if bf16 else 1.0))

        folder = tmp_path / str(slowdown)
        folder.mkdir()
        assert cpu_autocast("auto", "cpu", folder, timed_pass, rank=0) is False
        assert calls.count(False) == 4 and calls.count(True) in bf16_passes


def test_auto_alpha_is_capped() -> None:
    mask_ce, clean_ce = torch.tensor(3.0), torch.tensor(0.1)
    assert objective.balance_alpha(mask_ce, clean_ce, "auto") == pytest.approx(30.0)
    assert objective.balance_alpha(mask_ce, clean_ce, "auto", alpha_max=5.0) == 5.0
    assert objective.balance_alpha(mask_ce, clean_ce, 0.2, alpha_max=0.1) == 0.2
