"""One flow run per workspace: an OS file lock, plus a check that no DVC command is running.

The lock is an ``flock`` on ``.dvc/tmp/idlm-full.lock`` (a folder DVC already keeps out
of git), held for the whole flow run, taken *before* ``params.yaml`` is touched. The
kernel drops it when the holder dies, so a killed run never leaves a stale lock. The file
names its holder, so a refused second run can say who holds the workspace and how to
cancel it. DVC's own repo lock (``.dvc/tmp/lock``) is probed too: a ``dvc repro`` started
by hand must finish before a flow run may change the params it is reading.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOCK_FILE = Path(".dvc/tmp/idlm-full.lock")
DVC_LOCK_FILE = Path(".dvc/tmp/lock")


class WorkspaceBusy(RuntimeError):
    """Another flow run (or DVC command) is using this workspace."""


def holder_info(flow_run_id: str = "", flow_run_name: str = "") -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "flow_run_id": flow_run_id,
            "flow_run_name": flow_run_name,
            "started": datetime.now(UTC).isoformat(timespec="seconds")}


def _describe(workspace: Path, info: dict[str, Any]) -> str:
    who = "another idlm-full flow run"
    if info.get("flow_run_name") or info.get("flow_run_id"):
        who += f" ('{info.get('flow_run_name', '')}', id {info.get('flow_run_id', '?')})"
    if info.get("pid"):
        who += f", pid {info['pid']} on {info.get('host', '?')}"
    if info.get("started"):
        who += f", started {info['started']}"
    cancel = (f"`prefect flow-run cancel {info['flow_run_id']}`" if info.get("flow_run_id")
              else f"stop pid {info.get('pid', '?')}")
    return (f"workspace {workspace} is busy: {who}, is still running. A second run in the "
            f"same workspace is refused so that params.yaml, dvc.lock and outputs/ stay "
            f"consistent: wait for it to finish, or cancel it ({cancel}).")


def _read_holder(handle: Any) -> dict[str, Any]:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except json.JSONDecodeError:  # the holder is between taking the lock and writing it
        return {}


def check_dvc_idle(workspace: Path) -> None:
    """Refuse when a DVC command holds the repo lock (it may be reading params.yaml)."""
    import zc.lockfile

    path = workspace / DVC_LOCK_FILE
    if not path.parent.is_dir():
        return
    try:
        zc.lockfile.LockFile(str(path)).close()
    except zc.lockfile.LockError:
        pid = path.read_text().strip().split()[0] if path.is_file() else "?"
        raise WorkspaceBusy(
            f"workspace {workspace} is busy: a DVC command (pid {pid}) holds {DVC_LOCK_FILE}. "
            "Wait for it to finish (or stop it) before starting the flow.") from None


@contextmanager
def workspace_lock(workspace: Path, info: dict[str, Any]) -> Iterator[Path]:
    """Hold the workspace for one flow run, or raise :class:`WorkspaceBusy` at once."""
    path = workspace / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(handle)
        handle.close()
        raise WorkspaceBusy(_describe(workspace, holder)) from None
    try:
        check_dvc_idle(workspace)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info))
        handle.flush()
        yield path
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()
