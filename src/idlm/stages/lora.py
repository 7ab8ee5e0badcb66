"""``lora`` stage: a gated-LoRA adapter on the frozen base, trained with the IC MASK loss.

It starts (``lora.init: ic``) from the best rank-r approximation of what the IC stage
changed in each weight (idlm.model.lora_init), so it depends on the IC model too.

The gate (PEFT layers extended in idlm.model.gated_lora) applies the LoRA delta only
at MASK rows, so every other row is the exact base model: that is what makes R-ISD
lossless. The clean-path CE term would carry no gradient (gate 0 there), so the
objective is the MASK term alone (alpha = 0).
"""

from __future__ import annotations

from typing import Any

from idlm.config import Config
from idlm.stage import write_json_atomic
from idlm.training import common, distributed


def run(cfg: Config, stop_after: int | None = None) -> dict[str, Any]:
    from idlm.config import Phase
    from idlm.model.adapter_files import base_fingerprint
    from idlm.model.factory import count_parameters, load_causal_lm
    from idlm.model.gated_lora import attach_gated_lora
    from idlm.training.batches import total_steps
    from idlm.training.ic import Curriculum, ic_fingerprint, ic_step
    from idlm.training.trainer import TrainJob, train, zero3_loading

    section, opt = cfg.lora, cfg.lora.train
    device = distributed.device_for_rank()
    rank, world = distributed.init(device)
    opt = common.batch_for_world(opt, world)
    inputs = common.load_inputs(cfg, device)
    pin = common.read_base_pin(cfg)
    steps = total_steps(len(inputs.train), opt.micro_batch_size, opt.grad_accum, world,
                        opt.steps, opt.epochs)
    zero3 = zero3_loading(opt, steps, device)  # noqa: F841 - must outlive training
    base_dir = common.base_model_path(cfg, pin)
    base = load_causal_lm(base_dir, cfg.model, device, attention=inputs.attention)
    # The adapter records the exact weights it is trained on; loaders refuse any others.
    fingerprint_of_base = base_fingerprint(base, checkpoint_hash=pin["fingerprint"],
                                           weights_dir=base_dir, known_digests=pin.get("files"))
    model = attach_gated_lora(base, inputs.mask_token_id, section.rank, section.alpha,
                              section.dropout, section.targets, section.mask_embedding)
    if section.init == "ic":
        from idlm.model.lora_init import TunedWeights, init_from_tuned

        layers = init_from_tuned(model, TunedWeights(cfg.out("ic", "model")),
                                 inputs.mask_token_id)
        if rank == 0:
            print(f"[lora] {layers} adapters start from the IC model's weight change "
                  f"(rank {section.rank})", flush=True)
    # With `init: ic` the start depends on the IC model, so on what the IC stage trained on.
    start = (ic_fingerprint(cfg, pin, inputs.data_fingerprint) if section.init == "ic"
             else None)
    fingerprint = common.fingerprint_of("lora", pin["fingerprint"], section.model_dump(),
                                        inputs.data_fingerprint, start)
    curriculum = Curriculum([Phase(stride=section.stride, alpha=0.0, steps=steps)], [steps])
    compute = ic_step(inputs, curriculum, opt.seed, opt.micro_batch_size, opt.grad_accum,
                      world, cfg.ic.random_block_offset, opt.pack_width)
    job = TrainJob("lora", model, compute, opt, steps, cfg.out("lora", "checkpoints"),
                   fingerprint, device, stop_after)
    result = train(job)
    if not result.finished:
        return {"finished": False, "steps": result.steps_done}
    last = result.history[-1]
    metrics = {"steps": steps, "mask_ce": last["mask_ce"], "stride": section.stride,
               "trainable_parameters": count_parameters(model, trainable_only=True),
               "tokens_per_second": result.tokens_per_second,
               **common.heldout_losses(model, inputs, section.stride)}
    if rank == 0:
        _save(cfg, model, fingerprint_of_base, metrics, result.history)
    return metrics


def _save(cfg: Config, model, fingerprint_of_base: dict[str, Any],  # noqa: ANN001
          metrics: dict[str, Any], history: list[dict[str, float]]) -> None:
    from idlm.model.adapter_files import save_gated_lora
    from idlm.plots import loss_curves

    save_gated_lora(model, cfg.out("lora", "adapter"), fingerprint_of_base)
    write_json_atomic(cfg.out("lora", "metrics.json"), metrics)
    write_json_atomic(cfg.out("lora", "history.json"), history)
    loss_curves({"lora": history}, ["mask_ce", "lr"], cfg.out("lora", "loss.png"),
                "lora: gated adapter, MASK loss")
