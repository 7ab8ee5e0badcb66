"""Cluster storage pieces that need no running stack: credentials, run branches, manifests.

The stack itself (PostgreSQL + SeaweedFS + MLflow, started for real) is tested in
tests/e2e/test_storage.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from idlm.orchestration import stack, storage
from tests.workspace import REPO, git

SECRET_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"}


def test_the_stack_names_missing_secrets_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(stack.StackError) as error:
        stack.start(Path("/nonexistent/never-created"))
    message = str(error.value)
    assert "AWS_SECRET_ACCESS_KEY, PGPASSWORD" in message and "\n" not in message
    assert not Path("/nonexistent/never-created").exists()   # refused before any work


def test_stack_cli_without_a_running_stack_is_one_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert stack.main(["env", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no stack is running") and "\n" not in err


def test_run_branches_are_valid_refs() -> None:
    assert storage.run_branch("fair-condor") == "idlm-runs/fair-condor"
    assert storage.run_branch("a b/../c:d") == "idlm-runs/a-b-c-d"
    assert storage.run_branch("") == "idlm-runs/run"


def test_the_run_branch_records_the_lock_and_leaves_the_checkout_alone(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    git(workspace, "init", "-q")
    (workspace / "dvc.yaml").write_text("stages: {}\n")
    (workspace / "params.yaml").write_text("seed: 0\n")
    git(workspace, "add", "-A")
    git(workspace, "commit", "-q", "-m", "start")
    head, branch = git(workspace, "rev-parse", "HEAD"), git(workspace, "branch", "--show-current")
    (workspace / "dvc.lock").write_text("schema: '2.0'\n")
    (workspace / "params.yaml").write_text("seed: 1\n")
    commit = storage._commit_on_branch(workspace, "idlm-runs/r1", "run r1")
    assert git(workspace, "rev-parse", "HEAD") == head                 # nothing checked out
    assert git(workspace, "branch", "--show-current") == branch
    assert git(workspace, "diff", "--cached", "--name-only") == ""    # the index untouched
    assert git(workspace, "ls-files", "--others") == "dvc.lock"
    assert git(workspace, "rev-parse", "idlm-runs/r1") == commit
    assert git(workspace, "show", "idlm-runs/r1:dvc.lock") == "schema: '2.0'"
    assert git(workspace, "show", "idlm-runs/r1:params.yaml") == "seed: 1"
    assert git(workspace, "rev-parse", "idlm-runs/r1^") == head


def test_publishing_without_a_remote_says_what_to_configure(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    git(workspace, "init", "-q")
    subprocess.run(["python", "-m", "dvc", "init", "-q"], cwd=workspace, check=True)
    with pytest.raises(Exception) as error:
        storage.publish_run(workspace, "r")
    assert "dvc remote add -d" in str(error.value)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders kustomizations")
def test_the_cluster_manifests_render_and_take_secrets_by_reference() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(REPO / "infra/tracking/k8s")],
                              capture_output=True, text=True, check=True).stdout
    objects = [o for o in yaml.safe_load_all(rendered) if o]
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    assert kinds == ["Deployment/mlflow", "Namespace/idlm", "Service/mlflow",
                     "Service/postgres", "Service/s3", "StatefulSet/postgres",
                     "StatefulSet/seaweedfs"]
    secrets_seen = set()
    for obj in objects:
        for container in obj.get("spec", {}).get("template", {}).get("spec", {}).get(
                "containers", []):
            for variable in container.get("env", []):
                if variable["name"] in SECRET_NAMES | {"POSTGRES_PASSWORD"}:
                    assert "value" not in variable, variable            # never a literal
                    assert variable["valueFrom"]["secretKeyRef"]["name"] == "idlm-storage"
                    secrets_seen.add(variable["name"])
            assert "password" not in " ".join(container.get("args", [])).lower()
    assert SECRET_NAMES <= secrets_seen
