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


# ---------------------------------------------------------------- model registry
# The registry holds exported bundles (one registered model per served system); the gate
# points a serving alias at the versions it promotes. These functions take the workspace
# explicitly or find it as the stages do (idlm.config.workspace), and always talk to
# MLflow directly: registering is a single-process step, not a per-rank log.
BUNDLE_FOLDER = "bundle"  # where a registered bundle's files sit inside its run's artifacts


def _registry_tracker(workspace: Path | None, experiment: str = EXPERIMENT) -> MlflowTracker:
    if workspace is None:
        from idlm.config import workspace as find_workspace

        workspace = find_workspace()
    tracker = open_tracker(workspace, experiment, rank=0)
    assert isinstance(tracker, MlflowTracker)  # rank 0 always gets MLflow
    return tracker


def register_bundle(name: str, bundle: Path, *, workspace: Path | None = None,
                    upload: bool = True, tags: dict[str, str] | None = None,
                    description: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Register the folder ``bundle`` as a new version of registered model ``name``
    (created on first use); returns the new version number as a string.

    ``upload``: copy the files into a run's artifacts (``bundle/``) and point the version
    there, so the registry owns them. Without it the version points at the folder itself
    (a shared filesystem path), for bundles too big to copy twice.
    """
    bundle = Path(bundle).resolve()
    if not bundle.is_dir():
        raise FileNotFoundError(f"register_bundle: {bundle} is not a folder")
    tracker = _registry_tracker(workspace, experiment)
    client = tracker.client
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    all_tags = {"bundle_name": bundle.name, **(tags or {})}
    run_id = tracker.start_run(f"register:{name}", tags=all_tags)
    if upload:
        client.log_artifacts(run_id, str(bundle), BUNDLE_FOLDER)
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{BUNDLE_FOLDER}"
    else:
        source = bundle.as_uri()
    tracker.finish(run_id)
    version = client.create_model_version(
        name, source, run_id=run_id, description=description,
        tags={k: _clip(str(v), _TAG_CHARS) for k, v in all_tags.items()})
    return str(version.version)


def set_alias(name: str, alias: str, version: str | int, *,
              workspace: Path | None = None) -> None:
    """Point ``alias`` (e.g. ``champion``) of registered model ``name`` at ``version``."""
    _registry_tracker(workspace).client.set_registered_model_alias(name, alias, str(version))


def get_alias(name: str, alias: str, *, workspace: Path | None = None) -> str | None:
    """The version ``alias`` points at, or None (no such alias or no such model)."""
    try:
        found = _registry_tracker(workspace).client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return str(found.version)


def model_version_source(name: str, version: str | int, *,
                         workspace: Path | None = None) -> str:
    """Where a registered version's files are (artifact URI or folder URI)."""
    client = _registry_tracker(workspace).client
    return str(client.get_model_version(name, str(version)).source)
