"""One flow run's bookkeeping: the MLflow parent run, a child per stage, and the summary.

The flow decides *when* (it owns the Prefect tasks); this class decides *what is
recorded*. A failed stage marks its child and, at the end, the parent FAILED with the
error text; stages downstream of it are not run and get no child run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idlm.config import FlowConfig
from idlm.orchestration import record, summary
from idlm.orchestration.dvc_runner import StageFailed, StageOutcome
from idlm.orchestration.params import file_sha256, git_commit
from idlm.orchestration.pipeline import Pipeline

if TYPE_CHECKING:  # mlflow is imported only when a tracker is opened
    from idlm.tracking import Tracker


@dataclass
class FlowContext:
    """Who is running and with which inputs (tags and params of the parent run)."""

    flow_run_id: str
    flow_run_name: str
    profile: str
    selection: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)


class PipelineFailed(RuntimeError):
    """A stage failed: the flow run fails; ``summary`` is the table to show anyway."""

    def __init__(self, message: str, summary_text: str) -> None:
        super().__init__(message)
        self.summary = summary_text


class PipelineRun:
    def __init__(self, tracker: Tracker, pipeline: Pipeline, resolved: dict[str, Any],
                 settings: FlowConfig, context: FlowContext) -> None:
        self.tracker, self.pipeline, self.resolved = tracker, pipeline, resolved
        self.settings, self.context = settings, context
        self.workspace: Path = pipeline.workspace
        self.rows: list[summary.StageRow] = []
        self.errors: dict[str, str] = {}
        self.began = time.perf_counter()
        self.parent_id = self._start_parent()

    def _start_parent(self) -> str:
        commit, dirty = git_commit(self.workspace)
        lock_hash = file_sha256(self.workspace / "dvc.lock")
        tags = {"prefect.flow_run_id": self.context.flow_run_id,
                "prefect.flow_run_name": self.context.flow_run_name,
                "git.commit": commit, "git.dirty": str(dirty).lower(),
                "mlflow.source.git.commit": commit, "dvc.lock_sha256_start": lock_hash,
                "dvc.lock_sha256": lock_hash, "profile": self.context.profile,
                "stages": ",".join(self.context.selection), "workspace": str(self.workspace)}
        parent = self.tracker.start_run(f"idlm-full {self.context.flow_run_name}".strip(),
                                        tags=tags)
        self.tracker.log_params(parent, {k: json.dumps(v) if not isinstance(v, str) else v
                                         for k, v in self.context.parameters.items()})
        return parent

    def blocked_by(self, stage: str) -> list[str]:
        """Failed (or themselves blocked) stages upstream of ``stage``."""
        return [u for u in self.pipeline[stage].upstream if u in self.errors]

    def begin(self, stage: str) -> str:
        spec = self.pipeline[stage]
        child = self.tracker.start_run(stage, parent_id=self.parent_id, tags={
            "dvc.stage": stage, "prefect.flow_run_id": self.context.flow_run_id})
        self.tracker.log_params(child, record.stage_params(spec, self.workspace, self.resolved))
        return child

    def done(self, stage: str, child: str, outcome: StageOutcome) -> None:
        spec = self.pipeline[stage]
        skipped = outcome.status != "ran"
        self.tracker.set_tags(child, {
            "dvc.status": outcome.status, "skipped": str(skipped).lower(),
            "prefect.task_run_id": outcome.task_run_id,
            "dvc.lock_entry_sha256": _entry_hash(record.lock_entry(self.workspace, stage))})
        metrics = record.record_outputs(self.tracker, child, spec, self.workspace,
                                        self.settings.artifact_max_bytes)
        self.tracker.log_metrics(child, [("stage_seconds", outcome.seconds, 0)])
        self.tracker.log_text(child, "\n".join(outcome.log) + "\n", "stage.log")
        self.tracker.finish(child, "FINISHED")
        self.rows.append(summary.StageRow(stage, outcome.status, outcome.seconds, metrics,
                                          child))

    def failed(self, stage: str, child: str, error: BaseException, seconds: float) -> None:
        text = (error.details if isinstance(error, StageFailed)
                else f"{type(error).__name__}: {error}")
        self.errors[stage] = text
        self.tracker.set_tags(child, {"dvc.status": "failed", "skipped": "false"})
        if isinstance(error, StageFailed):
            self.tracker.log_text(child, "\n".join(error.log) + "\n", "stage.log")
        self.tracker.finish(child, "FAILED", text)
        note = error.cause if isinstance(error, StageFailed) else str(error)
        self.rows.append(summary.StageRow(stage, "failed", seconds, run_id=child,
                                          note=note[:100]))

    def not_run(self, stage: str, blocked: list[str]) -> None:
        self.errors[stage] = f"not run: upstream {', '.join(blocked)} failed"
        self.rows.append(summary.StageRow(stage, "not run",
                                          note=f"upstream failed: {', '.join(blocked)}"))

    def where(self) -> list[tuple[str, str]]:
        return [("MLflow", f"{self.tracker.ui_hint()}   (parent run {self.parent_id})"),
                ("DVC", "dvc metrics show; dvc plots show; dvc status"),
                ("outputs", str(self.workspace / str(self.resolved.get("outputs", "outputs"))))]

    def finish(self, state: str | None = None, reason: str = "") -> dict[str, Any]:
        """Close the parent run and return the summary (a JSON-ready dict)."""
        failed = [r.stage for r in self.rows if r.status == "failed"]
        state = state or ("FAILED" if failed else "COMPLETED")
        seconds = time.perf_counter() - self.began
        info = {"state": state, "flow_run_name": self.context.flow_run_name, "seconds": seconds}
        text = summary.render(info, self.rows, self.where())
        counts = {s: float(sum(r.status == s for r in self.rows)) for s in
                  ("ran", "skipped", "restored", "failed", "not run")}
        self.tracker.log_metrics(self.parent_id, [("flow_seconds", seconds, 0)] + [
            (f"stages_{s.replace(' ', '_')}", n, 0) for s, n in counts.items()])
        self.tracker.set_tags(self.parent_id, {
            "dvc.lock_sha256": file_sha256(self.workspace / "dvc.lock")})
        self.tracker.log_text(self.parent_id, text + "\n", "summary.txt")
        for name in ("params.yaml", "dvc.lock"):
            if (self.workspace / name).is_file():
                self.tracker.log_artifact(self.parent_id, self.workspace / name)
        error = "\n\n".join(f"[{s}] {self.errors[s]}" for s in failed) or reason or None
        status = {"COMPLETED": "FINISHED", "FAILED": "FAILED"}.get(state, "KILLED")
        self.tracker.finish(self.parent_id, status, error)
        return {"state": state, "seconds": seconds, "parent_run_id": self.parent_id,
                "flow_run_id": self.context.flow_run_id, "summary": text,
                "mlflow": self.tracker.ui_hint(), "failed": failed,
                "stages": [row.__dict__ for row in self.rows]}


def _entry_hash(entry: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
