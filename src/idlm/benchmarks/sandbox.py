"""Run untrusted candidate code: one process per candidate, in its own namespaces.

Each run gets (when isolation is available, i.e. as root with util-linux ``unshare``):
- a new network namespace (no interfaces but a down loopback: no network at all);
- a new PID namespace (the candidate is PID 1: when it ends, everything it forked dies);
- a private mount namespace with fresh tmpfs over /tmp, /var/tmp, /dev/shm, /run/lock and
  a throwaway working dir /tmp/work inside it (gone when the run ends);
- an unprivileged uid of its own (root ignores RLIMIT_NPROC and file permissions);
- rlimits: address space, CPU seconds, processes, file size, open files, no core files;
- a wall-clock timeout, after which the whole process group is SIGKILLed.

Without isolation, code benchmarks refuse to run unless ``allow_unsandboxed`` is set on
purpose; then candidates run with the rlimits, a temp dir and the timeout only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from idlm.benchmarks._sandbox_launcher import SETUP_FAILED
from idlm.config.downstream import EvalSandbox

LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
UNSHARE_FLAGS = ("--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc")
OUTPUT_KEEP_BYTES = 1 << 16
# Each run gets a random uid from a range no account uses, so concurrent runs (also from
# other processes) do not share an RLIMIT_NPROC count.
FIRST_SANDBOX_UID, SANDBOX_UIDS = 100_000, 1_000_000
SETUP_ATTEMPTS = 3
_uid_random = random.SystemRandom()

Status = Literal["ok", "failed", "timeout"]


class SandboxUnavailable(RuntimeError):
    """No isolation here, and running unsandboxed was not allowed."""


class SandboxError(RuntimeError):
    """The sandbox itself failed to start (never caused by candidate code)."""


@dataclass(frozen=True)
class ExecutionResult:
    """``ok``: exit status 0; ``failed``: any other end; ``timeout``: killed at the limit."""

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


@lru_cache(maxsize=1)
def isolation_available() -> bool:
    """Whether namespaces + a uid drop work here (probed once per process)."""
    unshare = shutil.which("unshare")
    if os.name != "posix" or os.geteuid() != 0 or unshare is None:
        return False
    try:
        probe = subprocess.run([unshare, *UNSHARE_FLAGS, "true"], capture_output=True,
                               timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def isolation_report() -> str:
    """One line for logs and ``idlm score``: what the sandbox can do on this machine."""
    if isolation_available():
        return "namespaces (net, pid, mount) + uid drop + rlimits"
    reason = "not root" if os.name == "posix" and os.geteuid() != 0 else "unshare unusable"
    return f"none ({reason}): code benchmarks need allow_unsandboxed to run"


def check_allowed(settings: EvalSandbox) -> bool:
    """True if runs are isolated; raises if they are not and that was not allowed."""
    if isolation_available():
        return True
    if settings.allow_unsandboxed:
        return False
    raise SandboxUnavailable(
        "code benchmarks run untrusted code, and this machine cannot isolate it "
        f"({isolation_report()}); run as root where `unshare` works, or set "
        "evaluate.sandbox.allow_unsandboxed: true to run candidates with rlimits only (UNSAFE)")


WRITABLE_FOLDERS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # as in the launcher


def _hidden_interpreter_paths() -> list[tuple[str, str]]:
    """(unreadable ancestor, interpreter prefix under it) pairs to bind back in the jail."""
    pairs: list[tuple[str, str]] = []
    for prefix in dict.fromkeys((sys.base_prefix, sys.prefix)):
        path = Path(prefix).resolve()
        for ancestor in reversed(path.parents):
            # Covered by the jail: unreadable to the sandbox uid, or replaced by tmpfs.
            if str(ancestor) in WRITABLE_FOLDERS or not os.stat(ancestor).st_mode & 0o001:
                pairs.append((str(ancestor), str(path)))
                break
    return pairs


def _next_uid() -> int:
    return FIRST_SANDBOX_UID + _uid_random.randrange(SANDBOX_UIDS)


def run_program(files: dict[str, str], main: str, settings: EvalSandbox,
                stdin: str = "", timeout_s: float | None = None) -> ExecutionResult:
    """Run ``python main`` with ``files`` in a fresh jail; never raises for candidate faults."""
    isolate = check_allowed(settings)
    timeout = timeout_s if timeout_s is not None else settings.timeout_s
    staging = Path(tempfile.mkdtemp(prefix="idlm-sandbox-"))
    try:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        spec = {"files": list(files), "main": main, "python": sys.executable,
                "isolate": isolate, "uid": _next_uid(), "hidden": _hidden_interpreter_paths(),
                "memory_mb": settings.memory_mb, "cpu_s": timeout + 1,
                "file_mb": settings.max_file_mb, "processes": settings.max_processes,
                "tmpfs_mb": settings.tmpfs_mb}
        (staging / "spec.json").write_text(json.dumps(spec))
        (staging / "stdin.txt").write_text(stdin, encoding="utf-8")
        command = [sys.executable, "-I", "-S", str(LAUNCHER), str(staging / "spec.json")]
        if isolate:
            command = [shutil.which("unshare") or "unshare", *UNSHARE_FLAGS, *command]
        for attempt in range(SETUP_ATTEMPTS):
            try:
                return _execute(command, staging, timeout)
            except SandboxError:  # transient (a busy uid); a new uid, then give up
                if attempt == SETUP_ATTEMPTS - 1:
                    raise
                spec["uid"] = _next_uid()
                (staging / "spec.json").write_text(json.dumps(spec))
        raise AssertionError("unreachable")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _execute(command: list[str], staging: Path, timeout: float) -> ExecutionResult:
    started = time.perf_counter()
    with (staging / "stdin.txt").open("rb") as stdin, \
            (staging / "stdout.txt").open("wb") as stdout, \
            (staging / "stderr.txt").open("wb") as stderr:
        process = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=stderr,
                                   start_new_session=True, close_fds=True,
                                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(process.pid)
            process.wait()
    seconds = time.perf_counter() - started
    out, err = _read_capped(staging / "stdout.txt"), _read_capped(staging / "stderr.txt")
    if process.returncode == 125 and SETUP_FAILED in err:
        raise SandboxError(err.strip().splitlines()[-1])
    if timed_out:
        return ExecutionResult("timeout", None, out, err, seconds)
    status: Status = "ok" if process.returncode == 0 else "failed"
    return ExecutionResult(status, process.returncode, out, err, seconds)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(path: Path) -> str:
    with path.open("rb") as handle:
        data = handle.read(OUTPUT_KEEP_BYTES + 1)
    text = data[:OUTPUT_KEEP_BYTES].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > OUTPUT_KEEP_BYTES else "")
