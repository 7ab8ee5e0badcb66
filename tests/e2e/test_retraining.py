"""Retraining that reruns on new data and only then, each run in a fresh clone.

A git origin (the project), a DVC remote (a folder) and a data source (a folder of chat
files, imported with ``dvc import-url``). The `cluster` deployment's own pull steps from
prefect.yaml (``git_clone``, then ``python -m idlm.orchestration.storage restore``) run in
a process worker, three times:

1. data v1, a first run: prepare runs; the outputs go to the remote and the lock to
   ``idlm-runs/latest`` in the origin; the MLflow parent run records the data version.
2. the same data, a new clone: the last run is restored, the data version is unchanged,
   prepare is skipped.
3. v2 published (one more file), a new clone: a new version, prepare runs again.

Only ``prepare`` is selected to keep this to about a minute; that DVC reruns everything
downstream of a changed stage (and that ``champion`` moves only on a passing gate) is
DVC's rule and is tested by the flow and gate tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.workspace import PROFILE, REPO, git, make_workspace, prefect_flow_facts

pytestmark = pytest.mark.slow

POOL = "idlm-retrain-test"


def _write_items(folder: Path, name: str, count: int, seed: int) -> None:
    from idlm.data.synthetic import generate_splits, to_messages

    items, _ = generate_splits(count, 1, {"arithmetic": 1.0, "code": 1.0}, seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / name).open("w") as handle:
        for item in items:
            handle.write(json.dumps({"messages": to_messages(item)}) + "\n")


def _pull_steps(origin: Path) -> list[dict[str, Any]]:
    """The shipped `cluster` deployment's pull steps, pointed at this origin."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (cluster,) = [d for d in spec["deployments"] if d["name"] == "cluster"]
    steps = json.loads(json.dumps(cluster["pull"]))
    steps[0]["prefect.deployments.steps.git_clone"]["repository"] = str(origin)
    return steps


@pytest.fixture(scope="module")
def setting(prefect_api, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: ANN001
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
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
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        except ObjectAlreadyExists:
            pass
        flow_id = client.create_flow_from_name("idlm-full")
        deployment_id = client.create_deployment(
            flow_id=flow_id, name="retrain", work_pool_name=POOL,
            entrypoint="flows/idlm_full.py:idlm_full", pull_steps=_pull_steps(origin),
            parameters={"profile": PROFILE, "only": ["prepare"], "overrides": [
                "prepare.source=hub", f"prepare.dataset.import_url={data}",
                "prepare.dataset.eval_fraction=0.05", "flow.push=true"]})
    return {"root": root, "origin": origin, "data": data, "deployment": deployment_id,
            "tracking": f"sqlite:///{root / 'mlflow.db'}"}


def _run(setting: dict[str, Any]) -> dict[str, Any]:
    """One flow run of the deployment, executed by a `prefect worker --run-once`."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    run = run_deployment(setting["deployment"], timeout=0)
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
    assert facts["completed"], "\n".join(facts["messages"][-25:]) + worker.stderr[-3000:]
    return facts


def _prepare_status(facts: dict[str, Any]) -> str:
    (line,) = [m for m in facts["messages"] if m.startswith("DVC ") and "'prepare'" in m]
    return line.split()[1]


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
    first = _run(setting)
    again = _run(setting)
    _write_items(setting["data"], "part-1.jsonl", 40, seed=2)   # publish v2
    after_new_data = _run(setting)
    return [first, again, after_new_data]


def test_prepare_reruns_on_new_data_and_only_then(runs: list[dict[str, Any]]) -> None:
    # The second run skips prepare only because its fresh clone got the last run's lock.
    assert [_prepare_status(facts) for facts in runs] == ["ran", "skipped", "ran"]


def test_each_run_is_published_with_its_data_version(setting: dict[str, Any],
                                                     runs: list[dict[str, Any]]) -> None:
    versions = _data_versions(setting["tracking"])
    assert len(versions) == 3 and versions[0] == versions[1] != versions[2]
    latest = git(setting["origin"], "show", "idlm-runs/latest:params.yaml")
    assert yaml.safe_load(latest)["prepare"]["dataset"]["version"] == versions[2]
    lock = yaml.safe_load(git(setting["origin"], "show", "idlm-runs/latest:dvc.lock"))
    assert "prepare" in lock["stages"]
    imported = yaml.safe_load(git(setting["origin"], "show",
                                  "idlm-runs/latest:data/source.dvc"))
    assert imported["deps"][0]["path"] == str(setting["data"])
    # The origin's own checkout was never written to (fresh clones only).
    assert git(setting["origin"], "status", "--porcelain") == ""
