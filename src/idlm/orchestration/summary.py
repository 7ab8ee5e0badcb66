"""The short table a flow run ends with: each stage, what DVC did, time, key metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Metric names that say how a stage went, most telling first; others are left to MLflow.
KEY_PATTERNS = ("mismatch", "pass", "score", "accuracy", "tpf", "speedup", "heldout",
                "loss", "_ce", "rows", "rejected")
KEY_METRICS_SHOWN = 4  # all four held-out kinds of a training stage's accuracy


@dataclass
class StageRow:
    stage: str
    status: str  # ran / skipped / restored / failed / not run
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    note: str = ""


def key_metrics(metrics: dict[str, float], shown: int = KEY_METRICS_SHOWN) -> dict[str, float]:
    """Top-level metrics whose names match :data:`KEY_PATTERNS`, in pattern order."""
    top = {k: v for k, v in metrics.items() if "." not in k and "/" not in k}
    picked: dict[str, float] = {}
    for pattern in KEY_PATTERNS:
        for key in sorted(top):
            if pattern in key and key not in picked and len(picked) < shown:
                picked[key] = top[key]
    return picked


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def table(rows: list[StageRow]) -> str:
    header = ("stage", "status", "time", "key metrics")
    body = [(r.stage, r.status, duration(r.seconds) if r.status != "not run" else "-",
             " ".join(f"{k}={v:.4g}" for k, v in key_metrics(r.metrics).items()) or r.note)
            for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line[:3], widths, strict=True))
                     + "  " + line[3] for line in [header, *body])


def render(info: dict[str, Any], rows: list[StageRow], where: list[tuple[str, str]]) -> str:
    """The whole summary: headline, stage table and where to look next."""
    counts = {s: sum(r.status == s for r in rows) for s in ("ran", "skipped", "restored",
                                                           "failed", "not run")}
    counted = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines = [f"idlm-full {info.get('state', '')}: flow run '{info.get('flow_run_name', '')}'"
             f" ({counted}) in {duration(info.get('seconds', 0.0))}", "",
             table(rows), "", "where to look:"]
    width = max((len(label) for label, _ in where), default=0)
    lines += [f"  {label.ljust(width)}  {text}" for label, text in where]
    return "\n".join(lines)
