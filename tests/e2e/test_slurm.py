"""Slurm, for real: a one-node cluster on loopback (Debian's slurm-wlm 22.05 + munge,
``idlm.cluster.slurm_stack``) runs a training stage that a Prefect deployment started.

prefect-slurm needs Slurm's REST API (>= 23.11), which 22.05 lacks, so the flow's stage
task runs ``dvc repro``, whose command is ``python -m idlm.cluster.launch``: with
``cluster.launch: slurm`` that is ``sbatch --wait`` of ``srun``, two tasks on this host,
two torch ranks over gloo. A process worker picks the deployment's run up, as on a
cluster's login node. Then: moving the same global batch back to one local rank reruns
nothing (DVC tracks the global batch, not the topology).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.workspace import PROFILE, REPO, copy_workspace, prefect_flow_facts

pytestmark = pytest.mark.slow

POOL = "idlm-slurm-test"
# Two ranks of micro-batch 8: grad_accum 1 on Slurm, 2 on one local rank.
GLOBAL_BATCH = "base.train.global_batch_size=16"


@pytest.fixture(scope="module")
def slurm():  # noqa: ANN201 - the cluster's client environment
    from idlm.cluster import slurm_stack

    root = Path(tempfile.mkdtemp(prefix="idlm-slurm-"))
    with pytest.MonkeyPatch.context() as patch:
        try:
            client_env = slurm_stack.start(root)
            for key, value in client_env.items():
                patch.setenv(key, value)
            yield client_env
        finally:
            slurm_stack.stop(root)
            shutil.rmtree(root, ignore_errors=True)


def _deploy_and_run(workspace: Path, parameters: dict[str, Any]) -> str:
    """Deploy idlm-full from this checkout to a process pool, schedule one run, let a
    `prefect worker --run-once` execute it; returns the flow run id."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    from flows.idlm_full import idlm_full

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        except ObjectAlreadyExists:
            pass
    source = idlm_full.from_source(source=str(REPO), entrypoint="flows/idlm_full.py:idlm_full")
    source.deploy(name="slurm", work_pool_name=POOL, build=False, push=False,
                  print_next_steps=False)
    run = run_deployment("idlm-full/slurm", parameters=parameters, timeout=0)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    worker = subprocess.run(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type",
         "process", "--run-once"], cwd=workspace, env=env, capture_output=True, text=True,
        timeout=900)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    return str(run.id)


@pytest.fixture(scope="module")
def slurm_run(slurm: dict, prefect_api, trained_snapshot: dict,  # noqa: ANN001
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workspace = copy_workspace(trained_snapshot["root"],
                               tmp_path_factory.mktemp("slurm") / "workspace")
    overrides = ["cluster.launch=slurm", "cluster.processes_per_node=2", GLOBAL_BATCH]
    run_id = _deploy_and_run(workspace, {"profile": PROFILE, "only": ["base"],
                                         "overrides": overrides,
                                         "workspace": str(workspace)})
    return {"workspace": workspace, "facts": prefect_flow_facts(run_id)}


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True,
                         text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def test_deployment_trains_base_through_sbatch_on_two_ranks(slurm_run: dict) -> None:
    facts, workspace = slurm_run["facts"], slurm_run["workspace"]
    assert facts["completed"], "\n".join(facts["messages"][-25:])
    logs = sorted((workspace / "logs" / "slurm").glob("base-*.log"))
    assert len(logs) == 1
    job = _scontrol(logs[0].stem.split("-")[-1])
    assert (job["JobState"], job["NumTasks"], job["ExitCode"]) == ("COMPLETED", "2", "0:0")
    # Each rank prints its metrics; rank 0 alone wrote the outputs.
    printed = logs[0].read_text().count('"stage": "base"')
    assert printed == 2
    metrics = json.loads((workspace / "outputs/base/metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["train_loss"] > 0
    assert any("launch: slurm job" in message for message in facts["messages"])


def test_moving_the_global_batch_to_one_local_rank_reruns_nothing(slurm_run: dict) -> None:
    workspace = slurm_run["workspace"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "idlm.cli", "config", "use", PROFILE, GLOBAL_BATCH],
                   cwd=workspace, env=env, check=True, capture_output=True)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "base"], cwd=workspace,
                            env=env, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout
