"""Deterministic batches: which rows and which block offsets depend only on (seed, step).

That is what lets a killed run resume from a checkpoint and continue the *same*
trajectory: nothing about the data order lives in process state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from idlm.objective import IGNORE, ICBatch, build_ic_batch


@dataclass(frozen=True)
class Rows:
    """Token rows and their prompt lengths, indexable by position."""

    input_ids: Sequence[Sequence[int]]
    prompt_lengths: Sequence[int]

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    @classmethod
    def from_dataset(cls, dataset) -> Rows:  # noqa: ANN001 - a datasets.Dataset
        return cls(dataset["input_ids"], dataset["prompt_length"])


def total_steps(rows: int, micro_batch: int, grad_accum: int, world: int,
                steps: int | None, epochs: float | None) -> int:
    if steps is not None:
        return steps
    per_step = micro_batch * grad_accum * world
    return max(1, math.ceil(float(epochs) * rows / per_step))


def micro_batch_indices(num_rows: int, seed: int, step: int, micro: int, micro_batch: int,
                        rank: int, grad_accum: int, world: int) -> list[int]:
    """Rows of one micro-batch: epochs are seeded permutations walked in order."""
    first = (step * grad_accum + micro) * micro_batch * world + rank * micro_batch
    indices = []
    for flat in range(first, first + micro_batch):
        epoch, within = divmod(flat, num_rows)
        indices.append(int(_permutation(num_rows, seed, epoch)[within]))
    return indices


_PERMUTATIONS: dict[tuple[int, int, int], torch.Tensor] = {}


def _permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    key = (num_rows, seed, epoch)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERMUTATIONS[key] = torch.randperm(num_rows, generator=generator)
    return _PERMUTATIONS[key]


def block_offsets(count: int, stride: int, seed: int, step: int, micro: int, rank: int,
                  randomise: bool) -> list[int]:
    if not randomise or stride <= 2:
        return [0] * count
    mixed = ((seed * 1_000_003 + step) * 1_009 + micro) * 10_007 + rank
    generator = torch.Generator().manual_seed(mixed % (2**62))
    return torch.randint(0, stride - 1, (count,), generator=generator).tolist()


def ic_batch(rows: Rows, indices: list[int], stride: int, mask_token_id: int, pad_token_id: int,
             offsets: list[int]) -> ICBatch:
    return build_ic_batch([rows.input_ids[i] for i in indices],
                          [rows.prompt_lengths[i] for i in indices],
                          stride, mask_token_id, pad_token_id, offsets)


def ar_batch(rows: Rows, indices: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded AR batch with shifted labels on response targets only."""
    width = max(len(rows.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
    for row, index in enumerate(indices):
        seq = torch.as_tensor(rows.input_ids[index], dtype=torch.long)
        prompt = rows.prompt_lengths[index]
        input_ids[row, :len(seq)] = seq
        labels[row, prompt - 1:len(seq) - 1] = seq[prompt:]
    return {"input_ids": input_ids, "labels": labels}
