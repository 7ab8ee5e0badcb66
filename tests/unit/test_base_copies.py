"""A short AR run through the real trainer learns to copy a number from its prompt.

The prompt holds a two-digit number at a random place among filler words, and the rows
come in two kinds of different lengths (as the tiny corpus's tasks do): the answer is
that number. This is the skill the tiny base lacked while micro-batches were grouped by
length (each one a single kind of task).
"""

from __future__ import annotations

from pathlib import Path

import torch

from idlm.config import Optimisation
from idlm.objective import IGNORE, clean_loss
from idlm.training.batches import Rows, ic_batch, micro_batch_indices
from idlm.training.trainer import TrainJob, train
from tests.conftest import MASK_ID, PAD_ID, tiny_qwen3

DIGITS, FILLER, ASK, EOS = range(10, 20), range(30, 60), 2, 3


def _copy_rows(count: int, seed: int) -> Rows:
    generator = torch.Generator().manual_seed(seed)
    sequences, prompts = [], []
    for index in range(count):
        short = index % 2 == 0  # two kinds, with different lengths
        before = int(torch.randint(1, 6 if short else 20, (1,), generator=generator))
        after = int(torch.randint(1, 4 if short else 12, (1,), generator=generator))
        number = (10 + torch.randint(0, 10, (2,), generator=generator)).tolist()
        filler = (30 + torch.randint(0, 30, (before + after,), generator=generator)).tolist()
        prompt = [1, *filler[:before], *number, *filler[before:], ASK]
        sequences.append(prompt + [*number, EOS])
        prompts.append(len(prompt))
    return Rows.from_lists(sequences, prompts)


def _copied(model: torch.nn.Module, rows: Rows) -> float:
    right = 0
    with torch.no_grad():
        for seq, prompt in zip(rows.input_ids, rows.prompt_lengths, strict=True):
            ids = torch.tensor([seq[:prompt]])
            for _ in range(2):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
            right += ids[0, prompt:].tolist() == list(seq[prompt:prompt + 2])
    return right / len(rows)


def test_a_short_base_run_learns_to_copy_a_number(tmp_path: Path) -> None:
    rows, heldout = _copy_rows(2048, seed=0), _copy_rows(64, seed=1)
    opt = Optimisation(lr=3e-3, warmup_ratio=0.05, micro_batch_size=32, pack_width=128,
                       steps=220, checkpoint_every=1000, log_every=50)

    def compute(model, step, micro, rank):  # noqa: ANN001, ANN202
        indices = micro_batch_indices(rows, 0, step, micro, 32, rank, 1, 1)
        batch = ic_batch(rows, indices, None, MASK_ID, PAD_ID, None, opt.pack_width)
        loss = clean_loss(model, batch)
        return loss, {"loss": float(loss.detach())}, int((batch.labels != IGNORE).sum())

    model = tiny_qwen3(seed=0).train()
    before = _copied(model.eval(), heldout)
    train(TrainJob("copy", model.train(), compute, opt, opt.steps, tmp_path, "copy-1"))
    after = _copied(model.eval(), heldout)
    assert before < 0.1 and after >= 0.9, (before, after)
