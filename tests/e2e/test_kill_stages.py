"""Kill anywhere, lose nothing: on a copy of the trained workspace, every stage in turn is
rerun with `dvc repro --force --single-item` and SIGKILLed (DVC and the stage, the whole
process group) at a random point of its run; then `dvc repro` of that stage completes. The
point is drawn from the stage's time in the flow; a stage that finishes before it (the
flow ran beside other work) is run again and killed inside the time it just took.

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
ATTEMPTS = 2  # a stage that finished before its kill point is run and killed once more


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


def _check_lock(workspace: Path, stage: str, before: bytes) -> None:
    """If the run got locked (it finished before the kill, or as it landed), what DVC
    recorded is what is on disk, never a partial output."""
    if (workspace / "dvc.lock").read_bytes() != before:
        recorded = _dvc(workspace, "status", stage)
        assert "changed" not in recorded.stdout and "deleted" not in recorded.stdout, \
            f"{stage}: dvc.lock records outputs that are not on disk: {recorded.stdout}"


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
        for _ in range(ATTEMPTS):
            started = time.monotonic()
            was_killed = kill_after(["repro", "--force", "--single-item", stage], workspace,
                                    delay, once)
            _check_lock(workspace, stage, lock)
            if was_killed or once is not None:
                break
            # It finished first: the flow's figure was taken with the other worker busy. Its
            # own run time now is known; draw the kill point again inside it.
            delay = chance.uniform(0.2, 0.7) * (time.monotonic() - started)
            lock = (workspace / "dvc.lock").read_bytes()
        if was_killed:
            killed.append(stage)
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
