"""The IC objective's training pieces: the stride curriculum, the IC step, the fingerprint
that the ``ic`` stage (``idlm.stages.ic``) and the ``lora`` stage resume on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from idlm.config import Config, Phase
from idlm.training import common

PHASES_FILE = "phases.json"


def ic_fingerprint(cfg: Config, pin: dict[str, Any], data_fingerprint: str) -> str:
    """What determines the IC model: the base, the IC settings and the data (resume keys
    on it; the LoRA stage, which starts from the IC model, keys on it too)."""
    return common.fingerprint_of("ic", pin["fingerprint"], cfg.ic.model_dump(),
                                 data_fingerprint)


def phase_name(index: int, phase: Phase) -> str:
    return f"phase{index}-N{phase.stride}"


@dataclass(frozen=True)
class Curriculum:
    """Which phase each step belongs to: phase i covers steps [ends[i-1], ends[i])."""

    phases: list[Phase]
    ends: list[int]

    @classmethod
    def of(cls, phases: list[Phase], rows: int, per_step: int) -> Curriculum:
        ends, total = [], 0
        for phase in phases:
            total += phase.steps if phase.steps is not None else max(
                1, round(float(phase.epochs) * rows / per_step))
            ends.append(total)
        return cls(list(phases), ends)

    @property
    def total_steps(self) -> int:
        return self.ends[-1]

    def index_at(self, step: int) -> int:
        return next(i for i, end in enumerate(self.ends) if step < end)

    def ending_at(self, done: int) -> int | None:
        """The phase that ends when ``done`` steps are complete, if any."""
        return self.ends.index(done) if done in self.ends else None


def ic_step(inputs: common.StageInputs, curriculum: Curriculum, seed: int, micro_batch: int,
            grad_accum: int, world: int, randomise_offsets: bool, pack_width: int | None,
            alpha_max: float | None = None):  # noqa: ANN201
    """A trainer StepFn: the IC loss at the step's phase (stride, alpha) and micro-batch."""
    from idlm.objective import ic_loss
    from idlm.training.batches import block_offsets, ic_batch, micro_batch_indices

    def compute(model, step, micro, rank):  # noqa: ANN001, ANN202
        phase = curriculum.phases[curriculum.index_at(step)]
        indices = micro_batch_indices(inputs.train, seed, step, micro, micro_batch, rank,
                                      grad_accum, world)
        offsets = block_offsets(len(indices), phase.stride, seed + 7919 * phase.stride, step,
                                micro, rank, randomise_offsets)
        batch = ic_batch(inputs.train, indices, phase.stride, inputs.mask_token_id,
                         inputs.pad_token_id, offsets, pack_width).to(inputs.device)
        dtype = next(model.parameters()).dtype
        loss = ic_loss(model, batch, phase.alpha, inputs.attention, dtype, alpha_max)
        tokens = int((batch.kind != 0).sum())
        stats = {"loss": float(loss.total.detach()), "mask_ce": float(loss.mask_ce),
                 "clean_ce": float(loss.clean_ce), "alpha": loss.alpha,
                 "stride": float(phase.stride)}
        return loss.total, stats, tokens

    return compute
