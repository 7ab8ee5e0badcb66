"""Orchestration overhead: a fully cached ``idlm-full`` flow run vs a plain cached ``dvc repro``.

Both run on the same workspace with every stage up to date, so what remains is pure
overhead: for ``dvc repro`` its own start-up and checks; for the flow, Prefect (its
ephemeral server, as the README command runs it), one ``dvc repro --single-item`` per
stage, and MLflow (a parent run, a child per stage with params, metrics, artifacts).
Runs alternate so load on the machine hits both alike; medians are reported.

    python bench/pipeline.py                      # builds a small cached workspace in /tmp
    python bench/pipeline.py --workspace .        # or any workspace (made up to date first)

Measured twice: as the README command runs (Prefect's ephemeral mode: a temporary server
per run) and as a deployment runs (a Prefect server already up). Prints JSON (and writes
it with ``--out``). Target: overhead <= 15 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 15.0
# The test suite's profile (configs/test.yaml): the stages' compute is irrelevant here,
# everything is cached.
PROFILE = "test"


def _environment(prefect_home: Path) -> dict[str, str]:
    """As a user runs the README command: no Prefect server or MLflow server configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("IDLM_WORKSPACE", None)
    return env


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(args: list[str], workspace: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process tree): CPU time does not depend on
    how busy the machine is, wall time does."""
    began, cpu = time.perf_counter(), _cpu_of_children()
    done = subprocess.run(args, cwd=workspace, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return seconds, _cpu_of_children() - cpu


def build_workspace(root: Path, env: dict[str, str]) -> Path:
    """A fresh copy of the project with the test profile active (not yet run)."""
    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "configs", "stages", "src"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    _run(["git", "init", "-q"], root, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root, env)
    _run([sys.executable, "-m", "idlm.cli", "config", "use", PROFILE], root, env)
    return root


def flow_command(summary: Path) -> list[str]:
    return [sys.executable, str(REPO / "flows" / "idlm_full.py"), "--json", str(summary)]


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def measure(workspace: Path, repeats: int, env: dict[str, str], scratch: Path) -> dict[str, Any]:
    summary = scratch / "summary.json"
    # Warm-up (not timed): brings the workspace up to date and creates the Prefect and
    # MLflow databases, which a user pays for once.
    _run(flow_command(summary), workspace, env)
    dvc_times, flow_times, dvc_cpu, flow_cpu = [], [], [], []
    bodies, setups, stage_sums = [], [], []
    for _ in range(repeats):
        wall, cpu = _run([sys.executable, "-m", "dvc", "repro"], workspace, env)
        dvc_times.append(wall)
        dvc_cpu.append(cpu)
        wall, cpu = _run(flow_command(summary), workspace, env)
        flow_times.append(wall)
        flow_cpu.append(cpu)
        result = json.loads(summary.read_text())
        if any(stage["status"] == "ran" for stage in result["stages"]):
            raise SystemExit("a stage ran during the benchmark: the workspace is not cached")
        setups.append(result["setup_seconds"])
        bodies.append(result["setup_seconds"] + result["seconds"])
        stage_sums.append(sum(stage["seconds"] for stage in result["stages"]))
    overhead = statistics.median(flow_times) - statistics.median(dvc_times)
    return {
        "stages": [stage["stage"] for stage in result["stages"]],
        "dvc_repro_s": {"median": _median(dvc_times), "runs": [round(t, 2) for t in dvc_times]},
        "idlm_full_s": {"median": _median(flow_times),
                        "runs": [round(t, 2) for t in flow_times]},
        "overhead_s": round(overhead, 2),
        "within_target": overhead <= TARGET_SECONDS,
        "cpu_s": {"dvc_repro": _median(dvc_cpu), "idlm_full": _median(flow_cpu)},
        "breakdown_s": {
            # process start, imports, Prefect (server start-up in ephemeral mode), teardown
            "prefect_and_process": round(_median(flow_times) - _median(bodies), 2),
            # the lock, reading dvc.yaml, params.yaml, opening MLflow, the parent run
            "flow_setup": _median(setups),
            # one `dvc repro --single-item` per stage (each a DVC start-up)
            "dvc_per_stage_total": _median(stage_sums),
            # Prefect task runs, MLflow children (params, metrics, artifacts), summary
            "tasks_and_tracking": round(_median(bodies) - _median(setups)
                                        - _median(stage_sums), 2)},
    }


@contextlib.contextmanager
def prefect_server(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """A Prefect server started once (untimed), as a deployment's worker has one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield {**env, "PREFECT_API_URL": api}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=None,
                        help="a workspace to use (default: build a small one in a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--ephemeral-only", action="store_true",
                        help="skip the measurement against a running Prefect server")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="idlm-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        env = _environment(scratch / "prefect-home")
        workspace = (Path(args.workspace).resolve() if args.workspace
                     else build_workspace(scratch / "workspace", env))
        report: dict[str, Any] = {
            "benchmark": "idlm-full cached vs dvc repro cached",
            "workspace": str(workspace) if args.workspace else "fresh test-profile workspace",
            "repeats": args.repeats, "cpus": os.cpu_count(), "target_overhead_s": TARGET_SECONDS,
            "load_average_1m_before": round(os.getloadavg()[0], 2)}
        # The README command: no server configured, Prefect starts a temporary one per run.
        report["ephemeral"] = measure(workspace, args.repeats, env, scratch)
        if not args.ephemeral_only:  # a deployment: the worker talks to a running server
            with prefect_server(env) as server_env:
                report["running_server"] = measure(workspace, args.repeats, server_env, scratch)
        report["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
