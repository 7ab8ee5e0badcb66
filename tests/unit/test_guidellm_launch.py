"""The gate starts guidellm through ``idlm.serving.gate.guidellm_launch`` (its CLI with the
forkserver preloaded): the launcher must be guidellm's CLI, arguments and exit code."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idlm.serving.gate.guidellm_launch", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_launcher_is_guidellms_cli() -> None:
    done = launch("--version")
    assert done.returncode == 0, done.stderr
    assert version("guidellm") in done.stdout
    assert launch("run", "--no-such-option").returncode != 0


def test_passes_refuses_missing_scenarios_in_one_line(tmp_path) -> None:
    done = launch("passes", str(tmp_path / "absent.json"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "absent.json" in done.stderr
