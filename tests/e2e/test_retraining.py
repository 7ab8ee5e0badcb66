"""Retraining that reruns on new data and only then, each run in a fresh clone.

A git origin (the project), a DVC remote (a folder) and a data source (a folder of chat
files, imported with ``dvc import-url``), on a real Prefect server (``prefect server
start``, whose scheduler service creates the runs of a deployment's schedules; the test
harness server runs no scheduler). The `cluster` deployment's own pull steps from
prefect.yaml (``git_clone``, then ``python -m idlm.orchestration.storage restore``) run in
a process worker, three times:

1. data v1, a run the deployment's schedule fires (not one asked for), every stage of the
   test profile: prepare ... gate run, the gate passes and ``champion`` moves to the
   exported versions; the outputs go to the remote and the lock to ``idlm-runs/latest`` in
   the origin; the MLflow parent run records the data version.
2. the same data, a new clone: the last run is restored, the data version is unchanged,
   every stage is skipped and ``champion`` stays.
3. v2 published (one more file), a new clone, ``prepare`` selected: a new version,
   prepare reruns, and the lock it publishes shows every later stage out of date (each
   one's recorded input no longer matches what prepare now writes, which is what makes
   ``dvc repro`` rerun it).

Running the whole chain a second time for v2 would show the same thing at four more
minutes of the suite (its budget, issue 13); that a refusing gate leaves ``champion``
where it was is tested where it is decided (tests/unit/test_gate_promotion.py,
tests/stages/test_gate.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.workspace import PROFILE, REPO, free_port, git, make_workspace, prefect_flow_facts

pytestmark = pytest.mark.slow

POOL = "idlm-retrain-test"
FIRST_RUN_DELAY = timedelta(seconds=5)   # the schedule's first occurrence, after creation


def _write_items(folder: Path, name: str, count: int, seed: int) -> None:
    from idlm.data.synthetic import generate_splits, to_messages

    items, _ = generate_splits(count, 1, {"arithmetic": 1.0, "code": 1.0}, seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / name).open("w") as handle:
        for item in items:
            # `kind` (a column the SFT path keeps) lets the tiny benchmarks find their items.
            handle.write(json.dumps({"messages": to_messages(item), "kind": item["kind"]})
                         + "\n")


def _overrides(data: Path) -> list[str]:
    # A dataset's code rows carry no unit tests to score: arithmetic is what evaluate asks.
    return ["prepare.source=hub", f"prepare.dataset.import_url={data}",
            "prepare.dataset.eval_fraction=0.05", "evaluate.benchmarks=[tiny_arithmetic]",
            "flow.push=true"]


def _pull_steps(origin: Path) -> list[dict[str, Any]]:
    """The shipped `cluster` deployment's pull steps, pointed at this origin."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (cluster,) = [d for d in spec["deployments"] if d["name"] == "cluster"]
    steps = json.loads(json.dumps(cluster["pull"]))
    steps[0]["prefect.deployments.steps.git_clone"]["repository"] = str(origin)
    return steps


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """`prefect server start` with its services (the scheduler looks every second), its
    own home and database; the Prefect client talks to it for this module's tests."""
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home, port = tmp_path_factory.mktemp("prefect-server"), free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def setting(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.exceptions import ObjectAlreadyExists

    root = tmp_path_factory.mktemp("retrain")
    origin = make_workspace(root / "origin")
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "storage",
                    str(root / "remote")], cwd=origin, check=True)
    shutil.copytree(REPO / "flows", origin / "flows",
                    ignore=shutil.ignore_patterns("__pycache__"))
    git(origin, "add", ".dvc/config", "flows")
    git(origin, "commit", "-q", "-m", "a DVC remote and the flow")
    git(origin, "branch", "-M", "main")   # the branch the deployment clones
    data = root / "data"
    _write_items(data, "part-0.jsonl", 120, seed=1)
    # Daily, first due a few seconds from now: one scheduled run inside this test.
    first_due = datetime.now(UTC) + FIRST_RUN_DELAY
    schedule = IntervalSchedule(interval=timedelta(days=1), anchor_date=first_due)
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        except ObjectAlreadyExists:
            pass
        flow_id = client.create_flow_from_name("idlm-full")
        deployment_id = client.create_deployment(
            flow_id=flow_id, name="retrain", work_pool_name=POOL,
            schedules=[DeploymentScheduleCreate(schedule=schedule, active=True)],
            entrypoint="flows/idlm_full.py:idlm_full", pull_steps=_pull_steps(origin),
            parameters={"profile": PROFILE, "overrides": _overrides(data)})
    return {"root": root, "origin": origin, "data": data, "deployment": deployment_id,
            "tracking": f"sqlite:///{root / 'mlflow.db'}"}


def _scheduled_run(setting: dict[str, Any]):  # noqa: ANN202 - a prefect FlowRun
    """The first run the server's scheduler created for the deployment's schedule."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(
                    any_=[setting["deployment"]])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
            if runs:
                return runs[0]
            assert time.monotonic() < deadline, "the scheduler created no run in 60 s"
            time.sleep(0.5)


def _run(setting: dict[str, Any], scheduled: bool = False,
         only: list[str] | None = None) -> dict[str, Any]:
    """One flow run of the deployment (the one its schedule fired, or one asked for now,
    of the ``only`` stages), executed by a `prefect worker --run-once`; what Prefect holds
    about it and where ``champion`` points afterwards."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    run = _scheduled_run(setting) if scheduled else run_deployment(
        setting["deployment"], timeout=0, parameters={"only": only} if only else {})
    if scheduled:   # the worker takes runs due within seconds: wait until it is due
        due_in = (run.expected_start_time - datetime.now(UTC)).total_seconds()
        time.sleep(max(0.0, due_in))
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "MLFLOW_TRACKING_URI": setting["tracking"],
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("IDLM_WORKSPACE", None)
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type",
         "process", "--run-once"], cwd=setting["root"], env=env, capture_output=True,
        text=True, timeout=600)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    facts = prefect_flow_facts(str(run.id))
    assert facts["completed"] or facts["failed"], worker.stderr[-3000:]
    return {**facts, "run": run, "champion": _champion(setting["tracking"]),
            "log": "\n".join(facts["messages"][-25:]) + worker.stderr[-3000:]}


def _stage_statuses(facts: dict[str, Any]) -> dict[str, str]:
    """What DVC did with each stage, from the flow's "DVC <status> stage '<name>'" lines."""
    lines = [m.split() for m in facts["messages"] if m.startswith("DVC ")]
    return {words[3].strip("'"): words[1] for words in lines}


def _champion(tracking: str) -> dict[str, str]:
    """The registered version that the alias points at, per registered model."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking, registry_uri=tracking)
    pointed = {}
    for model in client.search_registered_models():
        try:
            pointed[model.name] = client.get_model_version_by_alias(model.name, "champion").version
        except MlflowException:
            continue
    return pointed


def _data_versions(tracking: str) -> list[str]:
    """The data version tag of every parent run, oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`idlm.data_version` LIKE '%'",
                              order_by=["attributes.start_time ASC"])
    return [r.data.tags["idlm.data_version"] for r in runs]


@pytest.fixture(scope="module")
def runs(setting: dict[str, Any]) -> list[dict[str, Any]]:
    first = _run(setting, scheduled=True)
    again = _run(setting)
    _write_items(setting["data"], "part-1.jsonl", 40, seed=2)   # publish v2
    after_new_data = _run(setting, only=["prepare"])
    return [first, again, after_new_data]


def test_the_first_run_is_fired_by_the_schedule(runs: list[dict[str, Any]]) -> None:
    first, *asked = [facts["run"] for facts in runs]
    assert first.auto_scheduled and first.created_by.type == "SCHEDULE"
    assert not any(run.auto_scheduled for run in asked)


def test_the_pipeline_reruns_on_new_data_and_only_then(runs: list[dict[str, Any]]) -> None:
    for facts in runs:
        assert facts["completed"], facts["log"]
    statuses = [_stage_statuses(facts) for facts in runs]
    stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert set(statuses[0]) == stages == set(statuses[1]), statuses
    assert set(statuses[0].values()) == {"ran"}
    # The second run skips every stage only because its fresh clone got the last run's lock.
    assert set(statuses[1].values()) == {"skipped"}
    assert statuses[2] == {"prepare": "ran"}


def _stale(lock: dict[str, Any]) -> set[str]:
    """Stages whose recorded inputs under outputs/ differ from what the lock records as
    their producer's outputs now (what `dvc repro` reruns them for)."""
    produced = {out["path"]: out["md5"] for entry in lock["stages"].values()
                for out in entry.get("outs", [])}
    return {name for name, entry in lock["stages"].items()
            for dep in entry.get("deps", [])
            if dep["path"] in produced and dep["md5"] != produced[dep["path"]]}


def test_new_data_leaves_every_later_stage_out_of_date(setting: dict[str, Any],
                                                       runs: list[dict[str, Any]]) -> None:
    from idlm.orchestration.storage import run_branch

    first_branch = run_branch(runs[0]["run"].name)   # the first run's own published lock
    first = yaml.safe_load(git(setting["origin"], "show", f"{first_branch}:dvc.lock"))
    latest = yaml.safe_load(git(setting["origin"], "show", "idlm-runs/latest:dvc.lock"))
    assert _stale(first) == set()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    # base reads prepare's outputs; everything else reads base's or later: out of date
    # through base (DVC reruns a stage whose upstream reruns).
    assert "base" in _stale(latest) and set(stages) - {"prepare"} >= _stale(latest)


def test_champion_moves_when_the_gate_passes_and_only_then(
        runs: list[dict[str, Any]]) -> None:
    first, again, after_new_data = [facts["champion"] for facts in runs]
    assert set(first) == {"idlm-isd", "idlm-risd"}
    # Nothing reran, nothing was registered or promoted; no gate ran on v2 yet.
    assert again == first == after_new_data


def test_each_run_is_published_with_its_data_version(setting: dict[str, Any],
                                                     runs: list[dict[str, Any]]) -> None:
    versions = _data_versions(setting["tracking"])
    assert len(versions) == 3 and versions[0] == versions[1] != versions[2]
    latest = git(setting["origin"], "show", "idlm-runs/latest:params.yaml")
    assert yaml.safe_load(latest)["prepare"]["dataset"]["version"] == versions[2]
    lock = yaml.safe_load(git(setting["origin"], "show", "idlm-runs/latest:dvc.lock"))
    assert "gate" in lock["stages"]
    imported = yaml.safe_load(git(setting["origin"], "show",
                                  "idlm-runs/latest:data/source.dvc"))
    assert imported["deps"][0]["path"] == str(setting["data"])
    # The origin's own checkout was never written to (fresh clones only).
    assert git(setting["origin"], "status", "--porcelain") == ""
