"""``base`` stage. Tiny: AR-pretrain a Qwen3 from scratch. Real: resolve and pin the checkpoint."""

from __future__ import annotations

from typing import Any

from idlm.config import Config
from idlm.stage import write_json_atomic
from idlm.training import common, distributed


def run(cfg: Config) -> dict[str, Any]:
    if cfg.model.kind == "pretrained":
        return _pin_pretrained(cfg)
    return _pretrain_tiny(cfg)


def _pin_pretrained(cfg: Config) -> dict[str, Any]:
    from transformers import AutoConfig

    from idlm.model.hub import check_mask_row, resolve_checkpoint, to_json

    resolved = resolve_checkpoint(cfg.model.name_or_path, cfg.model.revision)
    model_config = AutoConfig.from_pretrained(resolved.path)
    mask_id = cfg.model.mask_token_id if cfg.model.mask_token_id is not None else 151669
    check_mask_row(model_config, mask_id)
    pin = {"kind": "pretrained", **to_json(resolved), "mask_token_id": mask_id}
    write_json_atomic(common.base_pin_path(cfg), pin)
    # The weights stay where they were resolved (no 16 GB copy); the declared outs hold
    # the pointer, and there is nothing to checkpoint.
    write_json_atomic(cfg.out("base", "model", "checkpoint.json"), pin)
    cfg.out("base", "checkpoints").mkdir(parents=True, exist_ok=True)
    metrics = {"fingerprint": resolved.fingerprint, "files": len(resolved.files),
               "vocab_size": model_config.vocab_size}
    write_json_atomic(cfg.out("base", "metrics.json"), metrics)
    return metrics


def _ar_step(inputs: common.StageInputs, opt_seed: int, micro_batch: int, grad_accum: int,
             world: int, pack_width: int | None):  # noqa: ANN202 - returns a trainer StepFn
    from idlm.objective import IGNORE, clean_loss
    from idlm.training.batches import ic_batch, micro_batch_indices

    def compute(model, step, micro, rank):  # noqa: ANN001, ANN202
        indices = micro_batch_indices(inputs.train, opt_seed, step, micro, micro_batch,
                                      rank, grad_accum, world)
        batch = ic_batch(inputs.train, indices, None, inputs.mask_token_id,
                         inputs.pad_token_id, None, pack_width).to(inputs.device)
        loss = clean_loss(model, batch, inputs.attention, next(model.parameters()).dtype)
        return loss, {"loss": float(loss.detach())}, int((batch.labels != IGNORE).sum())

    return compute


def _pretrain_tiny(cfg: Config, stop_after: int | None = None) -> dict[str, Any]:
    from idlm.model.factory import build_tiny, count_parameters
    from idlm.training.batches import total_steps
    from idlm.training.trainer import TrainJob, train, trained_state_dict

    device = distributed.device_for_rank()
    rank, world = distributed.init(device)
    opt = common.batch_for_world(cfg.base.train, world)
    inputs = common.load_inputs(cfg, device)
    tok = inputs.tokenizer
    model = build_tiny(cfg.model.tiny, len(tok), inputs.pad_token_id, tok.eos_token_id,
                       max_position_embeddings=max(512, cfg.prepare.max_length * 2),
                       seed=cfg.seed, attention=inputs.attention).to(device)
    steps = total_steps(len(inputs.train), opt.micro_batch_size, opt.grad_accum, world,
                        opt.steps, opt.epochs)
    fingerprint = common.fingerprint_of("base", cfg.model.model_dump(),
                                        cfg.base.train.model_dump(), cfg.seed,
                                        inputs.data_fingerprint)
    job = TrainJob("base", model, _ar_step(inputs, opt.seed, opt.micro_batch_size,
                                            opt.grad_accum, world, opt.pack_width),
                   opt, steps, cfg.out("base", "checkpoints"), fingerprint, device, stop_after)
    result = train(job)
    if not result.finished:
        return {"steps": result.steps_done, "finished": False}
    # Gathered on every rank (ZeRO-3 shards); the engine already updated `model` in place.
    state = trained_state_dict(result.engine)
    heldout = {**common.heldout_losses(model, inputs, stride=None),
               **common.heldout_accuracy(cfg, model, inputs, cfg.base.accuracy_items)}
    metrics = {"steps": steps, "parameters": count_parameters(model),
               "train_loss": result.history[-1]["loss"], **heldout,
               "tokens_per_second": result.tokens_per_second}
    if rank == 0:
        common.save_model(model, tok, cfg.out("base", "model"), state_dict=state)
        pin = {"kind": "tiny", "path": "base/model",  # relative to the outputs folder
               "fingerprint": common.fingerprint_of(fingerprint, metrics["train_loss"])}
        write_json_atomic(common.base_pin_path(cfg), pin)
        write_json_atomic(cfg.out("base", "metrics.json"), metrics)
        _plot(cfg, result.history)
    return metrics


def _plot(cfg: Config, history: list[dict[str, float]]) -> None:
    from idlm.plots import loss_curves

    loss_curves({"base": history}, ["loss", "lr"], cfg.out("base", "loss.png"),
                "base: AR pretraining")
    write_json_atomic(cfg.out("base", "history.json"), history)
