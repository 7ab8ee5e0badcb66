"""`dvc repro` on a copy of the suite's trained workspace (the flow ran every stage there
through `dvc repro --single-item`): nothing to run and `dvc status` clean; then a param
change reruns only the stage that reads it, the gate: killed at a random point it records
nothing and moves no alias, and the rerun completes and promotes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from idlm import tracking
from tests.workspace import STAGES, copy_workspace, kill_after

MODEL, ALIAS = "idlm-isd", "champion"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("IDLM_WORKSPACE", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_repro_of_the_flows_workspace_runs_nothing_then_only_a_changed_stage(
        trained_workspace: dict, tmp_path: Path) -> None:
    # With its MLflow store: the gate promotes in the registry that export wrote to.
    workspace = copy_workspace(trained_workspace["root"], tmp_path / "workspace", tracking=True)
    first = _run(["dvc", "repro"], workspace)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Running stage" not in first.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in first.stdout
    status = _run(["dvc", "status"], workspace)
    assert "up to date" in status.stdout, status.stdout
    # A param change (edited in params.yaml, as `dvc exp run -S` does) reruns only its stage.
    params = workspace / "params.yaml"
    text = params.read_text()
    assert text.count("  output_tokens: 8\n") == 1  # the gate's (the last stage's) key
    params.write_text(text.replace("  output_tokens: 8\n", "  output_tokens: 9\n"))
    # Killed while it measures: nothing locked, no promotion (the alias is unset first).
    tracking._registry_tracker(workspace).client.delete_registered_model_alias(MODEL, ALIAS)
    gate_seconds = next(row["seconds"] for row in trained_workspace["summary"]["stages"]
                        if row["stage"] == "gate")
    delay = random.Random(13).uniform(0.3, 0.8) * gate_seconds
    assert kill_after(["repro"], workspace, delay), f"the gate finished within {delay:.0f}s"
    assert (workspace / "dvc.lock").read_bytes() == trained_workspace["lock"]
    assert tracking.get_alias(MODEL, ALIAS, workspace=workspace) is None
    again = _run(["dvc", "repro"], workspace)
    assert again.returncode == 0, again.stderr[-2000:]
    ran = [stage for stage in STAGES if f"Running stage '{stage}'" in again.stdout]
    assert ran == ["gate"]
    assert (workspace / "dvc.lock").read_bytes() != trained_workspace["lock"]
    assert tracking.get_alias(MODEL, ALIAS, workspace=workspace) is not None  # promoted
