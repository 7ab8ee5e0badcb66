"""Kill anywhere, lose nothing: on a copy of the trained workspace, every stage in turn is
rerun with `dvc repro --force --single-item` and SIGKILLed (DVC and the stage, the whole
process group) at a random point of its run; then `dvc repro` of that stage completes.

After each kill dvc.lock records no partial output (it is byte for byte as before, or,
when the run had finished as the kill landed, it matches what is on disk); after each
rerun the stage is up to date; evaluate resumes the sample records the killed run wrote.
The gate is killed in test_dvc_pipeline (a killed gate never moves the registry alias).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.workspace import STAGES, copy_workspace, kill_after

pytestmark = pytest.mark.slow
SEED = 15  # the kill points are random, and reproducible


def _env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("IDLM_WORKSPACE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _dvc(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _records(folder: Path) -> int:
    """Complete sample records in evaluate's logs (a torn last line does not count)."""
    count = 0
    for log in folder.rglob("*.jsonl"):
        for line in log.read_text().splitlines()[1:]:
            try:
                json.loads(line)
                count += 1
            except json.JSONDecodeError:
                pass
    return count


def test_a_stage_killed_at_a_random_point_reruns_and_records_nothing_partial(
        trained_workspace: dict, tmp_path: Path) -> None:
    workspace = copy_workspace(trained_workspace["root"], tmp_path / "workspace",
                               tracking=True)
    seconds = {row["stage"]: row["seconds"] for row in trained_workspace["summary"]["stages"]}
    chance = random.Random(SEED)
    killed = []
    for stage in STAGES[:-1]:
        if stage == "evaluate":  # a fresh evaluation, so the kill interrupts sampling
            for log in (workspace / "outputs/evaluate/samples").rglob("*.jsonl"):
                log.unlink()
        lock = (workspace / "dvc.lock").read_bytes()
        delay = chance.uniform(0.2, 0.7) * max(seconds[stage], 2.0)
        once = None
        if stage == "evaluate":  # while it samples: just after its first record
            delay = chance.uniform(0.0, 0.3)
            once = lambda: _records(workspace / "outputs/evaluate/samples") > 0  # noqa: E731
        began = time.monotonic()
        was_killed = kill_after(["repro", "--force", "--single-item", stage], workspace, delay,
                                once)
        if was_killed:
            killed.append(stage)
        if (workspace / "dvc.lock").read_bytes() != lock:
            # Locked: the run had finished (before the kill, or as it landed); whatever DVC
            # recorded must be what is on disk, never a partial output.
            recorded = _dvc(workspace, "status", stage)
            assert "changed" not in recorded.stdout and "deleted" not in recorded.stdout, \
                f"{stage}: dvc.lock records outputs that are not on disk: {recorded.stdout}"
        written = _records(workspace / "outputs/evaluate/samples")
        rerun = _dvc(workspace, "repro", "--single-item", stage)
        assert rerun.returncode == 0, f"{stage} after a kill at {delay:.1f}s " \
            f"({time.monotonic() - began:.0f}s): {rerun.stdout[-1500:]}{rerun.stderr[-1500:]}"
        status = _dvc(workspace, "status", stage)
        assert "changed" not in status.stdout and "deleted" not in status.stdout, status.stdout
        print(f"kill {stage}: at {delay:.1f}s of ~{seconds[stage]:.0f}s, "
              f"{'killed' if was_killed else 'had finished'}; rerun ok, up to date"
              + (f", {written} sample records kept" if stage == "evaluate" else ""))
        if stage == "evaluate":
            results = json.loads((workspace / "outputs/evaluate/scores.json").read_text())
            assert sum(r["resumed"] for r in results["results"]) == written
            assert all(r["resumed"] + r["generated"] == r["samples"]
                       for r in results["results"])
    # Most kill points land inside the stage's own run (DVC's start-up is a second or two).
    assert len(killed) >= len(STAGES) - 3, killed
