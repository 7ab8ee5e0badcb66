"""Cluster storage, started for real on loopback: PostgreSQL + SeaweedFS S3 + `mlflow server`
(idlm.orchestration.stack), the flow tracking into it and pushing to a DVC S3 remote.

A copy of the suite's trained workspace runs the flow three times: once with nothing to
rerun and `flow.push` on, then `export` after a param change, twice. Checked: runs and
metrics in PostgreSQL, artifacts in the bucket (read back with boto3), `champion` still on
the first export's bytes after the second, `dvc push` -> fresh clone -> `dvc pull` -> `dvc
repro` running nothing, and planted secrets nowhere in params, lock, DVC config, MLflow
params or the flow runs' logs. The flow gets the S3 secret key from a Prefect Secret block
(`flow.secrets`), not from its environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.workspace import copy_workspace, git, prefect_flow_facts

pytestmark = pytest.mark.slow

SECRET_KEY = "planted-s3-" + os.urandom(8).hex()
DB_PASSWORD = "planted-pg-" + os.urandom(8).hex()


@pytest.fixture(scope="module")
def stack():  # noqa: ANN201 - the running stack's state
    from idlm.orchestration import stack as stack_mod

    # PostgreSQL runs as the `postgres` user (it refuses root): its folder must be reachable.
    root = Path(tempfile.mkdtemp(prefix="idlm-stack-"))
    root.chmod(0o755)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "idlm-test")
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        patch.setenv("PGPASSWORD", DB_PASSWORD)
        state = stack_mod.start(root / "stack")
        try:
            yield state
        finally:
            stack_mod.stop(root / "stack")
            shutil.rmtree(root, ignore_errors=True)


def _dvc(workspace: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace,
                          capture_output=True, text=True, env=env or os.environ.copy())
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    return done.stdout + done.stderr


def _remote(workspace: Path, state: Any) -> None:
    """The cluster's DVC remote: the URL in .dvc/config, the endpoint in the local config,
    the keys only in the environment."""
    _dvc(workspace, "remote", "add", "-f", "-d", "storage", "s3://idlm/dvc")
    _dvc(workspace, "remote", "modify", "--local", "storage", "endpointurl", state.s3_endpoint)


@pytest.fixture(scope="module")
def cluster_run(stack, prefect_api, trained_snapshot: dict,  # noqa: ANN001
                tmp_path_factory) -> dict[str, Any]:  # noqa: ANN001
    """Three runs of the flow (in the suite's Prefect server) on a copy of the trained
    workspace, tracking into the stack: (1) nothing to rerun, pushed and recorded on a run
    branch; (2) and (3) `export` again after a param change each, so the registry holds two
    versions per bundle, `champion` set on the first."""
    from mlflow import MlflowClient
    from prefect.blocks.system import Secret

    from flows.idlm_full import idlm_full
    from idlm import tracking

    workspace = copy_workspace(trained_snapshot["root"],
                               tmp_path_factory.mktemp("cluster") / "workspace")
    _remote(workspace, stack)
    git(workspace, "add", ".dvc/config")
    git(workspace, "commit", "-q", "-m", "DVC remote")
    Secret(value=SECRET_KEY).save("idlm-s3-secret", overwrite=True)
    client = MlflowClient(tracking_uri=stack.tracking_uri)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in stack.client_env().items():
            patch.setenv(key, value)
        patch.delenv("IDLM_WORKSPACE", raising=False)
        # The flow gets the S3 secret key from the Prefect Secret block, not the environment.
        patch.delenv("AWS_SECRET_ACCESS_KEY")
        published = idlm_full(workspace=str(workspace), overrides=[
            "flow.push=true", "+flow.secrets.AWS_SECRET_ACCESS_KEY=idlm-s3-secret"])
        second = idlm_full(workspace=str(workspace), only=["export"],
                           overrides=["export.check_new_tokens=8"])
        registered = json.loads((workspace / "outputs/export/registry.json").read_text())
        champion = {r["name"]: r["version"] for r in registered["registered"]}
        for name, version in champion.items():
            tracking.set_alias(name, "champion", version, workspace=workspace)
        first_manifests = {kind: (workspace / f"outputs/export/{kind}/manifest.json")
                           .read_bytes() for kind in ("isd", "risd")}
        third = idlm_full(workspace=str(workspace), only=["export"],
                          overrides=["export.check_new_tokens=6"])
    logs = [message for run in (published, second, third)
            for message in prefect_flow_facts(run["flow_run_id"])["messages"]]
    assert any("Running stage 'export'" in m for m in logs)   # the logs are the real ones
    return {"workspace": workspace, "summary": published, "client": client,
            "champion": champion, "first_manifests": first_manifests,
            "logs": "\n".join(logs)}


def test_runs_and_metrics_are_in_postgresql(stack, cluster_run) -> None:  # noqa: ANN001
    import psycopg2

    parent = cluster_run["summary"]["parent_run_id"]
    connection = psycopg2.connect(host="127.0.0.1", port=stack.postgres_port, user="idlm",
                                  password=DB_PASSWORD, dbname="mlflow")
    with connection.cursor() as cursor:
        cursor.execute("SELECT run_uuid FROM runs WHERE run_uuid = %s", (parent,))
        assert cursor.fetchone() is not None
        cursor.execute("SELECT r.name, count(m.key) FROM runs r JOIN tags t ON "
                       "t.run_uuid = r.run_uuid AND t.key = 'mlflow.parentRunId' AND "
                       "t.value = %s LEFT JOIN metrics m ON m.run_uuid = r.run_uuid "
                       "GROUP BY r.name", (parent,))
        children = dict(cursor.fetchall())
    connection.close()
    assert children.get("export", 0) > 0, children   # the stage's metrics, in PostgreSQL


def test_artifacts_are_in_the_bucket(stack, cluster_run) -> None:  # noqa: ANN001
    from botocore.exceptions import ClientError

    from idlm.orchestration.stack import s3_client

    with pytest.raises(ClientError):   # the server takes the stack's key, and only that
        s3_client(stack, "idlm-test", "not-the-key").list_objects_v2(Bucket="idlm")
    s3 = s3_client(stack, "idlm-test", SECRET_KEY)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="idlm", Prefix="mlflow/") for o in page.get("Contents", [])]
    bundle_manifests = [k for k in keys if k.endswith("bundle/manifest.json")]
    assert len(bundle_manifests) >= 4   # isd and risd, registered by both exports
    bodies = {s3.get_object(Bucket="idlm", Key=k)["Body"].read() for k in bundle_manifests}
    assert set(cluster_run["first_manifests"].values()) <= bodies


def test_champion_still_resolves_to_the_bytes_it_was_set_on(stack, cluster_run) -> None:  # noqa: ANN001
    client = cluster_run["client"]
    for name, version in cluster_run["champion"].items():
        assert client.get_model_version_by_alias(name, "champion").version == version
        latest = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        assert latest > int(version)   # the second export registered a newer version
        kind = client.get_model_version(name, version).tags["kind"]
        with tempfile.TemporaryDirectory() as folder:
            source = client.get_model_version_download_uri(name, version)
            from mlflow.artifacts import download_artifacts

            local = Path(download_artifacts(artifact_uri=source, dst_path=folder,
                                            tracking_uri=stack.tracking_uri))
            manifest = (local / "manifest.json").read_bytes()
            assert manifest == cluster_run["first_manifests"][kind]
            files = json.loads(manifest)["files"]
            for relative, entry in files.items():
                data = (local / relative).read_bytes()
                assert hashlib.sha256(data).hexdigest() == entry["sha256"], relative


def test_a_fresh_clone_pulls_the_run_and_reruns_nothing(stack, cluster_run, tmp_path) -> None:  # noqa: ANN001
    workspace = cluster_run["workspace"]
    branch = cluster_run["summary"]["published"]["branch"]
    from idlm.orchestration.stack import s3_client

    s3 = s3_client(stack, "idlm-test", SECRET_KEY)
    assert s3.list_objects_v2(Bucket="idlm", Prefix="dvc/", MaxKeys=1).get("KeyCount", 0) > 0
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--branch", branch, str(workspace), str(clone)],
                   check=True)
    assert (clone / "dvc.lock").is_file()   # the run branch carries the lock
    _dvc(clone, "remote", "modify", "--local", "storage", "endpointurl", stack.s3_endpoint)
    _dvc(clone, "pull", "-q")
    assert (clone / "outputs/export/isd/manifest.json").is_file()
    status = _dvc(clone, "status")
    assert "up to date" in status, status
    repro = _dvc(clone, "repro")
    assert "Running stage" not in repro, repro


def test_planted_secrets_are_nowhere(stack, cluster_run) -> None:  # noqa: ANN001
    workspace, client = cluster_run["workspace"], cluster_run["client"]
    planted = (SECRET_KEY, DB_PASSWORD)
    texts = {"logs": cluster_run["logs"]}
    for name in ("params.yaml", "dvc.lock", ".dvc/config", ".dvc/config.local", "summary.json"):
        path = workspace / name
        texts[name] = path.read_text() if path.is_file() else ""
    for path in (workspace / "outputs").rglob("*"):
        if path.is_file() and path.stat().st_size < (1 << 20):
            texts[str(path)] = path.read_text(errors="ignore")
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, max_results=1000):
        texts[f"run {run.info.run_id}"] = json.dumps(
            {"params": run.data.params, "tags": run.data.tags})
    assert len(texts) > 10
    leaks = [where for where, text in texts.items() if any(s in text for s in planted)]
    assert not leaks, leaks
