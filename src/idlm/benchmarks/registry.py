"""The benchmark registry: one module per benchmark, each registering its class by name.

Modules are imported on first use, so ``--help`` and config validation stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from idlm.benchmarks.base import Benchmark
from idlm.config.downstream import EvalSandbox

# The paper's 14 benchmarks plus HumanEval+ (our 15th), in the paper's table order.
REAL_SUITE: tuple[str, ...] = (
    "arc_challenge", "mmlu", "mmlu_pro", "gpqa_diamond", "gpqa_main", "gsm8k", "math500",
    "mathbench", "aime24", "aime25", "humaneval", "mbpp", "livecodebench_v6", "ifeval",
    "humaneval_plus",
)
# The tiny profile: its generated held-out sets (same formats, same scorers) + HumanEval.
TINY_SUITE: tuple[str, ...] = (
    "tiny_arithmetic", "tiny_multiple_choice", "tiny_code", "tiny_instruction",
    "tiny_humaneval",
)
_MODULES = {name: name for name in REAL_SUITE} | {name: "tiny" for name in TINY_SUITE}

_REGISTRY: dict[str, type[Benchmark]] = {}


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: make ``cls`` findable under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"benchmark name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def benchmark_names() -> tuple[str, ...]:
    """Every known benchmark: the real suite, then the tiny one."""
    return REAL_SUITE + TINY_SUITE


def benchmark_class(name: str) -> type[Benchmark]:
    if name not in _MODULES:
        raise KeyError(f"unknown benchmark '{name}'; known: {', '.join(benchmark_names())}")
    if name not in _REGISTRY:
        importlib.import_module(f"idlm.benchmarks.suite.{_MODULES[name]}")
    return _REGISTRY[name]


def get_benchmark(name: str, sandbox: EvalSandbox | None = None) -> Benchmark:
    """A ready benchmark; code benchmarks run candidates under ``sandbox``'s limits."""
    return benchmark_class(name)(sandbox)


def all_benchmarks(sandbox: EvalSandbox | None = None,
                   keep: Callable[[str], bool] = lambda _name: True) -> list[Benchmark]:
    return [get_benchmark(name, sandbox) for name in benchmark_names() if keep(name)]
