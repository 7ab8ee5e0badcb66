"""What a stage's MLflow child run holds, read from the files the stage declares in dvc.yaml.

- params: the stage's resolved config keys that DVC tracks for it (its own section and
  the shared keys it lists), flattened (``ic.train.lr``);
- metrics: every number in its metrics files, plus each JSON plot file (``history.json``)
  as curves, stepped by the plot's ``x`` key;
- artifacts: metrics JSON, plot files (PNG), outputs up to ``artifact_max_bytes`` (an
  adapter, evaluation sample logs); larger ones (weights) are *referenced*
  (path, hash, size from ``dvc.lock``) in ``dvc_outputs.json``.

Reading declared files only means a stage DVC skipped is recorded exactly like one that ran.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from idlm.orchestration.pipeline import StageSpec

if TYPE_CHECKING:  # mlflow is imported only when a tracker is opened
    from idlm.tracking import Tracker

MetricPoint = tuple[str, float, int]  # (key, value, step), as idlm.tracking takes them

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists -> {"a.b.0.c": leaf}."""
    if isinstance(tree, dict):
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in tree.items()]
    elif isinstance(tree, list | tuple):
        items = [(str(i), v) for i, v in enumerate(tree)]
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def metric_key(key: str) -> str:
    return _KEY_CHARS.sub("_", key)[:250]


def numbers(tree: Any) -> dict[str, float]:
    """The numeric leaves of a metrics file (booleans as 0/1, non-finite values dropped)."""
    found = {}
    for key, value in flatten(tree).items():
        if isinstance(value, bool | int | float) and math.isfinite(float(value)):
            found[metric_key(key)] = float(value)
    return found


def curve_points(rows: list[dict[str, Any]], name: str, x: str = "step") -> list[MetricPoint]:
    """Rows of a JSON plot file as metric points ``<name>/<group>/<key>`` at step ``row[x]``;
    text fields (e.g. a curriculum ``phase``) name the group, so phases get separate curves."""
    points: list[MetricPoint] = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        step = row.get(x, index)
        step = int(step) if isinstance(step, int | float) else index
        group = "/".join(str(v) for k, v in row.items() if isinstance(v, str))
        base = f"{name}/{group}" if group else name
        for key, value in row.items():
            if key != x and isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value):
                points.append((metric_key(f"{base}/{key}"), float(value), step))
    return points


def stage_params(spec: StageSpec, workspace: Path, resolved: dict[str, Any]) -> dict[str, Any]:
    """The config keys DVC tracks for the stage, resolved (defaults filled in), flattened."""
    params: dict[str, Any] = {}
    for file_name, keys in spec.params.items():
        data = resolved if file_name == "params.yaml" else yaml.safe_load(
            (workspace / file_name).read_text()) or {}
        for key in keys or list(data):
            node: Any = data
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            params.update(flatten(node, key))
    return params


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def lock_entry(workspace: Path, stage: str) -> dict[str, Any]:
    """The stage's entry in ``dvc.lock`` ({} before its first successful run)."""
    path = workspace / "dvc.lock"
    if not path.is_file():
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser: 20x faster
    data = yaml.load(path.read_text(), Loader=loader) or {}  # noqa: S506 - a safe loader
    return data.get("stages", {}).get(stage, {})


def output_refs(spec: StageSpec, workspace: Path, max_bytes: int) -> list[dict[str, Any]]:
    """Every declared output: where it is, its DVC hash, and whether it is copied."""
    locked = {o["path"]: o for o in lock_entry(workspace, spec.name).get("outs", [])}
    refs = []
    for out in spec.outputs:
        path = workspace / out.path
        entry = locked.get(out.path, {})
        size = _size(path) if path.exists() else None
        copy = path.exists() and (out.kind != "out"
                                  or (size is not None and size <= max_bytes))
        refs.append({"path": out.path, "kind": out.kind, "cache": out.cache,
                     "persist": out.persist, "md5": entry.get("md5"), "size": size,
                     "nfiles": entry.get("nfiles"), "exists": path.exists(),
                     "artifact": bool(copy)})
    return refs


def record_outputs(tracker: Tracker, run_id: str, spec: StageSpec, workspace: Path,
                   max_bytes: int) -> dict[str, float]:
    """Log metrics, curves and artifacts of a finished (or skipped) stage; returns metrics."""
    metrics: dict[str, float] = {}
    for rel in spec.files("metric"):
        path = workspace / rel
        if path.suffix == ".json" and path.is_file():
            metrics.update(numbers(json.loads(path.read_text())))
    tracker.log_metrics(run_id, [(key, value, 0) for key, value in metrics.items()])
    for out in spec.outputs:
        path = workspace / out.path
        if out.kind == "plot" and path.suffix == ".json" and path.is_file():
            rows = json.loads(path.read_text())
            if isinstance(rows, list):
                tracker.log_metrics(run_id, curve_points(rows, path.stem,
                                                         out.plot.get("x", "step")))
    refs = output_refs(spec, workspace, max_bytes)
    folders = {"metric": "metrics", "plot": "plots", "out": "outputs"}
    for ref in refs:
        if ref["artifact"]:
            tracker.log_artifact(run_id, workspace / ref["path"], folders[ref["kind"]])
    tracker.log_text(run_id, json.dumps(refs, indent=2), "dvc_outputs.json")
    tracker.set_tags(run_id, {f"dvc.out.{ref['path']}": ref["md5"] for ref in refs
                              if ref["md5"] and not ref["artifact"]})
    return metrics
