"""The ``evaluate`` stage: the configured benchmarks for the AR base, I-DLM (ISD) and R-ISD.

Every system runs through the in-process engine (``idlm.decoding``), loaded exactly as the
``verify`` stage loads it. Per-sample logs go to ``outputs/evaluate/samples/<system>/
<benchmark>.jsonl`` (a DVC ``persist`` out), so a killed evaluation resumes without redoing
finished samples. Scores, a Markdown table and a bar chart follow; under greedy decoding
the stage also checks that R-ISD answered every sample exactly as the AR base did (the
adapter is gated off on clean tokens, so anything else is a bug) and fails if not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from idlm.config import Config
from idlm.config.downstream import EvaluateSection
from idlm.errors import StageError
from idlm.stage import write_json_atomic

METRICS = "metrics.json"


def settings_from(cfg: Config) -> EvaluateSection:
    """The config's evaluate section, the tiny sets pointed at prepare's held-out items."""
    from idlm.benchmarks.registry import benchmark_names
    from idlm.benchmarks.settings import with_tiny_items

    section = cfg.evaluate
    unknown = [name for name in section.benchmarks if name not in benchmark_names()]
    if unknown:
        raise StageError(f"evaluate.benchmarks: unknown {', '.join(unknown)} (known: "
                         f"{', '.join(benchmark_names())})")
    return with_tiny_items(section, str(cfg.out("prepare", "eval_items.jsonl")))


def _check_sandbox(settings: EvaluateSection) -> None:
    """Refuse code benchmarks without isolation *before* loading any model."""
    from idlm.benchmarks.registry import benchmark_class
    from idlm.benchmarks.sandbox import SandboxUnavailable, check_allowed

    if any(benchmark_class(name).category == "code" for name in settings.benchmarks):
        try:
            check_allowed(settings.sandbox)
        except SandboxUnavailable as exc:
            raise StageError(str(exc)) from None


def backends(cfg: Config, settings: EvaluateSection) -> dict[str, Any]:
    """One backend per configured system: its endpoint if configured, else the in-process
    engine on the verify stage's model folders."""
    from idlm.benchmarks.endpoint import EndpointBackend
    from idlm.benchmarks.engine_backend import engine_backend
    from idlm.decoding.requests import DecodingError
    from idlm.decoding.trained import inference_device, model_dirs

    folders = model_dirs(cfg)
    device = inference_device()
    systems: dict[str, Any] = {}
    for system in cfg.evaluate.systems:
        endpoint = cfg.evaluate.endpoints.get(system)
        if endpoint is not None:
            systems[system] = EndpointBackend(
                endpoint.url, endpoint.model, name=system, thinking=settings.thinking,
                concurrency=endpoint.concurrency, timeout_s=endpoint.timeout_s,
                retries=endpoint.retries)
            continue
        model, adapter = folders[system]
        try:
            systems[system] = engine_backend(
                model, adapter, system=system, stride=cfg.evaluate.stride,
                thinking=settings.thinking, device=device, dtype=cfg.model.dtype,
                max_batch_size=settings.batch_size)
        except DecodingError as exc:
            raise StageError(f"evaluate: cannot load the {system} system: {exc}") from None
    return systems


def run(cfg: Config) -> dict[str, Any]:
    from idlm.benchmarks.loading import BenchmarkDataError
    from idlm.benchmarks.report import scores_summary, write_reports
    from idlm.benchmarks.runner import load_suite, run_evaluation

    began = time.perf_counter()
    settings = settings_from(cfg)
    _check_sandbox(settings)
    try:
        suite = load_suite(settings)   # the data first: refused before any model loads
    except BenchmarkDataError as exc:
        raise StageError(f"evaluate: {exc}") from None
    out = cfg.out("evaluate")
    results = run_evaluation(backends(cfg, settings), settings, out, suite=suite)
    write_reports(results, out, title=f"{cfg.profile}: accuracy per benchmark")
    summary = scores_summary(results)
    metrics: dict[str, Any] = {"scores": summary["scores"],
                               "unextracted": summary["unextracted"],
                               "seconds": round(time.perf_counter() - began, 1),
                               "samples_per_second": _throughput(summary["results"])}
    if settings.sampling.greedy and {"ar", "risd"} <= set(cfg.evaluate.systems):
        metrics["risd_equals_ar"] = risd_equals_ar(out, settings.benchmarks)
    write_json_atomic(out / METRICS, metrics)
    mismatched = (metrics.get("risd_equals_ar") or {}).get("mismatched", 0)
    if mismatched:
        raise StageError(f"evaluate: under greedy decoding R-ISD answered {mismatched} "
                         f"sample(s) differently from the AR base (see {out / METRICS})")
    return metrics


def _throughput(results: list[dict[str, Any]]) -> dict[str, float | None]:
    """Samples per second of generation, per system, over the samples generated this run."""
    per_system: dict[str, list[float]] = {}
    for result in results:
        per_system.setdefault(result["system"], [0.0, 0.0])
        per_system[result["system"]][0] += result["generated"]
        per_system[result["system"]][1] += result["generation_seconds"]
    return {system: (round(done / seconds, 3) if seconds > 0 and done else None)
            for system, (done, seconds) in per_system.items()}


def risd_equals_ar(out: Path, benchmarks: tuple[str, ...]) -> dict[str, Any]:
    """Compare R-ISD's and AR's outputs sample for sample from the per-sample logs."""
    from idlm.benchmarks.runner import log_path

    compared, mismatched, examples = 0, 0, []
    for name in benchmarks:
        ar, risd = _outputs(log_path(out, "ar", name)), _outputs(log_path(out, "risd", name))
        for sample_id in sorted(set(ar) & set(risd)):
            compared += 1
            if ar[sample_id] != risd[sample_id]:
                mismatched += 1
                examples.append({"benchmark": name, "id": sample_id})
    return {"compared": compared, "mismatched": mismatched, "examples": examples[:20]}


def _outputs(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines()[1:] if line.strip())
    return {r["id"]: r["output"] for r in records if r.get("error") is None}
