"""`dvc repro` runs every stage in a fresh workspace; a second `dvc repro` runs nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.small_configs import DOWNSTREAM, SMALL

REPO = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "base", "ic", "lora", "verify", "evaluate", "export", "gate"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("IDLM_WORKSPACE", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    for name in ("dvc.yaml", "configs", "stages", "src"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        assert _run(args, root).returncode == 0
    small = [o for o in SMALL if not o.startswith("ic.phases.")]
    used = _run(["idlm", "config", "use", "tiny", *small, *DOWNSTREAM,
                 "ic.phases=[{stride: 2, steps: 4}, {stride: 3, steps: 4}]"], root)
    assert used.returncode == 0, used.stderr
    return root


def test_repro_runs_all_stages_then_nothing(workspace: Path) -> None:
    first = _run(["dvc", "repro"], workspace)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    second = _run(["dvc", "repro"], workspace)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    status = _run(["dvc", "status"], workspace)
    assert "up to date" in status.stdout, status.stdout
    # A param change (edited in params.yaml, as `dvc exp run -S` does) reruns only its stage.
    params = workspace / "params.yaml"
    text = params.read_text()
    assert text.count("  output_tokens: 8\n") == 1  # the gate's (the last stage's) key
    params.write_text(text.replace("  output_tokens: 8\n", "  output_tokens: 9\n"))
    third = _run(["dvc", "repro"], workspace)
    assert third.returncode == 0, third.stderr[-2000:]
    ran = [stage for stage in STAGES if f"Running stage '{stage}'" in third.stdout]
    assert ran == ["gate"]
