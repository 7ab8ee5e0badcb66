"""Experiment tracking: the ONLY module that imports mlflow.

Everything else talks to a :class:`Tracker` with explicit run ids: the flow opens one
parent run and passes its id when it creates each stage's child run (never through
``MLFLOW_RUN_ID`` or mlflow's global "active run"), so nothing depends on process state.
Off rank 0, :func:`open_tracker` returns a :class:`NullTracker`, so callers never branch
on whether they should log.

Embedded default: an sqlite file and an artifact folder inside the workspace
(``mlflow.db``, ``mlartifacts/``); ``MLFLOW_TRACKING_URI`` points it at a server.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

EXPERIMENT = "idlm-full"
DB_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests child runs by
NOTE_TAG = "mlflow.note.content"  # shown as the run's description in the UI
# Per-request limits of the MLflow REST API (mlflow.utils.validation).
_PARAMS_PER_BATCH, _METRICS_PER_BATCH = 100, 1000
_PARAM_CHARS, _TAG_CHARS = 6000, 8000

# (key, value, step) for one metric point
MetricPoint = tuple[str, float, int]


class Tracker(Protocol):
    """What the flow (and any stage, on rank 0) may record; run ids are always explicit."""

    def start_run(self, name: str, parent_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str: ...
    def log_params(self, run_id: str, params: dict[str, Any]) -> None: ...
    def log_metrics(self, run_id: str, points: Iterable[MetricPoint]) -> None: ...
    def log_artifact(self, run_id: str, path: Path, folder: str | None = None) -> None: ...
    def log_text(self, run_id: str, text: str, file_name: str) -> None: ...
    def set_tags(self, run_id: str, tags: dict[str, str]) -> None: ...
    def finish(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None: ...
    def ui_hint(self) -> str: ...


class NullTracker:
    """Records nothing: what ranks other than 0 get, so loops never branch on logging."""

    def start_run(self, name: str, parent_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str:
        return ""

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, run_id: str, points: Iterable[MetricPoint]) -> None:
        pass

    def log_artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        pass

    def log_text(self, run_id: str, text: str, file_name: str) -> None:
        pass

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        pass

    def finish(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        pass

    def ui_hint(self) -> str:
        return "tracking is off on this rank"


class MlflowTracker:
    """MLflow through its client API: no global active run, explicit ids everywhere."""

    def __init__(self, tracking_uri: str, experiment: str = EXPERIMENT,
                 artifact_location: str | None = None) -> None:
        # The first use of a fresh sqlite store runs alembic migrations; keep their INFO
        # lines out of the stage logs.
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self._experiment(experiment, artifact_location)

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another client of the same server
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, name: str, parent_id: str | None = None,
                  tags: dict[str, str] | None = None) -> str:
        all_tags = {**(tags or {}), **({PARENT_TAG: parent_id} if parent_id else {})}
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={k: _clip(v, _TAG_CHARS) for k, v in all_tags.items()})
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(key, _clip(str(value), _PARAM_CHARS)) for key, value in params.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[start:start + _PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, points: Iterable[MetricPoint]) -> None:
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, int(step)) for key, value, step in points]
        for start in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[start:start + _METRICS_PER_BATCH])

    def log_artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            target = f"{folder}/{path.name}" if folder else path.name
            self.client.log_artifacts(run_id, str(path), target)
        else:
            self.client.log_artifact(run_id, str(path), folder)

    def log_text(self, run_id: str, text: str, file_name: str) -> None:
        self.client.log_text(run_id, text, file_name)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        items = [RunTag(key, _clip(str(value), _TAG_CHARS)) for key, value in tags.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[start:start + _PARAMS_PER_BATCH])

    def finish(self, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
        if error:
            self.log_text(run_id, error, "error.txt")
            self.set_tags(run_id, {"error": error,
                                   NOTE_TAG: f"**{status}**\n\n```\n{error}\n```"})
        self.client.set_terminated(run_id, status=status)

    def run(self, run_id: str) -> Any:
        """The stored run (tests and the summary read it back)."""
        return self.client.get_run(run_id)

    def ui_hint(self) -> str:
        return ui_hint(self.tracking_uri)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 15] + " ...[clipped]"


def default_tracking_uri(workspace: Path) -> str:
    return f"sqlite:///{(workspace / DB_NAME).resolve()}"


def tracking_uri(workspace: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set (a server), else the workspace's sqlite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workspace)


def ui_hint(uri: str) -> str:
    """The one command (or address) that shows these runs."""
    if uri.startswith(("http://", "https://", "databricks")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def current_rank() -> int:
    """Rank of this process in a distributed launch (0 when not launched that way)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def open_tracker(workspace: Path, experiment: str = EXPERIMENT,
                 rank: int | None = None) -> Tracker:
    """The tracker for this process: MLflow on rank 0, a do-nothing tracker elsewhere."""
    if (current_rank() if rank is None else rank) != 0:
        return NullTracker()
    uri = tracking_uri(workspace)
    # Our own default store keeps its artifacts beside it; a server decides for itself.
    artifacts = (workspace / ARTIFACTS_NAME).resolve().as_uri() if uri.startswith(
        "sqlite:///") and uri == default_tracking_uri(workspace) else None
    return MlflowTracker(uri, experiment, artifacts)
