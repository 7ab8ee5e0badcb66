"""``idlm preflight``: each training stage's memory per GPU, from the profile alone.

No weights, no GPU: the model (``model.tiny``, the checkpoint's local config.json or the
built-in Qwen3 table) is built on the meta device, so parameter counts are exact. Per GPU
and training stage (base when tiny, ic, lora): model states (DeepSpeed's ZeRO estimators),
activations of one micro-batch of IC rows (L + R <= 2 x max_length tokens) with and
without activation checkpointing, logits (fp32, for the loss) and buffers (DeepSpeed's
buckets, the CUDA context), against ``cluster.gpu_memory_gib``.

A plan that does not fit raises PreflightError: one line naming the stage, the estimate
and a change that makes it fit (tried in the estimator).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

from idlm.cluster.qwen3_shapes import QWEN3_SHAPES, known_shape
from idlm.config import Config, LoraSection, TrainSettings
from idlm.config.paths import ConfigError, looks_local, resolve_path

GIB = 1 << 30
CUDA_CONTEXT_BYTES = 1 << 30  # CUDA context, cuBLAS/NCCL workspaces
ZERO3_JSON = "configs/deepspeed/zero3.json"
MAX_NODES = 64
# fp32 log-probs kept for the backward pass, then the fp32 gradients of the log-probs and
# of the logits while the loss's backward runs: 3 x 4 bytes per token and vocabulary entry.
LOGIT_BYTES = 12


class PreflightError(ConfigError):
    """A plan that does not fit: one line saying what to change."""


@dataclass(frozen=True)
class Architecture:
    source: str
    hidden_size: int
    num_hidden_layers: int
    attention_width: int  # query heads x head_dim
    kv_width: int         # key/value heads x head_dim
    intermediate_size: int
    vocab_size: int
    parameters: int       # tied embeddings counted once
    largest_layer: int    # parameters of the largest module (what ZeRO-3 gathers at once)
    layer_linears: tuple[tuple[str, int, int], ...]  # (name, in, out) of one decoder layer


@dataclass(frozen=True)
class Plan:
    stage: str
    zero_stage: int
    nodes: int
    ranks_per_node: int
    micro_batch_size: int
    row_tokens: int
    activation_checkpointing: bool
    mixed_precision: bool
    trainable: int
    frozen: int
    lora_bytes_per_gated_token: int = 0  # gated LoRA's extra activations per MASK row
    bucket_bytes: int = 0

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.row_tokens


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    model_states: int
    activations_off: int  # without activation checkpointing
    activations_on: int   # with it
    logits: int
    buffers: int

    @property
    def activations(self) -> int:
        return self.activations_on if self.plan.activation_checkpointing else self.activations_off

    @property
    def total(self) -> int:
        return self.model_states + self.activations + self.logits + self.buffers

    def fits(self, budget_gib: float) -> bool:
        return self.total <= budget_gib * GIB


# ---------------------------------------------------------------- architecture
def _hf_config(cfg: Config) -> tuple[Any, str]:
    model = cfg.model
    if model.kind == "tiny":
        from idlm.model.factory import tiny_config

        return tiny_config(model.tiny, cfg.prepare.tokenizer.vocab_size, 0, 1,
                           2 * cfg.prepare.max_length), "model.tiny"
    from transformers import AutoConfig, Qwen3Config

    name = model.name_or_path
    local = str(resolve_path(name)) if looks_local(name) else name
    with contextlib.suppress(OSError, ValueError):  # not a local folder, not in the hub cache
        return AutoConfig.from_pretrained(local, revision=model.revision,
                                          local_files_only=True), "local config.json"
    shape = known_shape(model.name_or_path)
    if shape is None:
        raise PreflightError(
            f"model.name_or_path {model.name_or_path!r}: its config.json is not on this machine "
            f"and it is not a built-in Qwen3 shape ({', '.join(QWEN3_SHAPES)}); download its "
            "config.json (huggingface-cli download <id> config.json) and run preflight again")
    return Qwen3Config(**shape), "built-in Qwen3 shape"


def architecture(cfg: Config) -> Architecture:
    """The profile's model, built on the meta device: exact counts, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config, source = _hf_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    largest = max(sum(p.numel() for p in module.parameters(recurse=False))
                  for module in model.modules())
    linears = tuple((name, module.in_features, module.out_features)
                    for name, module in model.get_decoder().layers[0].named_modules()
                    if isinstance(module, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return Architecture(
        source, config.hidden_size, config.num_hidden_layers,
        attention_width=config.num_attention_heads * head_dim, kv_width=kv_heads * head_dim,
        intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
        parameters=sum(p.numel() for p in model.parameters()), largest_layer=largest,
        layer_linears=linears)


def lora_sizes(arch: Architecture, lora: LoraSection) -> tuple[int, int]:
    """The gated LoRA's trainable parameters (rank x (in + out) per adapted linear, plus the
    MASK-embedding delta) and its activation bytes per MASK row and layer: each gated linear
    keeps its own copy of its MASK rows' input and lora_A's rank-r output."""
    adapted = [(i, o) for name, i, o in arch.layer_linears if lora.targets == "all-linear"
               or any(name == t or name.endswith("." + t) for t in lora.targets)]  # PEFT's rule
    parameters = sum(lora.rank * (i + o) for i, o in adapted) * arch.num_hidden_layers
    return (parameters + (arch.hidden_size if lora.mask_embedding else 0),
            sum(2 * (i + lora.rank) for i, _ in adapted))


# ---------------------------------------------------------------- the plan
def _settings(cfg: Config, stage: str) -> TrainSettings:
    settings = {"base": cfg.base.train, "ic": cfg.ic.train, "lora": cfg.lora.train}[stage]
    if settings is None:  # a pretrained base is resolved, not trained
        raise PreflightError(f"stage '{stage}' does not train in profile {cfg.profile}")
    return settings


def training_stages(cfg: Config) -> list[str]:
    return (["base"] if cfg.base.train is not None else []) + ["ic", "lora"]


def _zero_section(deepspeed: str) -> dict[str, Any]:
    path = resolve_path(deepspeed)
    try:
        return json.loads(path.read_text()).get("zero_optimization", {})
    except (OSError, ValueError) as exc:
        raise PreflightError(f"{path}: cannot read the DeepSpeed config ({exc})") from None


def _bucket_bytes(zero: dict[str, Any]) -> int:
    """DeepSpeed's 16-bit communication buffers, with its defaults for absent keys."""
    stage, overlap = zero.get("stage", 0), bool(zero.get("overlap_comm", False))
    reduce_bucket = float(zero.get("reduce_bucket_size", 5e8))
    if stage in (1, 2):  # DeepSpeed's docs: overlap_comm takes 4.5x the two buckets
        allgather = float(zero.get("allgather_bucket_size", 5e8))
        return int((4.5 if overlap else 1.0) * 2 * (allgather + reduce_bucket))
    if stage == 3:
        prefetch = float(zero.get("stage3_prefetch_bucket_size", 5e7))
        return int(2 * reduce_bucket * (2 if overlap else 1) + 2 * prefetch)
    return 0


def plan_for(cfg: Config, stage: str, arch: Architecture) -> Plan:
    opt = _settings(cfg, stage)
    zero = _zero_section(opt.deepspeed)
    zero_stage = int(zero.get("stage", 0))  # not 0-3: DeepSpeed refuses it; size it unsharded
    # IC rows are [x_0 | MASK x R]: L + R <= 2L tokens (docs/method.md); base trains AR rows.
    sequence = cfg.prepare.max_length * (1 if stage == "base" else 2)
    trainable, frozen, lora_bytes = arch.parameters, 0, 0
    if stage == "lora":
        (trainable, lora_bytes), frozen = lora_sizes(arch, cfg.lora), arch.parameters
    return Plan(stage=stage, zero_stage=zero_stage if zero_stage in (1, 2, 3) else 0,
                nodes=cfg.cluster.nodes, ranks_per_node=cfg.cluster.ranks_per_node,
                micro_batch_size=opt.micro_batch_size,
                row_tokens=max(opt.pack_width or 0, sequence),
                activation_checkpointing=opt.activation_checkpointing,
                mixed_precision=opt.bf16 is True or cfg.model.dtype == "bfloat16",
                trainable=trainable, frozen=frozen, lora_bytes_per_gated_token=lora_bytes,
                bucket_bytes=_bucket_bytes(zero))


# ---------------------------------------------------------------- the estimate
def model_states(plan: Plan, arch: Architecture, deepspeed: bool = True) -> int:
    """Weights, gradients and optimizer states per GPU (ZeRO, no CPU offload).

    Mixed precision at ZeRO-2/3: DeepSpeed's own estimators, for the trainable parameters.
    Otherwise (or ``deepspeed=False``) the same bytes per trainable parameter: 16-bit weight
    (2) and grad (2), fp32 grad (4), master weight (4) and Adam's moments (8); ZeRO-1 shards
    the fp32 16, ZeRO-2 all but the 16-bit weight, ZeRO-3 the 18 DeepSpeed counts, plus 4 x
    the largest layer for its gathers. fp32: weight 4, grad 4, Adam 8. A frozen base (LoRA)
    adds its weights only: replicated below ZeRO-3, sharded at ZeRO-3.
    """
    weight, optimizer = (2, 16) if plan.mixed_precision else (4, 8)
    trainable, world, zero = plan.trainable, plan.world_size, plan.zero_stage
    if deepspeed and plan.mixed_precision and zero in (2, 3):
        with contextlib.redirect_stdout(sys.stderr):  # its import logs to stdout
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        if zero == 2:
            _, states = estimate_zero2_model_states_mem_needs(
                trainable, plan.ranks_per_node, plan.nodes, cpu_offload=False)
        else:
            _, states, _ = estimate_zero3_model_states_mem_needs(
                trainable, arch.largest_layer, plan.ranks_per_node, plan.nodes,
                cpu_offload=False, cpu_offload_params=False, zero_init=True)
    else:
        states = {0: (2 * weight + optimizer) * trainable,
                  1: 2 * weight * trainable + optimizer * trainable // world,
                  2: weight * trainable + (weight + optimizer) * trainable // world,
                  3: 4 * arch.largest_layer + (weight + optimizer) * trainable // world}[zero]
    frozen = weight * plan.frozen
    return int(states) + (frozen // world if zero == 3 else frozen)


def _layer_bytes_per_token(arch: Architecture, frozen_base: bool) -> int:
    """Bytes one decoder layer keeps for the backward pass per token, 16-bit activations.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation", s*b*h*(34 + 5*a*s/h))
    counted the way autograd saves tensors in HF's Qwen3 layer: no dropout; flash/flex
    attention keeps q, k, v and its output (no s x s scores) with GQA's narrower k, v;
    RMSNorm (also on q and k) keeps an fp32 copy of its input (4 bytes) and its normalised
    16-bit input for the weight's gradient (2); SwiGLU keeps gate's output, SiLU's output
    and up's output; each linear keeps its input for its weight's gradient. A frozen base
    (LoRA) drops the tensors kept only for weight gradients.
    """
    hidden, query, kv, inter = (arch.hidden_size, arch.attention_width, arch.kv_width,
                                arch.intermediate_size)
    norm = 4 if frozen_base else 6
    linear_inputs = 0 if frozen_base else 2 * (hidden + query + hidden + inter)
    attention = 2 * (query + 2 * kv) + 2 * query
    return 2 * norm * hidden + linear_inputs + attention + norm * (query + kv) + 6 * inter


def activations(plan: Plan, arch: Architecture) -> tuple[int, int]:
    """(without, with) activation checkpointing, bytes for one micro-batch.

    Without: every layer's saved tensors at the end of the forward pass, plus one layer's
    worth of gradients in the backward. With (per-layer, non-reentrant): each layer's 16-bit
    input, plus one layer recomputed and its gradients. Both add the final norm and the
    head's input (8 bytes per hidden unit). MASK rows (up to half an IC row) add the gated
    LoRA's own tensors. fp32 activations double all of it."""
    per_layer = (_layer_bytes_per_token(arch, frozen_base=plan.frozen > 0)
                 + plan.lora_bytes_per_gated_token // 2)
    layers, outside = arch.num_hidden_layers, 8 * arch.hidden_size
    scale = plan.tokens * (1 if plan.mixed_precision else 2)
    return (scale * ((layers + 1) * per_layer + outside),
            scale * (layers * 2 * arch.hidden_size + 2 * per_layer + outside))


def estimate(plan: Plan, arch: Architecture) -> Estimate:
    return Estimate(plan, model_states(plan, arch), *activations(plan, arch),
                    logits=LOGIT_BYTES * plan.tokens * arch.vocab_size,
                    buffers=plan.bucket_bytes + CUDA_CONTEXT_BYTES)


# ---------------------------------------------------------------- report and refusal
@dataclass
class Report:
    profile: str
    architecture: Architecture
    budget_gib: float
    estimates: list[Estimate]

    @property
    def fits(self) -> bool:
        return all(e.fits(self.budget_gib) for e in self.estimates)

    def to_json(self) -> dict[str, Any]:
        parts = ("model_states", "activations", "activations_off", "activations_on", "logits",
                 "buffers", "total")
        stages = {e.plan.stage: {**asdict(e.plan), "world_size": e.plan.world_size,
                                 "tokens": e.plan.tokens, "fits": e.fits(self.budget_gib),
                                 "gib": {k: _gib(getattr(e, k)) for k in parts}}
                  for e in self.estimates}
        return {"profile": self.profile, "budget_gib": self.budget_gib, "fits": self.fits,
                "architecture": asdict(self.architecture), "stages": stages}

    def table(self) -> str:
        arch, first = self.architecture, self.estimates[0].plan
        rows = [f"preflight {self.profile}: {arch.parameters:,} parameters ({arch.source}), "
                f"{first.nodes} node(s) x {first.ranks_per_node} rank(s), "
                f"{self.budget_gib:g} GiB per GPU",
                f"{'GiB per GPU':<12}{'ZeRO':>5}{'tokens':>9}{'states':>8}{'act off':>9}"
                f"{'act on':>8}{'logits':>8}{'buffers':>8}{'total':>8}  fits"]
        for e in self.estimates:
            on = e.plan.activation_checkpointing
            rows.append(
                f"{e.plan.stage:<12}{e.plan.zero_stage:>5}{e.plan.tokens:>9}"
                f"{_gib(e.model_states):>8.1f}{_gib(e.activations_off):>8.1f}{' *'[not on]}"
                f"{_gib(e.activations_on):>7.1f}{' *'[on]}{_gib(e.logits):>8.1f}"
                f"{_gib(e.buffers):>8.1f}{_gib(e.total):>8.1f}  "
                f"{'yes' if e.fits(self.budget_gib) else 'NO'}")
        rows.append("act off / on: activations without / with activation checkpointing; "
                    "* counted in the total (<stage>.train.activation_checkpointing)")
        return "\n".join(rows)


def _gib(value: int) -> float:
    return round(value / GIB, 2)


def preflight(cfg: Config, stages: list[str] | None = None) -> Report:
    """Estimates of the training stages in ``stages`` (default: all the profile trains)."""
    chosen = [s for s in training_stages(cfg) if stages is None or s in stages]
    arch = architecture(cfg)
    return Report(cfg.profile, arch, cfg.cluster.gpu_memory_gib,
                  [estimate(plan_for(cfg, stage, arch), arch) for stage in chosen])


def check(cfg: Config, stages: list[str] | None = None) -> Report | None:
    """PreflightError for a stage that does not fit; None if ``stages`` has no training."""
    if stages is not None and not set(stages) & set(training_stages(cfg)):
        return None
    report = preflight(cfg, stages)
    for e in report.estimates:
        if not e.fits(report.budget_gib):
            raise PreflightError(refusal(cfg, report.architecture, e))
    return report


def _options(cfg: Config, plan: Plan) -> list[list[tuple[str, dict[str, Any]]]]:
    """Changes to try, per kind, mildest first: checkpointing, micro-batch, ZeRO-3, nodes."""
    stage, nodes, micro = plan.stage, plan.nodes, plan.micro_batch_size
    zero3 = _zero_section(ZERO3_JSON) if resolve_path(ZERO3_JSON).is_file() else {"stage": 3}
    local = " (with cluster.launch slurm or kubernetes)" if cfg.cluster.launch == "local" else ""
    groups = [
        [] if plan.activation_checkpointing else [
            (f"{stage}.train.activation_checkpointing=true", {"activation_checkpointing": True})],
        [(f"{stage}.train.micro_batch_size={micro >> k}", {"micro_batch_size": micro >> k})
         for k in range(1, micro.bit_length())],
        [] if plan.zero_stage == 3 else [(f"{stage}.train.deepspeed={ZERO3_JSON}",
                                          {"zero_stage": 3, "bucket_bytes": _bucket_bytes(zero3)})],
        [(f"cluster.nodes={nodes << k}{local}", {"nodes": nodes << k})
         for k in range(1, 7) if nodes << k <= MAX_NODES]]
    return [group for group in groups if group]


def _batch_ok(cfg: Config, plan: Plan) -> bool:
    global_batch = _settings(cfg, plan.stage).global_batch_size
    return global_batch is None or global_batch % (plan.micro_batch_size * plan.world_size) == 0


def suggestion(cfg: Config, arch: Architecture, plan: Plan) -> tuple[list[str], Estimate] | None:
    """The fewest, mildest changes that make ``plan`` fit, tried in the estimator."""
    budget, groups = cfg.cluster.gpu_memory_gib, _options(cfg, plan)
    for size in range(1, len(groups) + 1):
        for chosen in itertools.combinations(groups, size):
            for combo in itertools.product(*chosen):
                changed = replace(plan, **{k: v for _, change in combo for k, v in change.items()})
                if not _batch_ok(cfg, changed):
                    continue
                result = estimate(changed, arch)
                if result.fits(budget):
                    return [text for text, _ in combo], result
    return None


def refusal(cfg: Config, arch: Architecture, e: Estimate) -> str:
    """One line: the stage, its estimate against the budget, and what to change."""
    parts = (f"model states {_gib(e.model_states):.1f} + activations {_gib(e.activations):.1f}"
             f" + logits {_gib(e.logits):.1f} + buffers {_gib(e.buffers):.1f}")
    head = (f"preflight: stage '{e.plan.stage}' needs {_gib(e.total):.1f} GiB per GPU ({parts}) "
            f"> cluster.gpu_memory_gib {cfg.cluster.gpu_memory_gib:g}")
    found = suggestion(cfg, arch, e.plan)
    if found is None:
        return (f"{head}; no change tried fits (activation checkpointing, micro-batch 1, ZeRO-3, "
                f"up to {MAX_NODES} nodes as global_batch_size allows): shorten "
                "prepare.max_length or use larger GPUs")
    changes, fixed = found
    return f"{head}: set {' and '.join(changes)} (-> {_gib(fixed.total):.1f} GiB)"
