"""The Prefect flow `idlm-full` end to end, on the suite's trained workspace.

The session fixture `trained_workspace` (tests/conftest.py) is one flow run of the `test`
profile that ran every stage. This module adds, in order:
1. on a copy of it, an override makes `base` fail at run time -> flow, its MLflow child and
   parent FAILED with the error text, nothing downstream ran, the lock untouched;
2. in it, the README command (ephemeral Prefect, no server started by hand) with no
   parameters -> no stage runs; it ends with the summary table and leaves no server behind.
Then: a second run while one holds the workspace is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from flows.idlm_full import idlm_full
from idlm import tracking
from idlm.orchestration.lock import WorkspaceBusy, holder_info, workspace_lock
from idlm.orchestration.run import PipelineFailed
from tests.workspace import (
    BROKEN,
    PROFILE,
    REPO,
    STAGES,
    copy_workspace,
    git,
    prefect_flow_facts,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(trained_workspace: dict) -> Path:
    return trained_workspace["root"]


def _readme_command(workspace: Path, prefect_home: Path, *args: str) -> tuple[Any, dict]:
    """`python flows/idlm_full.py` as the README runs it: no Prefect server configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    summary = prefect_home / "summary.json"
    done = subprocess.run([sys.executable, str(REPO / "flows/idlm_full.py"), "--json",
                           str(summary), *args], cwd=workspace, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done, json.loads(summary.read_text())


@pytest.fixture(scope="module")
def runs(trained_workspace: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: dict[str, Any] = {"fixed": trained_workspace["summary"],
                           "lock_after_fixed": trained_workspace["lock"]}
    broken = copy_workspace(trained_workspace["root"],
                            tmp_path_factory.mktemp("failing") / "workspace")
    with pytest.raises(PipelineFailed) as failed:
        idlm_full(profile=PROFILE, overrides=[BROKEN], workspace=str(broken))
    out["failed"], out["broken"] = failed.value, broken
    out["after_failure"] = {"lock": (broken / "dvc.lock").read_bytes(),
                            "outputs": sorted(p.name for p in (broken / "outputs").iterdir())}
    out["prefect_home"] = tmp_path_factory.mktemp("prefect-home")
    out["cli"], out["again"] = _readme_command(trained_workspace["root"], out["prefect_home"])
    return out


def _client(workspace: Path) -> Any:
    return tracking.open_tracker(workspace, rank=0).client


def _family(workspace: Path, parent_id: str) -> tuple[Any, dict[str, Any]]:
    client = _client(workspace)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return parent, {child.info.run_name: child for child in children}


def _parent_of_failed_run(workspace: Path) -> str:
    client = _client(workspace)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    failed = client.search_runs([experiment.experiment_id],
                                f"attributes.status = 'FAILED' and tags.profile = '{PROFILE}'")
    (parent,) = [r for r in failed if "mlflow.parentRunId" not in r.data.tags]
    return parent.info.run_id


def test_a_failing_stage_fails_the_run_and_stops_what_is_downstream(
        runs: dict[str, Any]) -> None:
    error, broken = runs["failed"], runs["broken"]
    assert "base" in str(error) and "DeepSpeedZeroConfig" not in str(error)
    assert ["base", "failed"] in [line.split()[:2] for line in error.summary.splitlines()]
    parent, children = _family(broken, _parent_of_failed_run(broken))
    assert parent.info.status == "FAILED" and "ValidationError" in parent.data.tags["error"]
    assert set(children) == {"prepare", "base"}  # nothing downstream of base started
    assert children["prepare"].info.status == "FINISHED"
    assert children["prepare"].data.tags["skipped"] == "true"  # up to date: DVC skipped it
    base = children["base"]
    assert base.info.status == "FAILED" and base.data.tags["dvc.status"] == "failed"
    assert "DeepSpeedZeroConfig" in base.data.tags["error"]
    assert prefect_flow_facts(parent.data.tags["prefect.flow_run_id"])["failed"]
    # Upstream outputs intact; nothing of the failed stage was locked.
    assert runs["after_failure"]["lock"] == runs["lock_after_fixed"]
    assert "prepare" in runs["after_failure"]["outputs"]


def test_the_flow_ran_every_stage_and_left_dvc_up_to_date(runs: dict[str, Any],
                                                           workspace: Path) -> None:
    fixed = runs["fixed"]
    assert fixed["state"] == "COMPLETED"
    assert [(s["stage"], s["status"]) for s in fixed["stages"]] == [
        (stage, "ran") for stage in STAGES]
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=workspace,
                            capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout


def test_mlflow_holds_a_parent_and_a_child_per_stage(runs: dict[str, Any], workspace: Path,
                                                     tmp_path: Path) -> None:
    fixed = runs["fixed"]
    parent, children = _family(workspace, fixed["parent_run_id"])
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and tags["profile"] == PROFILE
    assert tags["prefect.flow_run_id"] == fixed["flow_run_id"]
    assert tags["git.commit"] == git(workspace, "rev-parse", "HEAD")
    assert tags["dvc.lock_sha256"] == hashlib.sha256(runs["lock_after_fixed"]).hexdigest()
    assert "overrides" not in parent.data.params  # the run was given none
    assert set(children) == set(STAGES)
    prepare, base, ic = children["prepare"], children["base"], children["ic"]
    assert prepare.data.tags["skipped"] == "false"
    assert prepare.data.metrics["train.rows"] == 300
    assert base.data.tags["skipped"] == "false" and base.data.params["base.train.steps"] == "6"
    assert base.data.params["model.tiny.hidden_size"] == "64" and "lora.rank" not in \
        base.data.params
    client = _client(workspace)
    curve = client.get_metric_history(base.info.run_id, "history/loss")
    assert [m.step for m in curve] == [2, 4, 6]
    assert {m.key for m in client.get_metric_history(ic.info.run_id,
                                                     "history/phase2-N4/mask_ce")}
    artifacts = {a.path for a in client.list_artifacts(base.info.run_id)} | {
        a.path for folder in ("metrics", "plots", "outputs")
        for a in client.list_artifacts(base.info.run_id, folder)}
    assert {"metrics/metrics.json", "plots/loss.png", "plots/history.json",
            "outputs/base.json", "stage.log", "dvc_outputs.json"} <= artifacts
    assert "outputs/model" not in artifacts  # weights are referenced, not copied
    refs = json.loads(Path(client.download_artifacts(base.info.run_id, "dvc_outputs.json",
                                                     str(tmp_path))).read_text())
    model = next(r for r in refs if r["path"] == "outputs/base/model")
    assert model["md5"] in runs["lock_after_fixed"].decode() and not model["artifact"]
    assert base.data.tags["dvc.out.outputs/base/model"] == model["md5"]


def test_tasks_are_named_after_stages_and_progress_reaches_the_prefect_log(
        runs: dict[str, Any]) -> None:
    facts = prefect_flow_facts(runs["fixed"]["flow_run_id"])
    assert facts["completed"] and facts["tasks"] == sorted(STAGES)
    messages = facts["messages"]
    assert "Running stage 'base':" in messages
    assert any(m.startswith("[base] step 2/6") for m in messages)  # the stage's own progress


def test_a_rerun_executes_no_stage(runs: dict[str, Any], workspace: Path) -> None:
    again = runs["again"]
    assert [s["status"] for s in again["stages"]] == ["skipped"] * len(STAGES)
    assert (workspace / "dvc.lock").read_bytes() == runs["lock_after_fixed"]
    _, children = _family(workspace, again["parent_run_id"])
    assert {c.data.tags["skipped"] for c in children.values()} == {"true"}
    assert children["lora"].data.metrics["mask_ce"] == _family(
        workspace, runs["fixed"]["parent_run_id"])[1]["lora"].data.metrics["mask_ce"]


def test_a_second_run_in_the_same_workspace_is_refused(runs: dict[str, Any],
                                                       workspace: Path) -> None:
    before = (workspace / "params.yaml").read_bytes()
    with workspace_lock(workspace, holder_info("0000-run", "first-run")):
        with pytest.raises(WorkspaceBusy, match="first-run.*is still running"):
            idlm_full(profile=PROFILE, workspace=str(workspace))
    assert (workspace / "params.yaml").read_bytes() == before


def _servers_for(prefect_home: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "prefect.server.api.server:create_app" in " ".join(
                    process.info["cmdline"] or []) and process.environ().get(
                    "PREFECT_HOME") == str(prefect_home):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_the_readme_command_needs_no_server_and_ends_with_the_summary(
        runs: dict[str, Any], workspace: Path) -> None:
    lines = runs["cli"].stdout.strip().splitlines()
    tail = lines[max(i for i, line in enumerate(lines) if line.startswith("idlm-full ")):]
    # headline, table header, a row per stage, where to look: the output ends there
    assert len(tail) == 4 + len(STAGES) + 4
    assert tail[0].startswith("idlm-full COMPLETED: flow run '")
    assert f"({len(STAGES)} skipped)" in tail[0]
    assert tail[3].split()[:2] == ["prepare", "skipped"] and "rows_read=" in tail[3]
    assert tail[6].split()[:2] == ["lora", "skipped"] and "mask_ce=" in tail[6]
    db = (workspace / "mlflow.db").resolve()
    assert tail[-3].strip() == (f"MLflow   mlflow ui --backend-store-uri sqlite:///{db}   "
                                f"(parent run {runs['again']['parent_run_id']})")
    assert _servers_for(runs["prefect_home"]) == []  # the ephemeral server is gone
