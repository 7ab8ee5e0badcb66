"""``ic`` stage: introspective-consistency training over a stride curriculum.

The phases (default N=2 then N=3; the tiny profile ends at N=4, the serving stride) are
one DeepSpeed run: one optimizer state and one warmup + cosine schedule over their summed
length. A phase boundary changes the stride and alpha of the batches, nothing else, so
the model is not re-warmed from lr 0 nor decayed to the floor within each phase, and a
killed run resumes exactly, on either side of a boundary. At each boundary the held-out
losses (and, if ``ic.accuracy_items``, AR answer accuracy) are recorded for that phase.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from idlm.config import Config
from idlm.stage import write_json_atomic
from idlm.training import common, distributed
from idlm.training.ic import PHASES_FILE, Curriculum, ic_fingerprint, ic_step, phase_name


def run(cfg: Config, stop_after: int | None = None) -> dict[str, Any]:
    """Train the whole curriculum; ``stop_after`` (a global step) stops as a kill would."""
    from idlm.model.factory import load_causal_lm
    from idlm.training.trainer import TrainJob, train, trained_state_dict, zero3_loading

    device = distributed.device_for_rank()
    rank, world = distributed.init(device)
    inputs = common.load_inputs(cfg, device)
    pin = common.read_base_pin(cfg)
    opt = common.batch_for_world(cfg.ic.train, world)
    curriculum = Curriculum.of(cfg.ic.phases, len(inputs.train),
                               opt.micro_batch_size * opt.grad_accum * world)
    zero3 = zero3_loading(opt, curriculum.total_steps, device)  # noqa: F841 - outlives training
    model = load_causal_lm(common.base_model_path(cfg, pin), cfg.model, device,
                           attention=inputs.attention)
    fingerprint = ic_fingerprint(cfg, pin, inputs.data_fingerprint)
    checkpoints = cfg.out("ic", "checkpoints")
    compute = ic_step(inputs, curriculum, opt.seed, opt.micro_batch_size, opt.grad_accum,
                      world, cfg.ic.random_block_offset, opt.pack_width, cfg.ic.alpha_max)
    after = _phase_end_recorder(cfg, inputs, curriculum, checkpoints, rank)
    job = TrainJob("ic", model, compute, opt, curriculum.total_steps, checkpoints,
                   fingerprint, device, stop_after, after)
    result = train(job)
    if not result.finished:
        return {"finished": False, "steps": result.steps_done}
    state = trained_state_dict(result.engine)  # gathered on every rank (ZeRO-3 shards)
    summary = _summary(curriculum, result.history, checkpoints, result.tokens_per_second)
    # Each log line names its phase: MLflow then draws one curve per phase.
    history = [{**entry, "phase": phase_name(index, curriculum.phases[index])}
               for entry in result.history
               for index in [curriculum.index_at(int(entry["step"]) - 1)]]
    if rank == 0:
        common.save_model(model, inputs.tokenizer, cfg.out("ic", "model"), state_dict=state)
        _finish(cfg, summary, history)
    distributed.barrier()
    return summary


def _phase_end_recorder(cfg: Config, inputs: common.StageInputs, curriculum: Curriculum,
                        checkpoints: Path, rank: int):  # noqa: ANN202 - a trainer AfterStepFn
    """At each phase's last step: held-out losses (+ accuracy) into phases.json."""
    def after(model, done):  # noqa: ANN001, ANN202
        index = curriculum.ending_at(done)
        if index is None:
            return None
        phase = curriculum.phases[index]
        record = {"phase": phase_name(index, phase), "stride": phase.stride, "steps": done,
                  **common.heldout_losses(model, inputs, phase.stride),
                  **common.heldout_accuracy(cfg, model, inputs, cfg.ic.accuracy_items)}
        if rank == 0:
            path = checkpoints / PHASES_FILE
            records = json.loads(path.read_text()) if path.is_file() else {}
            records[record["phase"]] = record
            write_json_atomic(path, records)
        return {k: v for k, v in record.items() if isinstance(v, float)}

    return after


def _summary(curriculum: Curriculum, history: list[dict[str, Any]], checkpoints: Path,
             tokens_per_second: float) -> dict[str, Any]:
    path = checkpoints / PHASES_FILE
    records = json.loads(path.read_text()) if path.is_file() else {}
    phases = []
    for index, (phase, end) in enumerate(zip(curriculum.phases, curriculum.ends, strict=True)):
        name = phase_name(index, phase)
        last = [e for e in history if e["step"] <= end and "mask_ce" in e][-1]
        phases.append({**records.get(name, {}), "phase": name, "stride": phase.stride,
                       "steps": end, "alpha": last["alpha"], "mask_ce": last["mask_ce"],
                       "clean_ce": last["clean_ce"]})
    return {"phases": phases, "steps": curriculum.total_steps,
            "tokens_per_second": tokens_per_second}


def _finish(cfg: Config, summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
    from idlm.plots import loss_curves

    numeric = [{k: v for k, v in e.items() if k != "phase"} for e in history]
    metrics: dict[str, Any] = {
        "phases": {p["phase"]: {k: v for k, v in p.items() if k != "phase"}
                   for p in summary["phases"]},
        "steps": summary["steps"], "tokens_per_second": summary["tokens_per_second"]}
    last = summary["phases"][-1]
    metrics.update(final_stride=last["stride"], **{
        k: v for k, v in last.items() if k.startswith(("heldout_", "accuracy_"))})
    write_json_atomic(cfg.out("ic", "metrics.json"), metrics)
    write_json_atomic(cfg.out("ic", "history.json"), history)
    loss_curves({"ic": numeric}, ["mask_ce", "clean_ce", "alpha", "grad_norm", "lr", "stride"],
                cfg.out("ic", "loss.png"), "ic: introspective-consistency curriculum")
