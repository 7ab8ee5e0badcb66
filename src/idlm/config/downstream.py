"""Config sections of the stages after training: verify, evaluate, export and gate.

Split from :mod:`idlm.config.schema` (which assembles the whole schema) along the
pipeline's seam: training on one side, checking, serving and promotion on the other.
Like it, this imports only pydantic.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from idlm.config.sections import Section
from idlm.systems import SYSTEMS, System


# ---------------------------------------------------------------- verify
class Exactness(Section):
    """The T > 0 check: sampled continuations vs the exact AR law (chi-square GOF)."""

    prompts: Annotated[int, Field(gt=0)] = 4
    samples: Annotated[int, Field(gt=0)] = 2000
    # Tokens per sample; None: 2N+1 at verify.stride, the shortest continuation whose last
    # window verifies drafts a full window made (the steady state, not just cold starts).
    continuation: Annotated[int, Field(gt=0, le=33)] | None = None
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    significance: Annotated[float, Field(gt=0, lt=1)] = 0.01
    # Rows decoded together. The samples of a prompt share its prefill and are a few tokens
    # long, so more rows than verify's batch pay (the tiny exactness checks: 11 s -> 9 s
    # each at 256); every sample keeps its own seed, so the verdict does not depend on it.
    max_batch_size: Annotated[int, Field(gt=0)] = 256


class VerifySection(Section):
    """Lossless R-ISD / ISD vs AR greedy, exactness at T > 0, TPF and acceptance per stride."""

    prompts: Annotated[int, Field(gt=0)] = 200
    max_new_tokens: Annotated[int, Field(gt=0)] = 64
    stride: Annotated[int, Field(ge=2, le=16)] = 4
    strides: list[Annotated[int, Field(ge=2, le=16)]] = [2, 3, 4]
    max_batch_size: Annotated[int, Field(gt=0)] = 64
    # Compare against transformers too: what its greedy generate would emit, read from one
    # teacher-forced forward per sequence (idlm.decoding.verify.transformers_divergences).
    compare_transformers: bool = True
    exactness: Exactness = Exactness()


# ---------------------------------------------------------------- evaluate
class EvalSampling(Section):
    """The paper's sampling: T=1.0, top-p 0.95, top-k 50 (temperature 0 is greedy)."""

    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.95
    top_k: Annotated[int, Field(ge=0)] = 50
    max_new_tokens: Annotated[int, Field(gt=0)] = 8192
    seed: Annotated[int, Field(ge=0)] = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


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

    url: Annotated[str, Field(pattern=r"^https?://")]
    model: Annotated[str, Field(min_length=1)] = "default"
    concurrency: Annotated[int, Field(gt=0)] = 64
    timeout_s: Annotated[float, Field(gt=0)] = 3600.0
    retries: Annotated[int, Field(ge=0)] = 3


class EvaluateSection(Section):
    """Benchmarks for the three systems: AR base, I-DLM (ISD) and R-ISD."""

    # The paper's 15, in its table's order: the registry's real suite (a test keeps the two
    # equal; the registry imports this module, so it cannot be read from here).
    benchmarks: list[str] = ["arc_challenge", "mmlu", "mmlu_pro", "gpqa_diamond", "gpqa_main",
                             "gsm8k", "math500", "mathbench", "aime24", "aime25", "humaneval",
                             "mbpp", "livecodebench_v6", "ifeval", "humaneval_plus"]
    systems: list[System] = list(SYSTEMS)
    stride: Annotated[int, Field(ge=2, le=16)] = 4
    thinking: bool = True
    sampling: EvalSampling = EvalSampling()
    sandbox: EvalSandbox = EvalSandbox()
    limit: Annotated[int, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(gt=0)] = 32
    overrides: dict[str, EvalOverride] = {}
    # Systems served elsewhere (e.g. `risd: {url: http://gpu-node:30000}`); the rest run
    # in process. Each server must already serve that system's model and decoding mode.
    endpoints: dict[System, EvalEndpoint] = {}

    def for_benchmark(self, name: str) -> EvalOverride:
        """The overrides of ``name`` with the suite-wide ``limit`` filled in."""
        own = self.overrides.get(name, EvalOverride())
        return own if own.limit is not None else own.model_copy(update={"limit": self.limit})

    def sampling_for(self, name: str, default_max_new_tokens: int | None = None
                     ) -> EvalSampling:
        """Sampling for ``name``: its own token budget if set, else the benchmark's default
        (capped by the suite's budget), else the suite's."""
        own = self.overrides.get(name, EvalOverride()).max_new_tokens
        if own is not None:
            return self.sampling.model_copy(update={"max_new_tokens": own})
        if default_max_new_tokens is not None:
            budget = min(default_max_new_tokens, self.sampling.max_new_tokens)
            return self.sampling.model_copy(update={"max_new_tokens": budget})
        return self.sampling


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

    stride: Annotated[int, Field(ge=2, le=16)] = 4
    # Draft proposals: `sample` from q or `argmax` of q (verified as a one-hot proposal);
    # both are exact samplers of the AR law at T > 0.
    proposal: Literal["sample", "argmax"] = "sample"
    seed: Annotated[int, Field(ge=0)] = 0
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

    arms: dict[System, GateArm] = {
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
    stride: Annotated[int, Field(ge=2, le=16)] = 4
    server_args: list[str] = []  # extra `idlm serve` flags, the same for every arm
    # CPU threads per spawned server (OMP_NUM_THREADS); on a small shared CPU, 1 avoids
    # the stalls of busy-waiting OpenMP threads competing with the load generator.
    server_threads: Annotated[int, Field(gt=0)] | None = None
    generator_workers: Annotated[int, Field(gt=0)] | None = None  # guidellm processes
    tokenizer: str | None = None  # what the load generator counts tokens with (default: ar model)
    startup_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    # Start every `idlm serve` arm at once (their start-ups overlap) and measure them one
    # at a time once all answer. false: each arm starts when it is measured (one GPU then
    # never holds more than one arm's weights).
    start_together: bool = True
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
