"""The DeepSpeed trainer: the IC loss falls, and a killed run resumes on the same trajectory."""

from __future__ import annotations

from pathlib import Path

import torch

from idlm.config import Optimisation
from idlm.objective import ic_loss
from idlm.training.batches import Rows, block_offsets, ic_batch, micro_batch_indices
from idlm.training.trainer import TrainJob, train
from tests.conftest import MASK_ID, PAD_ID, tiny_qwen3


def _rows(count: int = 64, seed: int = 0) -> Rows:
    """Learnable rows: a counting pattern after a short random prompt."""
    generator = torch.Generator().manual_seed(seed)
    sequences, prompts = [], []
    for _ in range(count):
        prompt = torch.randint(1, 20, (3,), generator=generator).tolist()
        start = int(torch.randint(20, 60, (1,), generator=generator))
        sequences.append(prompt + list(range(start, start + 12)))
        prompts.append(3)
    return Rows.from_lists(sequences, prompts)


def _job(tmp: Path, rows: Rows, steps: int, stop_after: int | None = None,
         alpha: float | str = "auto") -> TrainJob:
    opt = Optimisation(lr=3e-3, warmup_ratio=0.1, micro_batch_size=8, steps=steps,
                       checkpoint_every=2, log_every=1, seed=0)

    def compute(model, step, micro, rank):  # noqa: ANN001, ANN202
        indices = micro_batch_indices(rows, 0, step, micro, 8, rank, 1, 1)
        offsets = block_offsets(len(indices), 3, 0, step, micro, rank, True)
        batch = ic_batch(rows, indices, 3, MASK_ID, PAD_ID, offsets)
        loss = ic_loss(model, batch, alpha)
        return loss.total, {"mask_ce": float(loss.mask_ce), "clean_ce": float(loss.clean_ce),
                            "alpha": loss.alpha}, int((batch.kind != 0).sum())

    return TrainJob("test", tiny_qwen3(seed=1).train(), compute, opt, steps, tmp, "fp-1",
                    stop_after=stop_after)


def test_ic_loss_falls(tmp_path: Path) -> None:
    result = train(_job(tmp_path / "run", _rows(), steps=30))
    first, last = result.history[0], result.history[-1]
    assert result.finished and result.steps_done == 30
    assert last["mask_ce"] < 0.7 * first["mask_ce"]
    assert last["clean_ce"] < 0.7 * first["clean_ce"]
    # Auto-balance: alpha * clean == mask at every logged step.
    for entry in result.history:
        assert abs(entry["alpha"] * entry["clean_ce"] - entry["mask_ce"]) < 1e-4


def test_resume_continues_the_same_trajectory(tmp_path: Path) -> None:
    rows = _rows()
    straight = train(_job(tmp_path / "straight", rows, steps=6))
    killed = train(_job(tmp_path / "resumed", rows, steps=6, stop_after=3))
    assert not killed.finished and killed.steps_done == 3
    resumed = train(_job(tmp_path / "resumed", rows, steps=6))
    assert resumed.finished
    assert [e["step"] for e in resumed.history] == [1, 2, 3, 4, 5, 6]
    expected = straight.engine.module.model.state_dict()
    got = resumed.engine.module.model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)
    # Only the newest checkpoint is kept.
    assert [p.name for p in (tmp_path / "resumed").glob("step*")] == ["step00000006"]


def test_checkpoint_of_another_job_is_not_resumed(tmp_path: Path) -> None:
    rows = _rows()
    train(_job(tmp_path / "run", rows, steps=4, stop_after=2))
    other = _job(tmp_path / "run", rows, steps=4)
    other.fingerprint = "fp-2"
    result = train(other)
    assert [e["step"] for e in result.history] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "fingerprint.txt").read_text() == "fp-2"
