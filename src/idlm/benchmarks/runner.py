"""Run benchmarks against systems: per-sample JSONL logs, resume, scores.

Layout under ``out_dir``::

    samples/<system>/<benchmark>.jsonl   one header line, then one line per finished sample
    scores.json, scores.md, scores.png   written by ``report.write_reports``

Each chunk of ``batch_size`` samples is generated, scored and appended (flushed and
fsynced) before the next starts, so a killed run loses at most one chunk. On restart the
log is read back, a torn last line is cut off, and only samples without a finished line
are generated again. Samples whose generation failed (backend error) are retried. A log
written under different settings (sampling, thinking, data) is set aside, not mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from idlm.benchmarks.backends import Backend, Completion, sample_seed
from idlm.benchmarks.base import Benchmark, Sample, Verdict
from idlm.benchmarks.loading import BenchmarkDataError
from idlm.benchmarks.registry import get_benchmark
from idlm.config.downstream import EvalSampling, EvaluateSection

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


@dataclass
class BenchmarkResult:
    """One system on one benchmark."""

    system: str
    benchmark: str
    title: str
    category: str
    samples: int
    correct: int
    errors: int
    # Answers (not backend errors) where no rule could extract an answer: a format problem
    # shows as its own number instead of hiding in a low score.
    unextracted: int
    generated: int
    resumed: int
    generation_seconds: float
    scoring_seconds: float

    @property
    def score(self) -> float:
        """Accuracy in percent (errors count as wrong)."""
        return 100.0 * self.correct / self.samples if self.samples else 0.0

    @property
    def samples_per_second(self) -> float | None:
        """Generation throughput of this run's newly generated samples."""
        if not self.generated or self.generation_seconds <= 0:
            return None
        return self.generated / self.generation_seconds

    @property
    def unextracted_share(self) -> float:
        """Percent of the answered samples where nothing could be extracted."""
        answered = self.samples - self.errors
        return 100.0 * self.unextracted / answered if answered else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": round(self.score, 2),
                "unextracted_share": round(self.unextracted_share, 2),
                "samples_per_second": self.samples_per_second}


# ---------------------------------------------------------------- the log
def log_path(out_dir: Path, system: str, benchmark: str) -> Path:
    return out_dir / "samples" / system / f"{benchmark}.jsonl"


def fingerprint(system: str, benchmark: Benchmark, sampling: EvalSampling, thinking: bool,
                data: Mapping[str, Any], backend_identity: Mapping[str, Any] | None = None
                ) -> str:
    """What makes two runs' samples comparable; a change starts the log afresh."""
    payload = {"system": system, "benchmark": benchmark.name, "sampling": sampling.model_dump(),
               "thinking": thinking, "source": benchmark.source.describe(), "data": dict(data),
               "backend": dict(backend_identity or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_log(path: Path, expected_fingerprint: str, log: Log = _stderr
             ) -> dict[str, dict[str, Any]]:
    """Finished records by sample id; repairs a torn tail and sets aside a stale log."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    if good_end < len(raw):  # killed mid-write: drop the partial last line
        with path.open("r+b") as handle:
            handle.truncate(good_end)
        log(f"{path}: cut a torn last line ({len(raw) - good_end} bytes)")
    lines = raw[:good_end].decode("utf-8").splitlines()
    if not lines:
        return {}
    header = json.loads(lines[0]).get("header", {})
    if header.get("fingerprint") != expected_fingerprint:
        stale = path.with_name(path.name + ".stale")
        os.replace(path, stale)
        log(f"{path}: written under other settings; moved to {stale.name}, starting afresh")
        return {}
    records = (json.loads(line) for line in lines[1:] if line.strip())
    return {record["id"]: record for record in records if record.get("error") is None}


def _append(path: Path, lines: list[dict[str, Any]], header: dict[str, Any] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.is_file() or path.stat().st_size == 0
    with path.open("a", encoding="utf-8") as handle:
        if new_file and header is not None:
            handle.write(json.dumps({"header": header}, sort_keys=True) + "\n")
        for line in lines:
            handle.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _record(system: str, benchmark: Benchmark, sample: Sample, seed: int,
            completion: Completion, verdict: Verdict | None) -> dict[str, Any]:
    return {"id": sample.id, "benchmark": benchmark.name, "system": system,
            "messages": sample.messages, "prompt_text": completion.prompt_text,
            "output": completion.text, "finish_reason": completion.finish_reason,
            "completion_tokens": completion.completion_tokens, "error": completion.error,
            "seed": seed, "extracted": verdict.extracted if verdict else None,
            "rule": verdict.rule if verdict else None,
            "correct": bool(verdict.correct) if verdict else False,
            "detail": verdict.detail if verdict else completion.error, "stats": completion.stats}


def nothing_extracted(record: dict[str, Any]) -> bool:
    """Whether a finished record's answer gave the scorer nothing to read. Records logged
    before rules were recorded say so by an empty ``extracted``."""
    if "rule" in record:
        return record["rule"] is None
    return record.get("extracted") in (None, "")


# ---------------------------------------------------------------- one benchmark
def _score_all(benchmark: Benchmark, samples: Sequence[Sample],
               completions: Sequence[Completion], workers: int) -> list[Verdict | None]:
    def score(pair: tuple[Sample, Completion]) -> Verdict | None:
        sample, completion = pair
        return None if completion.error else benchmark.score(completion.text, sample)

    pairs = list(zip(samples, completions, strict=True))
    if benchmark.category == "code" and workers > 1:
        # Sandboxed runs are subprocesses: threads overlap them. Other scorers stay in the
        # main thread, where math-verify's signal-based timeouts work.
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(score, pairs))
    return [score(pair) for pair in pairs]


def evaluate_benchmark(system: str, backend: Backend, benchmark: Benchmark,
                       samples: Sequence[Sample], path: Path, sampling: EvalSampling,
                       batch_size: int, run_fingerprint: str, scoring_workers: int = 1,
                       thinking: bool | None = None, log: Log = _stderr) -> BenchmarkResult:
    """Generate and score the samples of ``benchmark`` not yet in the log at ``path``."""
    done = read_log(path, run_fingerprint, log)
    wanted = {sample.id for sample in samples}
    todo = [sample for sample in samples if sample.id not in done]
    resumed = len(wanted & set(done))
    if resumed:
        log(f"{system}/{benchmark.name}: resuming, {resumed} of {len(samples)} already done")
    header = {"system": system, "benchmark": benchmark.name, "fingerprint": run_fingerprint,
              "sampling": sampling.model_dump()}
    generation_seconds = scoring_seconds = 0.0
    for start in range(0, len(todo), max(1, batch_size)):
        chunk = todo[start:start + batch_size]
        seeds = [sample_seed(sampling.seed, benchmark.name, sample.id) for sample in chunk]
        began = time.perf_counter()
        completions = backend.generate([s.messages for s in chunk], sampling, seeds, thinking)
        generation_seconds += time.perf_counter() - began
        began = time.perf_counter()
        verdicts = _score_all(benchmark, chunk, completions, scoring_workers)
        scoring_seconds += time.perf_counter() - began
        records = [_record(system, benchmark, sample, seed, completion, verdict)
                   for sample, seed, completion, verdict
                   in zip(chunk, seeds, completions, verdicts, strict=True)]
        _append(path, records, header)
        done.update({r["id"]: r for r in records if r["error"] is None})
        finished = len(wanted & set(done))
        log(f"{system}/{benchmark.name}: {finished}/{len(samples)} done, "
            f"{generation_seconds:.1f}s generating, {scoring_seconds:.1f}s scoring")
    final = [done[sample.id] for sample in samples if sample.id in done]
    return BenchmarkResult(system, benchmark.name, benchmark.title, benchmark.category,
                           samples=len(samples), correct=sum(r["correct"] for r in final),
                           errors=len(samples) - len(final),
                           unextracted=sum(nothing_extracted(r) for r in final),
                           generated=len(todo),
                           resumed=resumed, generation_seconds=round(generation_seconds, 3),
                           scoring_seconds=round(scoring_seconds, 3))


# ---------------------------------------------------------------- the suite
def prepare_benchmark(name: str, settings: EvaluateSection) -> tuple[Benchmark, list[Sample]]:
    """The benchmark and its samples (override path, revision and limit applied)."""
    benchmark = get_benchmark(name, settings.sandbox)
    own = settings.for_benchmark(name)
    if benchmark.category == "code":
        from idlm.benchmarks.sandbox import check_allowed

        check_allowed(settings.sandbox)  # refuse before any expensive generation
    samples = benchmark.load(own.path, own.revision, own.limit)
    return benchmark, samples


Suite = list[tuple[Benchmark, list[Sample]]]


def load_suite(settings: EvaluateSection) -> Suite:
    """Every configured benchmark with its samples, read before any model is loaded; a
    benchmark with no samples is refused (it would score 0% of nothing and log nothing)."""
    suite: Suite = []
    for name in settings.benchmarks:
        benchmark, samples = prepare_benchmark(name, settings)
        if not samples:
            where = settings.for_benchmark(name).path or benchmark.source.describe()
            raise BenchmarkDataError(f"{name}: no samples in {where}{benchmark.empty_hint()}")
        suite.append((benchmark, samples))
    return suite


def run_evaluation(systems: Mapping[str, Backend], settings: EvaluateSection, out_dir: Path,
                   log: Log = _stderr, suite: Suite | None = None) -> list[BenchmarkResult]:
    """Every configured benchmark (``suite``, or loaded now) for every system; returns one
    result per pair."""
    results: list[BenchmarkResult] = []
    for benchmark, samples in load_suite(settings) if suite is None else suite:
        name = benchmark.name
        own = settings.for_benchmark(name)
        sampling = settings.sampling_for(name, benchmark.default_max_new_tokens)
        data = {"path": own.path, "revision": own.revision}
        log(f"{name}: {len(samples)} samples from {own.path or benchmark.source.describe()}")
        for system, backend in systems.items():
            run_fingerprint = fingerprint(system, benchmark, sampling, settings.thinking, data,
                                          getattr(backend, "identity", None))
            result = evaluate_benchmark(system, backend, benchmark, samples,
                                        log_path(out_dir, system, name), sampling,
                                        settings.batch_size, run_fingerprint,
                                        settings.sandbox.workers, settings.thinking, log)
            log(f"{system}/{name}: {result.score:.1f}% of {result.samples} "
                f"({result.errors} errors, nothing extracted from {result.unextracted})")
            results.append(result)
    return results
