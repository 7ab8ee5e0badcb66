"""Evaluation settings: plain frozen dataclasses, built from the config's ``evaluate`` section.

Defaults are the paper's: thinking mode on, T=1.0, top-p 0.95, top-k 50. ``from_mapping``
takes the pydantic section's ``model_dump()`` so config.py owns validation and the library
stays importable without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

# The paper's eval scripts default to 8192 new tokens (their README example uses 32768).
DEFAULT_MAX_NEW_TOKENS = 8192


@dataclass(frozen=True)
class SamplingSettings:
    """How every system samples. ``temperature`` 0 is greedy; ``top_k`` 0 disables it."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 50
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class SandboxSettings:
    """Limits for one code candidate (see ``idlm.benchmarks.sandbox``)."""

    timeout_s: float = 10.0
    memory_mb: int = 2048
    max_processes: int = 32
    max_file_mb: int = 16
    tmpfs_mb: int = 64
    workers: int = 2
    # Code benchmarks refuse to run without namespaces unless this is set on purpose.
    allow_unsandboxed: bool = False


@dataclass(frozen=True)
class BenchmarkSettings:
    """Per-benchmark overrides: a local file or folder instead of the hub, a revision, ..."""

    path: str | None = None
    revision: str | None = None
    limit: int | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class EvaluateSettings:
    """One evaluation: which benchmarks, how prompts are built and how systems sample."""

    benchmarks: tuple[str, ...] = ()
    thinking: bool = True
    sampling: SamplingSettings = SamplingSettings()
    sandbox: SandboxSettings = SandboxSettings()
    limit: int | None = None
    batch_size: int = 32
    overrides: Mapping[str, BenchmarkSettings] = field(default_factory=dict)

    def for_benchmark(self, name: str) -> BenchmarkSettings:
        """The overrides of ``name`` with the suite-wide ``limit`` filled in."""
        own = self.overrides.get(name, BenchmarkSettings())
        return own if own.limit is not None else replace(own, limit=self.limit)

    def sampling_for(self, name: str, default_max_new_tokens: int | None = None
                     ) -> SamplingSettings:
        """Sampling for ``name``: its own token budget if set, else the benchmark's default
        (capped by the suite's budget), else the suite's."""
        own = self.overrides.get(name, BenchmarkSettings()).max_new_tokens
        if own is not None:
            return replace(self.sampling, max_new_tokens=own)
        if default_max_new_tokens is not None:
            budget = min(default_max_new_tokens, self.sampling.max_new_tokens)
            return replace(self.sampling, max_new_tokens=budget)
        return self.sampling

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> EvaluateSettings:
        """Build from a plain mapping (e.g. the pydantic ``evaluate`` section's dump)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown evaluate keys {unknown}; known: {sorted(known)}")
        values = dict(data)
        values["benchmarks"] = tuple(values.get("benchmarks", ()))
        values["sampling"] = _build(SamplingSettings, values.get("sampling"))
        values["sandbox"] = _build(SandboxSettings, values.get("sandbox"))
        values["overrides"] = {name: _build(BenchmarkSettings, spec)
                               for name, spec in (values.get("overrides") or {}).items()}
        return cls(**values)


def _build(kind: type, data: Any) -> Any:
    if data is None:
        return kind()
    if isinstance(data, kind):
        return data
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys {unknown}; known: {sorted(known)}")
    return kind(**data)


def with_tiny_items(settings: EvaluateSettings, eval_items_path: str) -> EvaluateSettings:
    """Point every ``tiny_*`` benchmark without its own path at prepare's eval_items.jsonl."""
    overrides = dict(settings.overrides)
    for name in settings.benchmarks:
        if name.startswith("tiny_") and name != "tiny_humaneval":
            own = overrides.get(name, BenchmarkSettings())
            if own.path is None:
                overrides[name] = replace(own, path=eval_items_path)
    return replace(settings, overrides=overrides)
