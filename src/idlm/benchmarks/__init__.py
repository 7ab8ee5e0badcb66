"""The 15-benchmark suite (plus the tiny profile's held-out sets): one module per benchmark
under ``suite/``, one registry, shared scorers, a sandbox for code, backends and a runner.

    from idlm.benchmarks import get_benchmark
    bench = get_benchmark("gsm8k")
    samples = bench.load(path="tests/fixtures/benchmarks/gsm8k.jsonl")
    bench.score("... #### 18", samples[0]).correct
"""

from idlm.benchmarks.base import Benchmark, Sample, Verdict
from idlm.benchmarks.loading import DataSource
from idlm.benchmarks.registry import (
    benchmark_class,
    benchmark_names,
    get_benchmark,
    register,
    suite_names,
)
from idlm.benchmarks.settings import with_tiny_items

__all__ = [
    "Benchmark",
    "DataSource",
    "Sample",
    "Verdict",
    "benchmark_class",
    "benchmark_names",
    "get_benchmark",
    "register",
    "suite_names",
    "with_tiny_items",
]
