"""Run one DVC stage (``dvc repro --single-item <stage>``) and stream its output line by line.

DVC alone decides whether the stage runs: its own output says so ("Running stage",
"didn't change, skipping", or "is cached - skipping run" for a run-cache restore), and
that is what the flow reports. ``--single-item`` keeps DVC from reproducing upstream
stages here: each of those is its own task, earlier in the flow.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RAN, SKIPPED, RESTORED = "ran", "skipped", "restored"
_RUNNING = re.compile(r"^Running stage '(?P<stage>[^']+)'")
_UNCHANGED = re.compile(r"^Stage '(?P<stage>[^']+)' didn't change, skipping")
_RESTORED = re.compile(r"^Stage '(?P<stage>[^']+)' is cached - skipping run")
ERROR_LINES = 30  # lines of output kept as a failed stage's error text
LOG_LINES = 20_000  # lines kept for the stage log artifact
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")
_EXCEPTION = re.compile(r"^(error: |[\w.]*(Error|Exception|Interrupt|Exit)\b:?)")


@dataclass
class StageOutcome:
    stage: str
    status: str  # RAN, SKIPPED or RESTORED (from DVC's own words)
    seconds: float
    log: list[str] = field(default_factory=list)
    task_run_id: str = ""


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage exited non-zero. The message is one line (the error the
    stage printed last); ``details`` holds the last lines of its output."""

    def __init__(self, stage: str, returncode: int, tail: list[str],
                 log: list[str] | None = None) -> None:
        self.stage, self.returncode, self.tail = stage, returncode, tail
        self.log = log or tail
        self.cause = error_line(tail)
        super().__init__(f"stage '{stage}' failed (`dvc repro` exit code {returncode})"
                         + (f": {self.cause}" if self.cause else ""))

    @property
    def details(self) -> str:
        return f"{self}\n\nlast lines of its output:\n" + "\n".join(self.tail)


def error_line(lines: list[str]) -> str:
    """The last line that names an exception (``ValueError: ...``), else the last line."""
    cleaned = [_RANK_PREFIX.sub("", line).strip() for line in lines]
    for line in reversed(cleaned):
        if _EXCEPTION.match(line):
            return line
    return cleaned[-1] if cleaned else ""


def repro_command(stage: str) -> list[str]:
    return [sys.executable, "-m", "dvc", "repro", "--single-item", stage]


def stage_environment() -> dict[str, str]:
    """The flow's environment, with this interpreter's ``bin`` first on PATH (dvc.yaml runs
    ``python stages/...``) and unbuffered output so progress lines arrive as they happen."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MLFLOW_RUN_ID", None)  # runs are chosen explicitly, never inherited
    return env


def status_of(stage: str, lines: list[str]) -> str:
    """What DVC did with ``stage``, read from its own output."""
    for pattern, status in ((_RUNNING, RAN), (_RESTORED, RESTORED)):
        if any((m := pattern.match(line)) and m["stage"] == stage for line in lines):
            return status
    return SKIPPED


def _stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """Interrupt DVC *and the stage it runs* the way Ctrl-C in a terminal would (DVC then
    releases its lock, the stage saves nothing half-written), then insist. Signalling DVC
    alone would orphan the stage process, still holding CPUs, files and DVC's lock."""
    import psutil

    if process.poll() is not None:
        return
    try:
        tree = [psutil.Process(process.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGINT)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    process.wait()


def stream(command: list[str], cwd: Path, on_line: Callable[[str], None],
           env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run ``command``, passing each output line (stdout and stderr, ``\\r`` too) to
    ``on_line`` as it comes; returns the exit code and the kept lines."""
    log: deque[str] = deque(maxlen=LOG_LINES)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace",
                               bufsize=1, stdin=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        for raw in process.stdout:  # text mode splits on \n and \r (progress bars)
            line = raw.rstrip()
            if line:
                log.append(line)
                on_line(line)
        return process.wait(), list(log)
    except BaseException:  # Ctrl-C, cancellation: never leave DVC running unattended
        _stop(process)
        raise


def repro_stage(stage: str, workspace: Path, on_line: Callable[[str], None] = print,
                command: list[str] | None = None) -> StageOutcome:
    """``dvc repro --single-item stage`` in ``workspace``; raises :class:`StageFailed`."""
    began = time.perf_counter()
    returncode, log = stream(command or repro_command(stage), workspace, on_line,
                             stage_environment())
    if returncode != 0:
        raise StageFailed(stage, returncode, log[-ERROR_LINES:], log)
    return StageOutcome(stage, status_of(stage, log), time.perf_counter() - began, log)
