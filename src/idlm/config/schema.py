"""The schema: every section of a profile, assembled into ``Config``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from idlm.config.cluster import ClusterConfig
from idlm.config.downstream import EvaluateSection, ExportSection, GateSection, VerifySection
from idlm.config.paths import DEFAULT_OUTPUTS, workspace
from idlm.config.sections import Section


# ---------------------------------------------------------------- prepare
class SyntheticData(Section):
    """The tiny profile's generated corpus (see idlm.data.synthetic)."""

    train_size: Annotated[int, Field(gt=0)] = 40_000
    eval_size: Annotated[int, Field(gt=0)] = 400
    mix: dict[Literal["arithmetic", "multiple_choice", "code", "instruction"],
              Annotated[float, Field(ge=0)]] = {
        "arithmetic": 0.55,
        "multiple_choice": 0.15,
        "code": 0.15,
        "instruction": 0.15,
    }
    # The held-out set's mix (what evaluate, verify and the gate measure on); None: ``mix``.
    # Separate so that training's share of each kind is a recipe choice that leaves the
    # held-out items, drawn from their own seed stream, byte-identical.
    eval_mix: dict[Literal["arithmetic", "multiple_choice", "code", "instruction"],
                   Annotated[float, Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _some_mix(self) -> SyntheticData:
        for key, mix in (("mix", self.mix), ("eval_mix", self.eval_mix)):
            if mix is not None and sum(mix.values()) <= 0:
                raise ValueError(f"key 'prepare.synthetic.{key}': weights sum to 0 (got "
                                 f"{mix}); allowed: weights >= 0 with a positive sum")
        return self


class HubData(Section):
    """An SFT dataset of chat ``messages`` rows: hub id + pinned revision, or a local path."""

    name_or_path: str = ""
    revision: str | None = None
    split: Annotated[str, Field(min_length=1)] = "train"
    messages_field: Annotated[str, Field(min_length=1)] = "messages"
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.01
    max_rows: Annotated[int, Field(gt=0)] | None = None
    # An object-store prefix or folder of chat files (s3://bucket/sft/), imported with
    # `dvc import-url` into data/source before each flow run (idlm.data.refresh); read
    # instead of name_or_path.
    import_url: str | None = None
    # The immutable data version, written by the flow's refresh (the import's DVC hash or
    # the hub commit of `revision`): tracked by DVC, so new data reruns prepare and after.
    version: str | None = None


class TokenizerSpec(Section):
    """``train``: byte-level BPE trained on the corpus; ``pretrained``: the base model's."""

    kind: Literal["train", "pretrained"] = "train"
    vocab_size: Annotated[int, Field(gt=0)] = 2048
    name_or_path: str = ""
    revision: str | None = None
    mask_token: Annotated[str, Field(min_length=1)] = "<|MASK|>"


class PrepareConfig(Section):
    source: Literal["synthetic", "hub"] = "synthetic"
    synthetic: SyntheticData = SyntheticData()
    dataset: HubData = HubData()
    tokenizer: TokenizerSpec = TokenizerSpec()
    max_length: Annotated[int, Field(gt=8)] = 256
    shard_rows: Annotated[int, Field(gt=0)] = 50_000
    num_proc: Annotated[int, Field(gt=0)] = 1


# ---------------------------------------------------------------- model / base
class TinyArchitecture(Section):
    """A Qwen3 architecture small enough for 2 CPU cores."""

    hidden_size: Annotated[int, Field(gt=0)] = 256
    num_hidden_layers: Annotated[int, Field(gt=0)] = 4
    num_attention_heads: Annotated[int, Field(gt=0)] = 4
    num_key_value_heads: Annotated[int, Field(gt=0)] = 2
    head_dim: Annotated[int, Field(gt=0)] = 64
    intermediate_size: Annotated[int, Field(gt=0)] = 1024
    rope_theta: Annotated[float, Field(gt=0)] = 10_000.0
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyArchitecture:
        # Grouped-query attention shares each KV head among heads / kv_heads query heads.
        for key, part, whole, whole_key in (
                ("num_attention_heads", self.num_attention_heads, self.hidden_size, "hidden_size"),
                ("num_key_value_heads", self.num_key_value_heads, self.num_attention_heads,
                 "num_attention_heads")):
            if whole % part:
                raise ValueError(f"key 'model.tiny.{key}': {part} does not divide {whole_key} "
                                 f"{whole}; allowed: a divisor of model.tiny.{whole_key}")
        return self


class ModelConfig(Section):
    """``tiny``: built from ``tiny`` and AR-pretrained by ``base``; ``pretrained``: resolved."""

    kind: Literal["tiny", "pretrained"] = "tiny"
    name_or_path: str = ""
    revision: str | None = None
    tiny: TinyArchitecture = TinyArchitecture()
    # Qwen3's <|MASK|> row 151669 already exists in its padded embedding.
    mask_token_id: Annotated[int, Field(ge=0)] | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Literal["auto", "sdpa", "flex"] = "auto"


class TrainSettings(Section):
    """How one training run optimises: DeepSpeed engine, AdamW, warmup + cosine, layout.

    How *long* it runs is ``Optimisation.steps`` / ``epochs``, or, for the IC curriculum,
    the sum of its phases' lengths (one schedule and one optimizer state for all phases).
    """

    deepspeed: str = "configs/deepspeed/zero0.json"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9, 0.98)
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    micro_batch_size: Annotated[int, Field(gt=0)] = 32
    grad_accum: Annotated[int, Field(gt=0)] = 1
    # Rows per optimizer step over all ranks. Set it (and leave grad_accum at 1) on a
    # cluster: grad_accum is then derived from the world size, so the same run on 1 node
    # or 2 takes the same steps, and DVC (which tracks this, not the topology) reruns
    # nothing when it moves.
    global_batch_size: Annotated[int, Field(gt=0)] | None = None
    # Recompute each decoder layer's activations in the backward pass (less memory).
    activation_checkpointing: bool = False
    # Pack each micro-batch's sequences into rows of this many tokens (attention never
    # crosses sequences); null: one padded row per sequence.
    pack_width: Annotated[int, Field(gt=0)] | None = None
    # bf16 autocast where it pays: "auto" measures fp32 against bf16 on this machine first.
    bf16: bool | Literal["auto"] = False
    checkpoint_every: Annotated[int, Field(gt=0)] = 100
    log_every: Annotated[int, Field(gt=0)] = 10
    seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _one_batch_size(self) -> TrainSettings:
        if self.global_batch_size is not None and self.grad_accum != 1:
            raise ValueError("set grad_accum or global_batch_size, not both "
                             "(global_batch_size derives grad_accum from the world size)")
        return self


class _RunLength(Section):
    steps: Annotated[int, Field(gt=0)] | None = 600
    epochs: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> _RunLength:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of 'steps' or 'epochs'")
        return self


class Optimisation(TrainSettings, _RunLength):
    """One training run of its own length (base, lora)."""


class BaseConfig(Section):
    """Tiny: the AR-pretraining run. Pretrained models are only resolved and pinned."""

    train: Optimisation | None = None
    # Held-out AR answer accuracy after pretraining (items per kind; 0: off).
    accuracy_items: Annotated[int, Field(ge=0)] = 0


# ---------------------------------------------------------------- ic
class Phase(_RunLength):
    """One curriculum phase: stride N (B = N-1 MASKs per block), its alpha and length.

    A phase changes the stride, not the optimizer: all phases are one DeepSpeed run with
    one warmup + cosine schedule over their summed length (``ic.train``).
    """

    stride: Annotated[int, Field(ge=2, le=16)]
    alpha: Annotated[float, Field(ge=0)] | Literal["auto"] = 0.2
    steps: Annotated[int, Field(gt=0)] | None = None


class ICConfig(Section):
    train: TrainSettings = TrainSettings(lr=1e-3)
    phases: list[Phase] = [Phase(stride=2, epochs=1.0), Phase(stride=3, alpha="auto", epochs=1.0)]
    random_block_offset: bool = True
    # Upper bound on auto-balanced alpha (null: unbounded). A nearly learnt AR loss makes
    # L_mask / L_clean large, which scales the clean gradient by that much.
    alpha_max: Annotated[float, Field(gt=0)] | None = None
    # Held-out AR answer accuracy after every phase (items per kind; 0: off).
    accuracy_items: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _phases(self) -> ICConfig:
        if not self.phases:
            raise ValueError("at least one curriculum phase is needed")
        if len({p.steps is None for p in self.phases}) > 1:
            raise ValueError("give every phase 'steps' or every phase 'epochs', not a mix")
        return self


# ---------------------------------------------------------------- lora
class LoraSection(Section):
    """Gated LoRA on the frozen base: the delta is on at MASK rows only."""

    rank: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    targets: list[str] | Literal["all-linear"] = "all-linear"
    # Train a delta on the MASK token's embedding (at MASK rows only): embeddings are not
    # LoRA targets, and on a real Qwen3 the MASK row is an untrained one.
    mask_embedding: bool = True
    # Where training starts: `ic`, the best rank-r approximation of the IC stage's weight
    # change (idlm.model.lora_init); `zero`, PEFT's default (B = 0).
    init: Literal["ic", "zero"] = "ic"
    stride: Annotated[int, Field(ge=2, le=16)] = 3
    train: Optimisation = Optimisation(lr=2e-3, steps=300)


# ---------------------------------------------------------------- flow
class FlowConfig(Section):
    """How the Prefect flow `idlm-full` runs stages (no stage tracks these keys)."""

    retries: Annotated[int, Field(ge=0)] = 0
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 30.0
    stage_retries: dict[str, Annotated[int, Field(ge=0)]] = {}
    artifact_max_bytes: Annotated[int, Field(ge=0)] = 8 << 20
    # After a successful run: `dvc push` and dvc.lock + params.yaml committed as branch
    # idlm-runs/<run name> (idlm.orchestration.storage). Needs a default DVC remote.
    push: bool = False
    # Environment variables to fill from Prefect Secret blocks when unset, e.g.
    # {AWS_SECRET_ACCESS_KEY: idlm-s3-secret, HF_TOKEN: hf-token}: block names, never values.
    secrets: dict[str, Annotated[str, Field(min_length=1)]] = {}

    def retries_for(self, stage: str) -> int:
        return self.stage_retries.get(stage, self.retries)


# ---------------------------------------------------------------- root
class Config(Section):
    profile: Annotated[str, Field(min_length=1)] = "tiny"
    seed: Annotated[int, Field(ge=0)] = 0
    outputs: Annotated[str, Field(min_length=1)] = DEFAULT_OUTPUTS
    cluster: ClusterConfig = ClusterConfig()
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    base: BaseConfig = BaseConfig()
    ic: ICConfig = ICConfig()
    lora: LoraSection = LoraSection()
    verify: VerifySection = VerifySection()
    evaluate: EvaluateSection = EvaluateSection()
    export: ExportSection = ExportSection()
    gate: GateSection = GateSection()
    flow: FlowConfig = FlowConfig()

    @model_validator(mode="after")
    def _base_needs_training(self) -> Config:
        if self.model.kind == "tiny" and self.base.train is None:
            raise ValueError("base.train is required when model.kind is 'tiny'")
        if self.model.kind == "pretrained" and not self.model.name_or_path:
            raise ValueError("model.name_or_path is required when model.kind is 'pretrained'")
        hidden = self.model.tiny.hidden_size
        if self.model.kind == "tiny" and self.lora.rank > hidden:
            # A rank above the layer width adds parameters and no expressiveness.
            raise ValueError(f"key 'lora.rank': {self.lora.rank} exceeds model.tiny.hidden_size "
                             f"{hidden}; allowed: 1..{hidden}")
        if self.verify.stride not in self.verify.strides:
            raise ValueError(f"key 'verify.stride': {self.verify.stride} is not one of "
                             f"verify.strides {self.verify.strides}; allowed: one of them")
        return self

    def out(self, *parts: str) -> Path:
        """Path under the outputs folder (relative paths are taken from the repo root)."""
        root = Path(self.outputs)
        if not root.is_absolute():
            root = workspace() / root
        return root.joinpath(*parts)
