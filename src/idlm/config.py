"""Typed configuration: one schema for every profile and stage.

A profile is a YAML file under ``configs/`` (``tiny``, ``qwen3-8b``, ``qwen3-32b``).
``params.yaml`` at the repo root is the *active, fully resolved* config: DVC tracks
its sections as stage params (so ``dvc exp run -S ic.lr=...`` edits it), and
``idlm config use PROFILE [key=value ...]`` rewrites it from a profile.

Only pydantic and yaml are imported here, so validation fails fast (well under
2 s) with one line naming the file, the key and what was expected.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def workspace() -> Path:
    """The project checkout we act on: $IDLM_WORKSPACE, else the nearest folder (from the
    current directory up) holding dvc.yaml, else the checkout this package came from.
    DVC runs stage commands from the folder of dvc.yaml, so stages find it either way."""
    if os.environ.get("IDLM_WORKSPACE"):
        return Path(os.environ["IDLM_WORKSPACE"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "configs").is_dir():
            return folder
    return PACKAGE_ROOT


def config_dir() -> Path:
    return workspace() / "configs"


def active_config() -> Path:
    return workspace() / "params.yaml"


STAGES = ("prepare", "base", "ic", "lora", "verify", "evaluate", "export", "gate")


class ConfigError(ValueError):
    """A config problem, already phrased as one line for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- prepare
class SyntheticData(Section):
    """The tiny profile's generated corpus (see idlm.data.synthetic)."""

    train_size: Annotated[int, Field(gt=0)] = 40_000
    eval_size: Annotated[int, Field(gt=0)] = 400
    mix: dict[Literal["arithmetic", "multiple_choice", "code", "instruction"], float] = {
        "arithmetic": 0.55,
        "multiple_choice": 0.15,
        "code": 0.15,
        "instruction": 0.15,
    }


class HubData(Section):
    """An SFT dataset of chat ``messages`` rows: hub id + pinned revision, or a local path."""

    name_or_path: str = ""
    revision: str | None = None
    split: str = "train"
    messages_field: str = "messages"
    eval_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.01
    max_rows: int | None = None


class TokenizerSpec(Section):
    """``train``: byte-level BPE trained on the corpus; ``pretrained``: the base model's."""

    kind: Literal["train", "pretrained"] = "train"
    vocab_size: Annotated[int, Field(gt=0)] = 2048
    name_or_path: str = ""
    revision: str | None = None
    mask_token: str = "<|MASK|>"


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

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 1024
    rope_theta: float = 10_000.0
    tie_word_embeddings: bool = True


class ModelConfig(Section):
    """``tiny``: built from ``tiny`` and AR-pretrained by ``base``; ``pretrained``: resolved."""

    kind: Literal["tiny", "pretrained"] = "tiny"
    name_or_path: str = ""
    revision: str | None = None
    tiny: TinyArchitecture = TinyArchitecture()
    # Qwen3's <|MASK|> row 151669 already exists in its padded embedding.
    mask_token_id: int | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    attention: Literal["auto", "sdpa", "flex"] = "auto"


class Optimisation(Section):
    """One training run: DeepSpeed engine, AdamW, warmup + cosine."""

    deepspeed: str = "configs/deepspeed/zero0.json"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    micro_batch_size: Annotated[int, Field(gt=0)] = 32
    grad_accum: Annotated[int, Field(gt=0)] = 1
    steps: Annotated[int, Field(gt=0)] | None = 600
    epochs: Annotated[float, Field(gt=0)] | None = None
    bf16: bool = False
    checkpoint_every: Annotated[int, Field(gt=0)] = 100
    log_every: Annotated[int, Field(gt=0)] = 10
    seed: int = 0

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> Optimisation:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of 'steps' or 'epochs'")
        return self


class BaseConfig(Section):
    """Tiny: the AR-pretraining run. Pretrained models are only resolved and pinned."""

    train: Optimisation | None = None


# ---------------------------------------------------------------- ic
class Phase(Section):
    """One curriculum phase: stride N (B = N-1 MASKs per block) and its run."""

    stride: Annotated[int, Field(ge=2, le=4)]
    alpha: float | Literal["auto"] = 0.2
    train: Optimisation = Optimisation()


class ICConfig(Section):
    phases: list[Phase] = [Phase(stride=2), Phase(stride=3, alpha="auto")]
    random_block_offset: bool = True

    @model_validator(mode="after")
    def _phases(self) -> ICConfig:
        if not self.phases:
            raise ValueError("at least one curriculum phase is needed")
        return self


# ---------------------------------------------------------------- lora
class LoraSection(Section):
    """Gated LoRA on the frozen base: the delta is on at MASK rows only."""

    rank: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    targets: list[str] | Literal["all-linear"] = "all-linear"
    stride: Annotated[int, Field(ge=2, le=8)] = 3
    train: Optimisation = Optimisation(lr=2e-3, steps=300)


# ---------------------------------------------------------------- verify
class Exactness(Section):
    """The T > 0 check: sampled continuations vs the exact AR law (chi-square GOF)."""

    prompts: Annotated[int, Field(gt=0)] = 4
    samples: Annotated[int, Field(gt=0)] = 2000
    continuation: Annotated[int, Field(gt=0, le=8)] = 4
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    significance: Annotated[float, Field(gt=0, lt=1)] = 0.01


class VerifySection(Section):
    """Lossless R-ISD / ISD vs AR greedy, exactness at T > 0, TPF and acceptance per stride."""

    prompts: Annotated[int, Field(gt=0)] = 200
    max_new_tokens: Annotated[int, Field(gt=0)] = 64
    stride: Annotated[int, Field(ge=2, le=8)] = 4
    strides: list[Annotated[int, Field(ge=2, le=8)]] = [2, 3, 4]
    max_batch_size: Annotated[int, Field(gt=0)] = 64
    # Compare against transformers' generate too (slow on big models: it has no batching
    # of ragged prompts here, one prompt at a time).
    compare_transformers: bool = True
    exactness: Exactness = Exactness()


# ---------------------------------------------------------------- evaluate
class EvalSampling(Section):
    """The paper's sampling: T=1.0, top-p 0.95, top-k 50 (temperature 0 is greedy)."""

    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 50
    max_new_tokens: Annotated[int, Field(gt=0)] = 8192
    seed: int = 0


class EvalSandbox(Section):
    """Limits for one code candidate; code benchmarks refuse to run unsandboxed unless
    ``allow_unsandboxed`` is set on purpose."""

    timeout_s: Annotated[float, Field(gt=0)] = 10.0
    memory_mb: Annotated[int, Field(gt=0)] = 2048
    max_processes: Annotated[int, Field(gt=0)] = 32
    max_file_mb: Annotated[int, Field(gt=0)] = 16
    tmpfs_mb: Annotated[int, Field(gt=0)] = 64
    workers: Annotated[int, Field(gt=0)] = 2
    allow_unsandboxed: bool = False


class EvalOverride(Section):
    """One benchmark's own data (local file/folder or hub revision), limit or budget."""

    path: str | None = None
    revision: str | None = None
    limit: Annotated[int, Field(gt=0)] | None = None
    max_new_tokens: Annotated[int, Field(gt=0)] | None = None


class EvalEndpoint(Section):
    """An OpenAI-compatible server (an SGLang server of an exported bundle, `idlm serve`)
    that answers for one system instead of the in-process engine."""

    url: str
    model: str = "default"
    concurrency: Annotated[int, Field(gt=0)] = 64
    timeout_s: Annotated[float, Field(gt=0)] = 3600.0
    retries: Annotated[int, Field(ge=0)] = 3


class EvaluateSection(Section):
    """Benchmarks for the three systems: AR base, I-DLM (ISD) and R-ISD."""

    benchmarks: list[str] = ["arc_challenge", "mmlu", "mmlu_pro", "gpqa_diamond", "gpqa_main",
                             "gsm8k", "math500", "mathbench", "aime24", "aime25", "humaneval",
                             "mbpp", "livecodebench_v6", "ifeval", "humaneval_plus"]
    systems: list[Literal["ar", "isd", "risd"]] = ["ar", "isd", "risd"]
    stride: Annotated[int, Field(ge=2, le=8)] = 4
    thinking: bool = True
    sampling: EvalSampling = EvalSampling()
    sandbox: EvalSandbox = EvalSandbox()
    limit: Annotated[int, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(gt=0)] = 32
    overrides: dict[str, EvalOverride] = {}
    # Systems served elsewhere (e.g. `risd: {url: http://gpu-node:30000}`); the rest run
    # in process. Each server must already serve that system's model and decoding mode.
    endpoints: dict[Literal["ar", "isd", "risd"], EvalEndpoint] = {}


# ---------------------------------------------------------------- export
class ExportRegistry(Section):
    """Registered model names in MLflow's registry (one per served system)."""

    isd: str = "idlm-isd"
    risd: str = "idlm-risd"
    enabled: bool = True
    # Copy the bundle files into the registry's artifact store; off: the version points
    # at the bundle folder (a shared filesystem), for weights too big to store twice.
    upload: bool = True


class ExportSection(Section):
    """SGLang-servable bundles: I-DLM (ISD, full IC weights) and R-ISD (base reference +
    gated adapter), each with a sha256 manifest, algorithm config and launch command."""

    stride: Annotated[int, Field(ge=2, le=8)] = 4
    # Draft proposals: `sample` from q (exact at T > 0) or `argmax` of q (faster, inexact).
    proposal: Literal["sample", "argmax"] = "sample"
    seed: int = 0
    max_running_requests: Annotated[int, Field(gt=0)] = 64
    attention_backend: Literal["flashinfer", "triton"] = "flashinfer"
    extra_server_args: list[str] = []
    # Load each bundle back (transformers + our engine) and check its greedy output on
    # these many held-out prompts equals the source model's (0: hashes only).
    check_prompts: Annotated[int, Field(ge=0)] = 4
    check_new_tokens: Annotated[int, Field(gt=0)] = 16
    registry: ExportRegistry = ExportRegistry()


# ---------------------------------------------------------------- gate
class GateArm(Section):
    """Where one arm is served. Without ``url`` the gate starts ``idlm serve`` on a free
    port (default folders: ar = base model, isd = IC model, risd = base model + adapter);
    with ``url`` it loads an external OpenAI-compatible server (e.g. SGLang) instead."""

    url: str | None = None
    model: str | None = None
    adapter: str | None = None


class GateSection(Section):
    """Load test of I-DLM (ISD) and R-ISD against the AR base; promotes only on pass."""

    arms: dict[Literal["ar", "isd", "risd"], GateArm] = {
        "ar": GateArm(), "isd": GateArm(), "risd": GateArm()}
    concurrencies: list[Annotated[int, Field(gt=0)]] = [1, 4, 16, 64]
    repeats: Annotated[int, Field(gt=0)] = 3
    # Requests per level: max(min_requests, requests_per_stream x concurrency).
    min_requests: Annotated[int, Field(gt=0)] = 8
    requests_per_stream: Annotated[int, Field(gt=0)] = 2
    max_seconds_per_level: Annotated[float, Field(gt=0)] | None = None
    # Prompts: a JSONL file with a `prompt` field per row, or synthetic text of
    # `prompt_tokens` tokens. Every request asks for exactly `output_tokens` tokens.
    prompt_file: str | None = None
    prompt_tokens: Annotated[int, Field(gt=0)] = 128
    output_tokens: Annotated[int, Field(gt=0)] = 256
    request_format: Literal["/v1/chat/completions", "/v1/completions"] = "/v1/chat/completions"
    temperature: Annotated[float, Field(ge=0)] = 0.0
    stride: Annotated[int, Field(ge=2, le=8)] = 4
    server_args: list[str] = []  # extra `idlm serve` flags, the same for every arm
    # CPU threads per spawned server (OMP_NUM_THREADS); on a small shared CPU, 1 avoids
    # the stalls of busy-waiting OpenMP threads competing with the load generator.
    server_threads: Annotated[int, Field(gt=0)] | None = None
    generator_workers: Annotated[int, Field(gt=0)] | None = None  # guidellm processes
    tokenizer: str | None = None  # what the load generator counts tokens with (default: ar model)
    startup_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    # Minimum per-request tok/s speedup over AR, per arm and concurrency (levels not
    # listed are measured, not gated). Paper, I-DLM-8B on one H100: 2.30x at C=1, 1.34x at C=64.
    min_speedup: dict[Literal["isd", "risd"], dict[int, Annotated[float, Field(gt=0)]]] = {
        "isd": {1: 2.30, 64: 1.34}}
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    # Largest allowed score drop against AR, in points (scores are percent), per benchmark.
    max_quality_drop: Annotated[float, Field(ge=0)] = 5.0
    quality_drop_overrides: dict[str, Annotated[float, Field(ge=0)]] = {}
    alias: str = "champion"

    @model_validator(mode="after")
    def _baseline_and_levels(self) -> GateSection:
        if "ar" not in self.arms:
            raise ValueError("gate.arms needs 'ar': speedups are measured against the AR base")
        for arm, levels in self.min_speedup.items():
            unknown = sorted(set(levels) - set(self.concurrencies))
            if unknown:
                raise ValueError(f"gate.min_speedup.{arm} names concurrency {unknown[0]}, "
                                 f"which is not in gate.concurrencies {self.concurrencies}")
        return self


# ---------------------------------------------------------------- flow
class FlowConfig(Section):
    """How the Prefect flow `idlm-full` runs stages (no stage tracks these keys)."""

    retries: Annotated[int, Field(ge=0)] = 0
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 30.0
    stage_retries: dict[str, Annotated[int, Field(ge=0)]] = {}
    artifact_max_bytes: Annotated[int, Field(ge=0)] = 8 << 20


# ---------------------------------------------------------------- root
class Config(Section):
    profile: str = "tiny"
    seed: int = 0
    outputs: str = "outputs"
    # How dvc.yaml starts the training stages: `python` (one process) or a DeepSpeed
    # launcher, e.g. `deepspeed --num_gpus 8` or `deepspeed --hostfile infra/hostfile`.
    launcher: str = "python"
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
        return self

    def out(self, *parts: str) -> Path:
        """Path under the outputs folder (relative paths are taken from the repo root)."""
        root = Path(self.outputs)
        if not root.is_absolute():
            root = workspace() / root
        return root.joinpath(*parts)


# ---------------------------------------------------------------- loading
def _describe_error(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}' (check the spelling against configs/tiny.yaml)"
    if kind == "missing":
        return f"missing key '{key}'"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    return f"key '{key}': {err['msg'].lower()} (got {shown})"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (profiles live in {config_dir()})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. ic.phases.0.train.lr=1e-4")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for k in keys[:-1]:
            if isinstance(node, list):
                node = node[int(k)]
            else:
                node = node.setdefault(k, {})
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value
    return data


def validate(data: dict[str, Any], source: str | Path) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe_error(exc.errors()[0])}") from None


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load the active config (``params.yaml``) or any config file, with overrides."""
    path = Path(path) if path else active_config()
    data = apply_overrides(_read_yaml(path), overrides or [])
    cfg = validate(data, path)
    check_files(cfg, path)
    return cfg


def load_profile(profile: str, overrides: list[str] | None = None) -> Config:
    path = config_dir() / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in config_dir().glob("*.yaml")))
        raise ConfigError(f"{path}: no such profile '{profile}' (known: {known})")
    return load(path, overrides)


def check_files(cfg: Config, source: str | Path) -> None:
    """Files the config names must exist before any heavy work starts."""
    ds_files = [("base.train.deepspeed", cfg.base.train.deepspeed)] if cfg.base.train else []
    ds_files += [(f"ic.phases.{i}.train.deepspeed", phase.train.deepspeed)
                 for i, phase in enumerate(cfg.ic.phases)]
    ds_files.append(("lora.train.deepspeed", cfg.lora.train.deepspeed))
    for key, rel in ds_files:
        if not resolve_path(rel).is_file():
            raise ConfigError(f"{source}: key '{key}': file '{rel}' not found")
    for key, value in (("model.name_or_path", cfg.model.name_or_path),
                       ("prepare.dataset.name_or_path", cfg.prepare.dataset.name_or_path)):
        if looks_local(value) and not resolve_path(value).exists():
            raise ConfigError(f"{source}: key '{key}': path '{value}' not found")


def looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


def resolve_path(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else workspace() / path


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def write_active(cfg: Config, path: Path | None = None) -> Path:
    path = path or active_config()
    header = f"# Active config, resolved from configs/{cfg.profile}.yaml by `idlm config use`.\n"
    header += "# DVC tracks its sections as stage params: `dvc exp run -S key=value` edits them.\n"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + dump(cfg))
    tmp.replace(path)
    return path
