"""The suite's one trained workspace: a git + DVC workspace with the `test` profile
(configs/test.yaml) that the Prefect flow `idlm-full` trains end to end once per test run.

The stage tests read its outputs (and run stages again on copies of them); the `dvc repro`
test and the flow's checks of failure, rerun and refusal work on it or on copies of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from idlm.config import pipeline_stages

REPO = Path(__file__).resolve().parents[1]
STAGES = pipeline_stages(REPO)
PROFILE = "test"
LOG_PAGE = 200
# Valid for the config schema, rejected by DeepSpeed when `base` starts training.
BROKEN = "base.train.deepspeed=configs/deepspeed/broken.json"
# MLflow's embedded store: a copy that keeps it would log into the original's artifacts.
_TRACKING = ("mlflow.db", "mlartifacts")


def free_port() -> int:
    """A TCP port free on loopback now (the servers the tests start bind it next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def make_workspace(root: Path) -> Path:
    """A fresh workspace as a user's clone is: the DAG, configs, stage scripts, sources."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", "configs", "stages", "src"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    (root / "configs/deepspeed/broken.json").write_text('{"zero_optimization": {"stage": 7}}')
    git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "workspace")
    return root


def copy_workspace(source: Path, target: Path, tracking: bool = False) -> Path:
    """A copy of a trained workspace (git, DVC cache and lock, outputs); MLflow's store
    only when ``tracking`` (then new runs' artifacts still go to the source's folder)."""
    skip = () if tracking else _TRACKING
    shutil.copytree(source, target, symlinks=True,
                    ignore=lambda folder, names: [n for n in names
                                                  if Path(folder) == source and n in skip])
    return target


def prefect_flow_facts(flow_run_id: str) -> dict[str, Any]:
    """What Prefect holds about a flow run: its state, task names, log messages."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    run_id = UUID(flow_run_id)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[run_id])))
        logs, page = [], LOG_PAGE
        while page == LOG_PAGE:   # the API returns at most its default limit per call
            batch = client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=LOG_PAGE,
                offset=len(logs), sort=LogSort.TIMESTAMP_ASC)
            logs, page = logs + batch, len(batch)
    return {"failed": state.is_failed(), "completed": state.is_completed(),
            "tasks": sorted(t.name for t in tasks), "messages": [log.message for log in logs]}


def kill_after(dvc_args: list[str], workspace: Path, delay: float,
               once: Callable[[], bool] | None = None) -> bool:
    """Start ``dvc <dvc_args>`` in ``workspace``, SIGKILL its whole process group (DVC and
    the stage it runs) ``delay`` s after the start (or after ``once()`` first holds); True
    when it was still running then."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for name in ("IDLM_WORKSPACE", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    process = subprocess.Popen([sys.executable, "-m", "dvc", *dvc_args], cwd=workspace,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        while once is not None and not once():
            if process.poll() is not None:
                return False
            time.sleep(0.05)
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True
