"""The benchmark registry: found by scanning ``suite/``, where each module registers its
benchmark classes by name (``@register``). A new benchmark is one file there and its test.

The suite's modules are imported on first use (they are light: no dataset is read until
``load``), so ``--help`` and config validation stay fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from idlm.benchmarks.base import Benchmark
from idlm.config.downstream import EvalSandbox

SUITE_PACKAGE = "idlm.benchmarks.suite"
_REGISTRY: dict[str, type[Benchmark]] = {}
_SCANNED: list[bool] = []


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: make ``cls`` findable under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"benchmark name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _scan() -> dict[str, type[Benchmark]]:
    """Every benchmark under ``suite/`` (each module imported once)."""
    if not _SCANNED:
        package = importlib.import_module(SUITE_PACKAGE)
        for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            importlib.import_module(f"{SUITE_PACKAGE}.{module.name}")
        _SCANNED.append(True)
    return _REGISTRY


def suite_names(suite: str) -> tuple[str, ...]:
    """The benchmarks of one suite ("real": the paper's 14 plus HumanEval+, in the paper's
    table order; "tiny": the tiny profile's held-out sets and HumanEval)."""
    found = [cls for cls in _scan().values() if cls.suite == suite]
    return tuple(cls.name for cls in sorted(found, key=lambda cls: (cls.table_order, cls.name)))


def benchmark_names() -> tuple[str, ...]:
    """Every known benchmark: the real suite, then the tiny one."""
    return suite_names("real") + suite_names("tiny")


def benchmark_class(name: str) -> type[Benchmark]:
    if name not in _scan():
        raise KeyError(f"unknown benchmark '{name}'; known: {', '.join(benchmark_names())}")
    return _REGISTRY[name]


def get_benchmark(name: str, sandbox: EvalSandbox | None = None) -> Benchmark:
    """A ready benchmark; code benchmarks run candidates under ``sandbox``'s limits."""
    return benchmark_class(name)(sandbox)


def all_benchmarks(sandbox: EvalSandbox | None = None,
                   keep: Callable[[str], bool] = lambda _name: True) -> list[Benchmark]:
    return [get_benchmark(name, sandbox) for name in benchmark_names() if keep(name)]
