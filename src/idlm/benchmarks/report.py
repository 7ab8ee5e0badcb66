"""The evaluation's summary files: scores.json, a Markdown comparison table and a bar chart.

All three are written atomically (temp file + rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from idlm.benchmarks.runner import BenchmarkResult
from idlm.plots import save_figure
from idlm.stage import write_json_atomic


def _systems_and_benchmarks(results: Sequence[BenchmarkResult]
                            ) -> tuple[list[str], list[tuple[str, str]]]:
    systems = list(dict.fromkeys(r.system for r in results))
    benchmarks = list(dict.fromkeys((r.benchmark, r.title) for r in results))
    return systems, benchmarks


def scores_summary(results: Sequence[BenchmarkResult]) -> dict[str, Any]:
    """``{"scores": {system: {benchmark: percent}}, "unextracted": {system: {benchmark:
    percent of answers with nothing extracted}}, "results": [...]}`` for metrics files."""
    scores: dict[str, dict[str, float]] = {}
    unextracted: dict[str, dict[str, float]] = {}
    for result in results:
        scores.setdefault(result.system, {})[result.benchmark] = round(result.score, 2)
        unextracted.setdefault(result.system, {})[result.benchmark] = round(
            result.unextracted_share, 2)
    return {"scores": scores, "unextracted": unextracted,
            "results": [r.as_dict() for r in results]}


def _unextracted_table(results: Sequence[BenchmarkResult]) -> list[str]:
    """Per benchmark and system, the share of answers no rule could read."""
    systems, benchmarks = _systems_and_benchmarks(results)
    by_key = {(r.system, r.benchmark): r for r in results}
    lines = ["", "Answers with nothing extracted (% of answered samples; counted as wrong "
             "above):", "", "| benchmark | " + " | ".join(systems) + " |",
             "|---|" + "---:|" * len(systems)]
    for name, title in benchmarks:
        shares = [by_key.get((system, name)) for system in systems]
        lines.append(f"| {title} | " + " | ".join(
            "–" if r is None else f"{r.unextracted_share:.1f}" for r in shares) + " |")
    return lines


def scores_table(results: Sequence[BenchmarkResult]) -> str:
    """Markdown: one row per benchmark, one accuracy column per system, then throughput."""
    systems, benchmarks = _systems_and_benchmarks(results)
    by_key = {(r.system, r.benchmark): r for r in results}
    lines = ["| benchmark | n | " + " | ".join(systems) + " |",
             "|---|---:|" + "---:|" * len(systems)]
    for name, title in benchmarks:
        cells = []
        for system in systems:
            result = by_key.get((system, name))
            cell = "–" if result is None else f"{result.score:.1f}"
            if result is not None and result.errors:
                cell += f" ({result.errors} err)"
            cells.append(cell)
        count = next(r.samples for r in results if r.benchmark == name)
        lines.append(f"| {title} | {count} | " + " | ".join(cells) + " |")
    lines += _unextracted_table(results)
    lines += ["", "Generation throughput (samples/s, this run's new samples):", "",
              "| system | samples | seconds | samples/s |", "|---|---:|---:|---:|"]
    for system in systems:
        own = [r for r in results if r.system == system]
        generated = sum(r.generated for r in own)
        seconds = sum(r.generation_seconds for r in own)
        rate = f"{generated / seconds:.2f}" if generated and seconds > 0 else "–"
        lines.append(f"| {system} | {generated} | {seconds:.1f} | {rate} |")
    return "\n".join(lines) + "\n"


def bar_chart(results: Sequence[BenchmarkResult], out_path: Path, title: str) -> Path:
    """Grouped bars: accuracy per benchmark, one colour per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems, benchmarks = _systems_and_benchmarks(results)
    by_key = {(r.system, r.benchmark): r.score for r in results}
    width = 0.8 / max(1, len(systems))
    fig, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(benchmarks) + 2), 4.2))
    for offset, system in enumerate(systems):
        positions = [i + (offset - (len(systems) - 1) / 2) * width
                     for i in range(len(benchmarks))]
        heights = [by_key.get((system, name), 0.0) for name, _ in benchmarks]
        bars = axis.bar(positions, heights, width=width, label=system)
        axis.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    axis.set_xticks(range(len(benchmarks)), [title for _, title in benchmarks],
                    rotation=30, ha="right")
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(0, 100)
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    axis.set_title(title)
    fig.tight_layout()
    return save_figure(fig, out_path, dpi=110)


def _write_text_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def write_reports(results: Sequence[BenchmarkResult], out_dir: Path,
                  title: str = "Benchmark accuracy") -> dict[str, Path]:
    """scores.json, scores.md and scores.png under ``out_dir``; their paths."""
    return {"scores.json": write_json_atomic(out_dir / "scores.json", scores_summary(results)),
            "scores.md": _write_text_atomic(out_dir / "scores.md", scores_table(results)),
            "scores.png": bar_chart(results, out_dir / "scores.png", title)}
