"""Start a training stage on the topology of the ``cluster`` section, with existing engines.

dvc.yaml runs ``python -m idlm.cluster.launch stages/<name>.py`` for base, ic and lora, so
the command DVC records never names a launcher, a host or a node count: moving a run from
one node to two, or onto Slurm, reruns nothing (the global batch, which does change
results, is tracked in ``<stage>.train``). What each launch runs:

* ``local``, one rank: ``python stages/<name>.py`` (the tiny profile, CI);
  several GPUs: DeepSpeed's launcher (``deepspeed --num_gpus G``); several CPU ranks:
  ``torchrun --standalone`` (gloo).
* ``slurm``: outside an allocation ``sbatch --wait`` (its log is streamed here and the
  job's exit code is this one's); inside one (``salloc``, a batch script) ``srun``. One
  Slurm task per rank: each task turns ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
  ``SLURM_LOCALID`` and the first host of the allocation into torch's ``RANK`` /
  ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` (``--slurm-task``).
* ``kubernetes``: a Kubeflow ``PyTorchJob`` (``idlm.cluster.kubernetes``) on the shared
  workspace volume, submitted with ``kubectl`` and waited for.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from idlm.config.cluster import ClusterConfig

# Where sbatch writes a stage's log (ignored by git; not a DVC out).
SLURM_LOG_DIR = Path("logs") / "slurm"


def stage_name(script: str) -> str:
    return Path(script).stem


def local_command(cluster: ClusterConfig, script: str, args: Sequence[str],
                  python: str = sys.executable) -> list[str]:
    """This node: one process, DeepSpeed's launcher over its GPUs, or torchrun CPU ranks."""
    ranks = cluster.ranks_per_node
    if ranks == 1:
        return [python, script, *args]
    if cluster.gpus_per_node > 0:
        return ["deepspeed", "--num_gpus", str(ranks), "--master_port",
                str(cluster.master_port), script, *args]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(ranks), script, *args]


def srun_command(cluster: ClusterConfig, script: str, args: Sequence[str],
                 python: str = sys.executable) -> list[str]:
    """One Slurm task per rank; each becomes a torch rank in ``--slurm-task`` mode."""
    command = ["srun", "--nodes", str(cluster.nodes), "--ntasks-per-node",
               str(cluster.ranks_per_node), "--kill-on-bad-exit=1"]
    if cluster.gpus_per_node:
        command += ["--gpus-per-node", str(cluster.gpus_per_node)]
    return [*command, python, "-m", "idlm.cluster.launch", "--slurm-task", script, *args]


def sbatch_command(cluster: ClusterConfig, script: str, args: Sequence[str], log: Path,
                   python: str = sys.executable) -> list[str]:
    """``sbatch --wait`` of the srun above: the environment (venv, tracking URIs) travels
    with the job (``--export=ALL``); the job runs in this checkout (shared filesystem)."""
    slurm = cluster.slurm
    command = ["sbatch", "--wait", "--parsable", "--export=ALL",
               f"--job-name=idlm-{stage_name(script)}", f"--nodes={cluster.nodes}",
               f"--ntasks-per-node={cluster.ranks_per_node}", f"--time={slurm.time}",
               f"--chdir={Path.cwd()}", f"--output={log}"]
    if cluster.gpus_per_node:
        command.append(f"--gpus-per-node={cluster.gpus_per_node}")
    if slurm.partition:
        command.append(f"--partition={slurm.partition}")
    if slurm.account:
        command.append(f"--account={slurm.account}")
    command += list(slurm.extra_args)
    return [*command, "--wrap", shlex.join(srun_command(cluster, script, args, python))]


def slurm_task_env(environ: dict[str, str], master_addr: str, master_port: int
                   ) -> dict[str, str]:
    """torch.distributed's env:// variables from one Slurm task's own."""
    return {**environ, "RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"), "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port)}


def job_port(environ: dict[str, str], base_port: int) -> int:
    """A rendezvous port per job, so two jobs sharing a node do not collide."""
    return base_port + int(environ.get("SLURM_JOB_ID", "0")) % 1000


def first_host(node_list: str) -> str:
    """The allocation's first host (``scontrol`` expands ``node[01-04]`` lists)."""
    out = subprocess.run(["scontrol", "show", "hostnames", node_list], check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0]


def run_slurm_task(cluster: ClusterConfig, script: str, args: Sequence[str]) -> int:
    env = dict(os.environ)
    env = slurm_task_env(env, first_host(env["SLURM_JOB_NODELIST"]),
                         job_port(env, cluster.master_port))
    return subprocess.run([sys.executable, script, *args], env=env).returncode


def run_sbatch(cluster: ClusterConfig, script: str, args: Sequence[str]) -> int:
    """Submit, stream the job's log here while it runs, return the job's exit code."""
    SLURM_LOG_DIR.mkdir(parents=True, exist_ok=True)
    pattern = SLURM_LOG_DIR.resolve() / f"{stage_name(script)}-%j.log"
    command = sbatch_command(cluster, script, args, pattern)
    print(f"launch: {shlex.join(command[:-2])} --wrap {shlex.quote(command[-1])}", flush=True)
    job = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert job.stdout is not None
    job_id = job.stdout.readline().strip().split(";")[0]   # --parsable: "id[;cluster]"
    log = Path(str(pattern).replace("%j", job_id))
    print(f"launch: slurm job {job_id}, log {log}", flush=True)
    shown = 0
    try:
        while True:
            finished = job.poll() is not None
            shown = _show_new(log, shown)
            if finished:
                break
            time.sleep(1.0)
    except BaseException:   # Ctrl-C, a cancelled flow run: the job must not run on
        subprocess.run(["scancel", job_id], check=False)
        raise
    if job.returncode:
        print(f"launch: slurm job {job_id} ended with exit code {job.returncode} (log {log})",
              file=sys.stderr)
    return job.returncode


def _show_new(log: Path, shown: int) -> int:
    if not log.exists():
        return shown
    with log.open("rb") as handle:
        handle.seek(shown)
        chunk = handle.read()
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return shown + len(chunk)


def launch(cluster: ClusterConfig, script: str, args: Sequence[str]) -> int:
    if cluster.launch == "local":
        return subprocess.run(local_command(cluster, script, args)).returncode
    if cluster.launch == "slurm":
        if "SLURM_JOB_ID" in os.environ:
            return subprocess.run(srun_command(cluster, script, args)).returncode
        return run_sbatch(cluster, script, args)
    from idlm.cluster.kubernetes import run_pytorchjob

    return run_pytorchjob(cluster, script, args)


def _config_path(args: Sequence[str]) -> str | None:
    for index, arg in enumerate(args):
        if arg == "--config" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m idlm.cluster.launch",
        description="Run a training stage script on the topology of the config's cluster "
                    "section (local, Slurm or Kubernetes); extra arguments go to the script.")
    parser.add_argument("--slurm-task", action="store_true",
                        help="(inside srun) become one torch rank of the Slurm job")
    parser.add_argument("script", help="the stage script, e.g. stages/ic.py")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="passed to the script (--config F, key=value overrides)")
    options = parser.parse_args(argv)
    from idlm import config as config_mod

    if not Path(options.script).is_file():
        print(f"error: stage script {options.script} not found (run from the repo root)",
              file=sys.stderr)
        return 2
    try:
        cfg = config_mod.load(_config_path(options.args),
                              [a for a in options.args if "=" in a and not a.startswith("-")])
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if options.slurm_task:
        return run_slurm_task(cfg.cluster, options.script, options.args)
    return launch(cfg.cluster, options.script, options.args)


if __name__ == "__main__":
    sys.exit(main())
