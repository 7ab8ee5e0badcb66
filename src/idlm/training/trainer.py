"""The training loop every stage shares, on DeepSpeed's engine (ZeRO 0-3, CPU or GPU).

DeepSpeed owns sharding, the optimizer, the LR schedule, gradient accumulation and
clipping, and checkpoint files. This module adds what a pipeline needs on top: a
deterministic step -> batch mapping, resume from the last checkpoint (only when it was
written for the same fingerprint), a metrics log that survives resumes, and progress.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from idlm.config import TrainSettings
from idlm.config.paths import resolve_path
from idlm.training import distributed

# compute(model, step, micro, rank) -> (loss, stats for logging, tokens in the micro-batch)
StepFn = Callable[[torch.nn.Module, int, int, int], tuple[torch.Tensor, dict[str, float], int]]
# after_step(model, steps done) -> extra metrics to log (e.g. at a curriculum phase's end)
AfterStepFn = Callable[[torch.nn.Module, int], dict[str, float] | None]


@dataclass
class TrainJob:
    name: str
    model: torch.nn.Module
    compute: StepFn
    opt: TrainSettings
    total_steps: int
    checkpoint_dir: Path
    fingerprint: str
    device: str = "cpu"
    stop_after: int | None = None  # testing/debugging: stop early, as a kill would
    after_step: AfterStepFn | None = None


@dataclass
class TrainResult:
    engine: Any
    steps_done: int
    finished: bool
    history: list[dict[str, float]] = field(default_factory=list)
    tokens_per_second: float = 0.0


class _StepModule(torch.nn.Module):
    """What the engine wraps: the model plus how one micro-batch's loss is computed."""

    def __init__(self, model: torch.nn.Module, compute: StepFn, autocast: bool = False) -> None:
        super().__init__()
        self.model = model
        self.compute = compute
        self.autocast = autocast

    def forward(self, step: int, micro: int, rank: int):  # noqa: ANN201
        with torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
            return self.compute(self.model, step, micro, rank)


def deepspeed_config(opt: TrainSettings, total_steps: int, device: str) -> dict[str, Any]:
    path = resolve_path(opt.deepspeed)
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = opt.micro_batch_size
    ds["gradient_accumulation_steps"] = opt.grad_accum
    ds["gradient_clipping"] = opt.grad_clip
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer.setdefault("params", {}).update(
        lr=opt.lr, betas=list(opt.betas), weight_decay=opt.weight_decay)
    if not device.startswith("cuda"):
        optimizer["params"]["torch_adam"] = True  # DeepSpeed's CPU Adam needs a JIT build
    ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
        "total_num_steps": total_steps,
        "warmup_num_steps": max(1, round(opt.warmup_ratio * total_steps)),
        "warmup_min_ratio": 0.0, "cos_min_ratio": opt.min_lr_ratio, "warmup_type": "linear"}}
    if opt.bf16 is True and device.startswith("cuda"):
        ds["bf16"] = {"enabled": True}  # on CPUs bf16 is autocast (see cpu_autocast)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero3_loading(opt: TrainSettings, total_steps: int, device: str) -> Any:
    """With ZeRO-3, models must be *loaded* partitioned (a 32B model does not fit whole on
    every rank): transformers does that while a HfDeepSpeedConfig is alive. Hold the
    returned object until training ends; None for ZeRO 0-2."""
    ds = deepspeed_config(opt, total_steps, device)
    if ds.get("zero_optimization", {}).get("stage", 0) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    distributed.init(device)
    return HfDeepSpeedConfig(ds)


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Keep only each decoder layer's input and recompute the layer in the backward pass
    (``train.activation_checkpointing``; ``idlm preflight`` sizes both ways).

    Non-reentrant checkpointing: gradients reach a frozen base's LoRA layers without inputs
    that require grad, and ZeRO-3's per-module hooks gather again in the recompute. HF
    checkpoints a layer only in training mode, and a loaded checkpoint starts in eval mode.
    """
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed it; PeftModel forwards either name to the wrapped model.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()


def _prepare_checkpoint_dir(job: TrainJob, rank: int) -> None:
    """Keep checkpoints only if they were written for this exact job."""
    stamp = job.checkpoint_dir / "fingerprint.txt"
    if rank == 0:
        if stamp.exists() and stamp.read_text().strip() != job.fingerprint:
            shutil.rmtree(job.checkpoint_dir)
        job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(job.fingerprint)
    distributed.barrier()


def _resume(engine: Any, job: TrainJob) -> int:
    if not (job.checkpoint_dir / "latest").exists():
        return 0
    _, client = engine.load_checkpoint(str(job.checkpoint_dir))
    if not client or client.get("fingerprint") != job.fingerprint:
        return 0
    return int(client["step"])


def _save(engine: Any, job: TrainJob, step: int, rank: int) -> None:
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(job.checkpoint_dir), tag=tag,
                           client_state={"step": step, "fingerprint": job.fingerprint})
    if rank == 0:  # keep only the newest checkpoint: one is enough to resume
        for old in job.checkpoint_dir.glob("step*"):
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old)
    distributed.barrier()


class _Log:
    """Metrics lines in the checkpoint dir, trimmed to the resumed step so curves are clean."""

    def __init__(self, path: Path, start: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.history: list[dict[str, float]] = []
        if path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line]
            self.history = [entry for entry in lines if entry["step"] <= start]
        if enabled:
            path.write_text("".join(json.dumps(e) + "\n" for e in self.history))

    def add(self, entry: dict[str, float]) -> None:
        self.history.append(entry)
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")


class _Window:
    """Means of the stats since the last log line (one micro-batch alone is noisy)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count, self.tokens, self.total_tokens = 0, 0, 0
        self.last: dict[str, float] = {}
        self.started = time.perf_counter()

    def add(self, stats: dict[str, float], tokens: int) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.tokens += tokens
        self.total_tokens += tokens
        self.last = stats

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        means["tokens_per_second"] = self.tokens / elapsed
        self.sums, self.count, self.tokens = {}, 0, 0
        self.started = time.perf_counter()
        return means


def _progress(job: TrainJob, start: int, enabled: bool):  # noqa: ANN202
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=job.total_steps, initial=start, desc=job.name, unit="step")
    return None


def train(job: TrainJob) -> TrainResult:
    """Run (or resume) one training job to ``total_steps``; returns the live engine."""
    import deepspeed

    from idlm.training.precision import cpu_autocast, probe_pass

    rank, _world = distributed.init(job.device)
    _prepare_checkpoint_dir(job, rank)
    torch.manual_seed(job.opt.seed)
    if job.opt.activation_checkpointing:
        checkpoint_activations(job.model)
    autocast = cpu_autocast(job.opt.bf16, job.device, job.checkpoint_dir,
                            probe_pass(job.model, job.compute, rank), rank)
    module = _StepModule(job.model, job.compute, autocast)
    trainable = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, model_parameters=trainable,
        config=deepspeed_config(job.opt, job.total_steps, job.device))
    start = _resume(engine, job)
    log = _Log(job.checkpoint_dir / "log.jsonl", start, enabled=rank == 0)
    bar = _progress(job, start, rank == 0)
    began = time.perf_counter()
    last = job.stop_after if job.stop_after is not None else job.total_steps
    step, window = start, _Window()
    for step in range(start, min(last, job.total_steps)):
        for micro in range(job.opt.grad_accum):
            loss, stats, tokens = engine(step, micro, rank)
            engine.backward(loss)
            last_micro = micro == job.opt.grad_accum - 1
            local = _local_grad_norm(trainable) if last_micro else None
            engine.step()
            norm = _grad_norm(engine, local) if last_micro else None
            window.add(stats if norm is None else {**stats, "grad_norm": norm}, tokens)
        done = step + 1
        extra = job.after_step(job.model, done) if job.after_step else None
        if done % job.opt.log_every == 0 or done == job.total_steps or extra:
            entry = {"step": done, "lr": float(scheduler.get_last_lr()[0]), **window.flush(),
                     **(extra or {})}
            log.add(entry)
            if bar is None and rank == 0:
                shown = " ".join(f"{k}={v:.4g}" for k, v in entry.items()
                                 if k != "step" and isinstance(v, float | int))
                print(f"[{job.name}] step {done}/{job.total_steps} {shown}", flush=True)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in window.last.items()})
        if done % job.opt.checkpoint_every == 0 or done == job.total_steps:
            _save(engine, job, done, rank)
        step = done
    if bar is not None:
        bar.close()
    seconds = max(time.perf_counter() - began, 1e-9)
    return TrainResult(engine, step, step >= job.total_steps, log.history,
                       window.total_tokens / seconds)


def _local_grad_norm(trainable: list[torch.nn.Parameter]) -> float:
    grads = [p.grad for p in trainable if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _grad_norm(engine: Any, local: float) -> float:
    """The step's pre-clipping gradient norm: DeepSpeed's own, read after ``step`` (it is
    computed there, and under ZeRO-2/3 no rank holds the whole gradient); ZeRO-0 on CPU
    keeps none, and there every rank's own gradient, read before ``step``, is the whole."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else local


def trained_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """Full weights of the wrapped model, gathered from ZeRO-3 shards when needed."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    prefix = "model."
    return {k[len(prefix):]: v for k, v in (state or {}).items() if k.startswith(prefix)}
