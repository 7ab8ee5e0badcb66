"""``ic`` stage: introspective-consistency training, one DeepSpeed run per curriculum phase.

Phases run in order (default N=2 then N=3), each starting from the previous phase's
weights. Everything a killed run needs to resume lives under ``checkpoints/`` (a DVC
``persist`` out): per phase, the engine checkpoints and, once done, its final weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idlm.config import Config, Phase
from idlm.stage import write_json_atomic
from idlm.training import common, distributed


def phase_name(index: int, phase: Phase) -> str:
    return f"phase{index}-N{phase.stride}"


def ic_step(inputs: common.StageInputs, stride: int, alpha: float | str, seed: int,
            micro_batch: int, grad_accum: int, world: int, randomise_offsets: bool):  # noqa: ANN201
    """A trainer StepFn computing the IC loss on the step's deterministic micro-batch."""
    from idlm.objective import ic_loss
    from idlm.training.batches import block_offsets, ic_batch, micro_batch_indices

    def compute(model, step, micro, rank):  # noqa: ANN001, ANN202
        indices = micro_batch_indices(inputs.train, seed, step, micro, micro_batch, rank,
                                      grad_accum, world)
        offsets = block_offsets(len(indices), stride, seed, step, micro, rank, randomise_offsets)
        batch = ic_batch(inputs.train, indices, stride, inputs.mask_token_id,
                         inputs.pad_token_id, offsets).to(inputs.device)
        dtype = next(model.parameters()).dtype
        loss = ic_loss(model, batch, alpha, inputs.attention, dtype)
        tokens = int((batch.kind != 0).sum())
        stats = {"loss": float(loss.total.detach()), "mask_ce": float(loss.mask_ce),
                 "clean_ce": float(loss.clean_ce), "alpha": loss.alpha}
        return loss.total, stats, tokens

    return compute


def run(cfg: Config, stop_after: tuple[int, int] | None = None) -> dict[str, Any]:
    """Train every phase; ``stop_after=(phase, step)`` stops early as a kill would (tests)."""
    device = distributed.device_for_rank()
    rank, world = distributed.init(device)
    inputs = common.load_inputs(cfg, device)
    pin = common.read_base_pin(cfg)
    source: Path = common.base_model_path(cfg, pin)
    upstream = pin["fingerprint"]
    summary: dict[str, Any] = {"phases": []}
    histories: dict[str, list[dict[str, float]]] = {}
    for index, phase in enumerate(cfg.ic.phases):
        name = phase_name(index, phase)
        phase_dir = cfg.out("ic", "checkpoints", name)
        fingerprint = common.fingerprint_of("ic", upstream, phase.model_dump(),
                                            cfg.ic.random_block_offset, inputs.data_fingerprint)
        done = phase_dir / "done.json"
        if _is_done(done, fingerprint):
            record = json.loads(done.read_text())
        else:
            until = stop_after[1] if stop_after and stop_after[0] == index else None
            record = _train_phase(cfg, inputs, source, phase, name, phase_dir, fingerprint,
                                  world, rank, until)
            if record is None:
                return {"finished": False, "phase": name}
        histories[name] = _history(phase_dir)
        summary["phases"].append(record)
        source, upstream = phase_dir / "final", fingerprint
    if rank == 0:
        _finish(cfg, source, summary, histories)
    return summary


def _is_done(done: Path, fingerprint: str) -> bool:
    return done.is_file() and json.loads(done.read_text()).get("fingerprint") == fingerprint


def _train_phase(cfg: Config, inputs: common.StageInputs, source: Path, phase: Phase,
                 name: str, phase_dir: Path, fingerprint: str, world: int, rank: int,
                 stop_after: int | None) -> dict[str, Any] | None:
    from idlm.model.factory import load_causal_lm
    from idlm.training.batches import total_steps
    from idlm.training.trainer import TrainJob, train, trained_state_dict, zero3_loading

    opt = phase.train
    steps = total_steps(len(inputs.train), opt.micro_batch_size, opt.grad_accum, world,
                        opt.steps, opt.epochs)
    zero3 = zero3_loading(opt, steps, inputs.device)  # noqa: F841 - must outlive training
    model = load_causal_lm(source, cfg.model, inputs.device, attention=inputs.attention)
    compute = ic_step(inputs, phase.stride, phase.alpha, opt.seed + 7919 * phase.stride,
                      opt.micro_batch_size, opt.grad_accum, world, cfg.ic.random_block_offset)
    job = TrainJob(f"ic {name}", model, compute, opt, steps, phase_dir, fingerprint,
                   inputs.device, stop_after)
    result = train(job)
    if not result.finished:
        return None
    state = trained_state_dict(result.engine)  # gathered on every rank (ZeRO-3 shards)
    last = result.history[-1]
    record = {"phase": name, "stride": phase.stride, "steps": steps,
              "alpha": last["alpha"], "mask_ce": last["mask_ce"], "clean_ce": last["clean_ce"],
              "tokens_per_second": result.tokens_per_second,
              **common.heldout_losses(model, inputs, phase.stride), "fingerprint": fingerprint}
    if rank == 0:
        common.save_model(model, inputs.tokenizer, phase_dir / "final", state_dict=state)
        write_json_atomic(phase_dir / "done.json", record)
    distributed.barrier()
    return record


def _history(phase_dir: Path) -> list[dict[str, float]]:
    log = phase_dir / "log.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


def _finish(cfg: Config, final: Path, summary: dict[str, Any],
            histories: dict[str, list[dict[str, float]]]) -> None:
    from idlm.plots import loss_curves

    common.copy_tree(final, cfg.out("ic", "model"))
    hidden = ("phase", "fingerprint")
    metrics = {"phases": {p["phase"]: {k: v for k, v in p.items() if k not in hidden}
                          for p in summary["phases"]}}
    last = summary["phases"][-1]
    metrics.update(final_stride=last["stride"], heldout_ar_loss=last["heldout_ar_loss"],
                   heldout_mask_loss=last["heldout_mask_loss"])
    write_json_atomic(cfg.out("ic", "metrics.json"), metrics)
    rows = [{"phase": name, **entry} for name, history in histories.items() for entry in history]
    write_json_atomic(cfg.out("ic", "history.json"), rows)
    loss_curves(histories, ["mask_ce", "clean_ce", "alpha"], cfg.out("ic", "loss.png"),
                "ic: introspective-consistency curriculum")
