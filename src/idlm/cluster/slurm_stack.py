"""A one-node Slurm cluster on loopback, from Debian's packages (``slurm-wlm``, ``munge``).

What the tests (and a user trying ``cluster.launch: slurm`` on one machine) run against:
``munged`` with its own key and socket, ``slurmctld`` and ``slurmd`` with a generated
``slurm.conf``, all under one folder, none of it touching /etc. Clients find the cluster
through ``SLURM_CONF``, which :func:`env` returns and ``env`` prints as shell exports.

    python -m idlm.cluster.slurm_stack up --dir .slurm      # then: eval $(... env --dir .slurm)
    python -m idlm.cluster.slurm_stack down --dir .slurm

Runs as root (as in CI): the daemons use ``SlurmUser=root``; jobs run as the submitter.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmd", "slurmctld", "munged")
BINARIES = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld",
            "slurmd": "/usr/sbin/slurmd", "sinfo": "/usr/bin/sinfo"}
READY_TIMEOUT_S = 60.0


class SlurmStackError(RuntimeError):
    pass


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def slurm_conf(root: Path, host: str, cpus: int, memory_mb: int, ports: list[int]) -> str:
    """One node, one partition ``debug``; no cgroups (containers), no accounting."""
    return "\n".join([
        "ClusterName=idlm", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}", f"SlurmdPort={ports[1]}",
        "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "ReturnToService=2", "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none", "SlurmdTimeout=30",
        "InactiveLimit=0", "KillWait=5", "MinJobAge=300",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


def env(root: Path) -> dict[str, str]:
    return {"SLURM_CONF": str(Path(root).resolve() / "slurm.conf")}


def _check_installed() -> None:
    missing = [name for name, path in BINARIES.items() if not Path(path).exists()]
    if missing:
        raise SlurmStackError(f"{', '.join(missing)} not installed: apt-get install slurm-wlm "
                              "munge (scripts/test_services.sh does it)")
    if os.geteuid() != 0:
        raise SlurmStackError("the one-node Slurm stack runs its daemons as root")


def _memory_mb() -> int:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1024, int(pages / 2**20 * 0.9))


def start(root: Path) -> dict[str, str]:
    """Start munged, slurmctld and slurmd under ``root``; wait until the node is idle."""
    _check_installed()
    root = Path(root).resolve()
    for folder in (root, root / "state", root / "spool"):
        folder.mkdir(parents=True, exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    (root / "slurm.conf").write_text(slurm_conf(root, host, os.cpu_count() or 1,
                                                _memory_mb(), _free_ports(2)))
    variables = {**os.environ, **env(root)}
    _spawn([BINARIES["munged"], "--force", f"--key-file={key}",
            f"--socket={root / 'munge.socket'}", f"--pid-file={root / 'munged.pid'}",
            f"--log-file={root / 'munged.log'}", f"--seed-file={root / 'munge.seed'}"],
           variables, root / "munged.log")
    _spawn([BINARIES["slurmctld"], "-f", str(root / "slurm.conf"), "-i"], variables,
           root / "slurmctld.log")
    _spawn([BINARIES["slurmd"], "-f", str(root / "slurm.conf")], variables,
           root / "slurmd.log")
    _wait_idle(root, variables)
    return env(root)


def _spawn(command: list[str], variables: dict[str, str], log: Path) -> None:
    done = subprocess.run(command, env=variables, capture_output=True, text=True)
    if done.returncode != 0:
        tail = log.read_text()[-800:] if log.exists() else ""
        raise SlurmStackError(f"{Path(command[0]).name} did not start: "
                              f"{(done.stderr or tail).strip()[-800:]}")


def _wait_idle(root: Path, variables: dict[str, str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        done = subprocess.run([BINARIES["sinfo"], "-h", "-o", "%T"], env=variables,
                              capture_output=True, text=True)
        state = (done.stdout or done.stderr).strip()
        if done.returncode == 0 and state in ("idle", "mixed", "allocated"):
            return
        time.sleep(0.5)
    log = (root / "slurmd.log").read_text()[-600:] if (root / "slurmd.log").exists() else ""
    raise SlurmStackError(f"the Slurm node is not idle after {READY_TIMEOUT_S:.0f} s "
                          f"(sinfo: {state!r}); slurmd.log: {log}")


def stop(root: Path) -> None:
    """Stop the daemons (each by its pid file); leaves the folder for the logs."""
    root = Path(root).resolve()
    for name in DAEMONS:
        pid_file = root / f"{name}.pid"
        if not pid_file.exists():
            continue
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 15)
            _wait_gone(pid)
        except (ValueError, ProcessLookupError, IndexError):
            pass


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idlm.cluster.slurm_stack",
                                     description="A one-node Slurm cluster on loopback.")
    parser.add_argument("action", choices=["up", "down", "env"])
    parser.add_argument("--dir", default=".slurm", help="state, config and logs (.slurm)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    try:
        if args.action == "up":
            start(root)
            print(f"slurm up: export SLURM_CONF={env(root)['SLURM_CONF']}")
        elif args.action == "down":
            stop(root)
        else:
            print(f"export SLURM_CONF={env(root)['SLURM_CONF']}")
    except SlurmStackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if shutil.which("sbatch") is None and sys.argv[1:2] == ["up"]:
        print("note: sbatch is not on PATH; clients will not find the cluster", file=sys.stderr)
    sys.exit(main())
