"""idlm.tracking: the only mlflow importer; explicit parent/child ids; rank 0 logs only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from idlm import tracking

REPO = Path(__file__).resolve().parents[2]
IMPORTS_MLFLOW = re.compile(r"^\s*(import mlflow|from mlflow[\s.])", re.MULTILINE)


def test_mlflow_is_imported_in_one_module_only() -> None:
    importers = sorted(str(path.relative_to(REPO)) for folder in ("src", "stages", "flows",
                                                                  "bench")
                       for path in (REPO / folder).rglob("*.py")
                       if IMPORTS_MLFLOW.search(path.read_text()))
    assert importers == ["src/idlm/tracking.py"]


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> tracking.MlflowTracker:
    workspace = tmp_path_factory.mktemp("ws")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        opened = tracking.open_tracker(workspace, experiment="test", rank=0)
    assert isinstance(opened, tracking.MlflowTracker)
    return opened


def test_default_store_is_sqlite_and_artifacts_in_the_workspace(
        tracker: tracking.MlflowTracker) -> None:
    assert tracker.tracking_uri.startswith("sqlite:///") and tracker.tracking_uri.endswith(
        "/mlflow.db")
    workspace = Path(tracker.tracking_uri.removeprefix("sqlite:///")).parent
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.artifact_location == (workspace / "mlartifacts").as_uri()
    assert tracker.ui_hint() == f"mlflow ui --backend-store-uri {tracker.tracking_uri}"


def test_children_name_their_parent_explicitly(tracker: tracking.MlflowTracker,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_RUN_ID", "not-this-one")  # must be ignored
    parent = tracker.start_run("flow", tags={"profile": "tiny"})
    child = tracker.start_run("base", parent_id=parent)
    assert tracker.run(child).data.tags[tracking.PARENT_TAG] == parent
    assert tracking.PARENT_TAG not in tracker.run(parent).data.tags


def test_params_metrics_with_steps_and_artifacts(tracker: tracking.MlflowTracker,
                                                 tmp_path: Path) -> None:
    run = tracker.start_run("base")
    tracker.log_params(run, {f"model.key{i}": i for i in range(130)})  # > one batch of 100
    tracker.log_metrics(run, [("history/loss", 3.0 - step / 10, step) for step in range(1, 6)])
    (tmp_path / "metrics.json").write_text('{"loss": 2.5}')
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    tracker.log_artifact(run, tmp_path / "metrics.json", "metrics")
    tracker.log_artifact(run, tmp_path / "tokenizer", "outputs")
    tracker.finish(run)
    stored = tracker.run(run)
    assert stored.info.status == "FINISHED" and len(stored.data.params) == 130
    history = tracker.client.get_metric_history(run, "history/loss")
    assert [(m.step, m.value) for m in history] == [(s, 3.0 - s / 10) for s in range(1, 6)]
    listed = {a.path for a in tracker.client.list_artifacts(run, "outputs/tokenizer")}
    assert listed == {"outputs/tokenizer/vocab.json"}
    assert [a.path for a in tracker.client.list_artifacts(run, "metrics")] == [
        "metrics/metrics.json"]


def test_a_failed_run_holds_the_error_text(tracker: tracking.MlflowTracker,
                                           tmp_path: Path) -> None:
    run = tracker.start_run("ic")
    tracker.finish(run, "FAILED", "stage 'ic' failed: ValueError: boom")
    stored = tracker.run(run)
    assert stored.info.status == "FAILED"
    assert stored.data.tags["error"] == "stage 'ic' failed: ValueError: boom"
    assert "ValueError: boom" in stored.data.tags[tracking.NOTE_TAG]
    path = tracker.client.download_artifacts(run, "error.txt", str(tmp_path))
    assert Path(path).read_text() == "stage 'ic' failed: ValueError: boom"


def test_only_rank_zero_tracks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(tracking.open_tracker(tmp_path, rank=1), tracking.NullTracker)
    monkeypatch.setenv("RANK", "3")
    null = tracking.open_tracker(tmp_path)
    assert isinstance(null, tracking.NullTracker)
    assert null.start_run("x") == "" and null.finish("") is None
    assert not (tmp_path / "mlflow.db").exists()


def test_mlflow_tracking_uri_points_at_a_server(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking.tracking_uri(tmp_path) == "http://mlflow.internal:5000"
    assert tracking.ui_hint("http://mlflow.internal:5000") == "open http://mlflow.internal:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
