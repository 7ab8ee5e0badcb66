"""Sandbox containment: hostile candidates are stopped, scored as failed, and the next
candidate still runs. Without isolation, code benchmarks refuse unless opted in."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from idlm.benchmarks import get_benchmark, sandbox
from idlm.benchmarks.sandbox import SandboxUnavailable, run_program
from idlm.config.downstream import EvalSandbox

LIMITS = EvalSandbox(timeout_s=2, memory_mb=512, max_processes=16, max_file_mb=4)
needs_isolation = pytest.mark.skipif(not sandbox.isolation_available(),
                                     reason="needs root and a working `unshare`")
LIMIT_NOT_CLOCK_S = 60.0
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"


def run(code: str, timeout_s: float | None = None) -> sandbox.ExecutionResult:
    return run_program({"main.py": code}, "main.py", LIMITS, timeout_s=timeout_s)


@needs_isolation
def test_no_network() -> None:
    result = run("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n")
    assert result.status == "failed" and "Network is unreachable" in result.stderr
    result = run("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n")
    assert result.status == "failed"


@needs_isolation
def test_writes_outside_the_work_dir_do_not_land(tmp_path: Path) -> None:
    target = Path(__file__).resolve().parents[2] / "SANDBOX_ESCAPE.txt"
    result = run(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "Permission denied" in result.stderr
    assert not target.exists()
    # /tmp is a private, throwaway tmpfs: the write succeeds inside and vanishes.
    marker = f"/tmp/idlm-sandbox-marker-{os.getpid()}"
    result = run(f"import os\nopen({marker!r}, 'w').write('x')\nprint(os.getcwd())\n")
    assert result.status == "ok" and result.stdout.strip() == "/tmp/work"
    assert not Path(marker).exists()


@needs_isolation
def test_runs_unprivileged_without_the_host_home() -> None:
    result = run("import os\nprint(os.getuid(), sorted(os.listdir('/root')))\n")
    uid, listing = result.stdout.split(" ", 1)
    assert int(uid) >= sandbox.FIRST_SANDBOX_UID and listing.strip() in ("[]", "['.pyenv']")


@needs_isolation
def test_fork_bomb_is_contained_and_cleaned_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_next_uid", lambda: BOMB_UID)
    result = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                 "        pass\n", timeout_s=1.0)
    assert result.status == "timeout"
    deadline = time.monotonic() + 5  # the kernel reaps a dead namespace asynchronously
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes() == []


BOMB_UID = sandbox.FIRST_SANDBOX_UID - 1  # outside the random range: ours alone


def _sandbox_processes() -> list[str]:
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and _owner(pid) == BOMB_UID]


def _owner(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return -1


@needs_isolation
def test_endless_loop_memory_hog_and_huge_output_are_stopped() -> None:
    assert run("while True:\n    pass\n", timeout_s=1.0).status == "timeout"
    # Each of these is stopped by its rlimit, not the clock: a wall-clock limit far above
    # what they take keeps a loaded CI machine (paging 512 MiB in) from ending them first.
    hog = run("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n",
              timeout_s=LIMIT_NOT_CLOCK_S)
    assert hog.status == "failed" and "MemoryError" in hog.stderr
    flood = run("while True:\n    print('y' * 4096)\n", timeout_s=LIMIT_NOT_CLOCK_S)
    assert flood.status == "failed" and len(flood.stdout) <= sandbox.OUTPUT_KEEP_BYTES + 40
    big = run("open('big.bin', 'wb').write(b'0' * (8 << 20))\n", timeout_s=LIMIT_NOT_CLOCK_S)
    assert big.status == "failed" and "File too large" in big.stderr


@needs_isolation
def test_hostile_answers_fail_and_the_run_goes_on() -> None:
    bench = get_benchmark("humaneval", LIMITS)
    problem = bench.load(str(FIXTURES / "humaneval.jsonl"))[0]
    hostile = [
        "```python\nimport socket\nsocket.create_connection(('8.8.8.8', 53))\n```",
        "```python\nimport os\nwhile True:\n    os.fork()\n```",
        "```python\nx = bytearray(8 << 30)\n```",
        "```python\nopen('/etc/passwd', 'a').write('evil')\n```",
        "```python\nimport os\nos._exit(0)\n```",
    ]
    assert [bench.score(answer, problem).correct for answer in hostile] == [False] * 5
    good = "```python\ndef truncate_number(number):\n    return number % 1.0\n```"
    assert bench.score(good, problem).correct


def test_unsandboxed_code_needs_an_explicit_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "isolation_available", lambda: False)
    with pytest.raises(SandboxUnavailable, match="allow_unsandboxed"):
        run_program({"main.py": "print(1)"}, "main.py", LIMITS)
    opted_in = EvalSandbox(timeout_s=5, allow_unsandboxed=True)
    result = run_program({"main.py": "import os\nprint(os.path.basename(os.getcwd()))"},
                         "main.py", opted_in)
    assert result.status == "ok" and result.stdout.strip() == "work"
    loop = run_program({"main.py": "while True: pass"}, "main.py",
                       EvalSandbox(timeout_s=0.5, allow_unsandboxed=True))
    assert loop.status == "timeout"


@needs_isolation
def test_a_jail_that_cannot_be_built_never_runs_the_candidate(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sandbox, "_hidden_interpreter_paths",
                        lambda: [("/nonexistent-idlm", "/nonexistent-idlm/python")])
    witness = tmp_path / "ran.txt"
    with pytest.raises(sandbox.SandboxError, match="SETUP-FAILED"):
        run(f"open({str(witness)!r}, 'w').write('x')\n")
    assert not witness.exists()
