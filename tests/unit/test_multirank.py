"""Two CPU ranks over gloo: ZeRO 0-3 train, checkpoint and resume through the same trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.workspace import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "fixtures" / "multirank_train.py"


def _torchrun(root: Path, launch: str) -> None:
    # Its own extensions folder: what DeepSpeed compiles at start-up shows there.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", str(SCRIPT), str(root), launch],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _result(root: Path, zero_stage: int, name: str) -> dict:
    return json.loads((root / f"zero{zero_stage}" / name / "result.json").read_text())


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two launches of two ranks: straight and killed runs, then the resumes."""
    root = tmp_path_factory.mktemp("multirank")
    _torchrun(root, "first")
    killed = {z: _result(root, z, "resumed") for z in (2, 3)}
    _torchrun(root, "resume")
    return {"root": root, "killed": killed}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_train_and_resume(zero_stage: int, launches: dict) -> None:
    straight = _result(launches["root"], zero_stage, "straight")
    assert straight["finished"] and straight["steps"] == 6 and straight["weights"] > 0
    assert straight["losses"][-1] < straight["losses"][0]
    killed = launches["killed"][zero_stage]
    assert not killed["finished"] and killed["steps"] == 3
    resumed = _result(launches["root"], zero_stage, "resumed")
    assert resumed["finished"]
    assert resumed["checksum"] == pytest.approx(straight["checksum"], rel=1e-5)


@pytest.mark.slow
def test_starting_compiles_no_deepspeed_op(launches: dict) -> None:
    """DeepSpeed's CPU shared-memory op is never built: compiling it cost the first stage
    on a fresh machine about a minute, and a stage killed while it compiled left a lock
    that hung every later one."""
    built = launches["root"] / "torch_extensions"
    assert not list(built.rglob("deepspeed_shm_comm*")), sorted(built.rglob("*"))
