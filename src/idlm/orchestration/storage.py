"""After a successful cluster run: outputs to the DVC remote, the lock to a run branch.

``dvc.lock`` is what says which outputs a run produced; on a cluster the workspace is
thrown away, so the lock must outlive it next to the outputs. The decision here: **a
branch per run**. With ``flow.push`` on, a run that succeeded

1. pushes every output to the DVC remote (``dvc push``: an S3 bucket on the cluster, the
   credentials from the environment, the endpoint from ``dvc remote modify --local``), then
2. commits ``dvc.lock`` and ``params.yaml`` on top of the checked-out commit as branch
   ``idlm-runs/<flow run name>`` (git plumbing: the working tree and the current branch are
   not touched), and pushes that branch to ``origin`` when there is one.

A fresh clone restores the run with ``git checkout idlm-runs/<name> && dvc pull``, and
``dvc repro`` then has nothing to run. The MLflow parent run records the branch and commit.

Scheduled retraining works in a fresh checkout per run (never a ``git pull`` into a
workspace a flow has modified): each published run also moves ``idlm-runs/latest``, and
``python -m idlm.orchestration.storage restore`` (a deployment's pull step) takes that
branch's lock and data import into the new checkout and ``dvc pull``s the outputs, so
unchanged data and code leave every stage to be skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from idlm.errors import StageError

BRANCH_PREFIX = "idlm-runs/"
LATEST = BRANCH_PREFIX + "latest"
RECORDED = ("dvc.lock", "params.yaml")
# Recorded too when present: the data import that the run trained on (idlm.data.refresh).
RECORDED_IF_PRESENT = ("data/source.dvc",)
RESTORED = ("dvc.lock", *RECORDED_IF_PRESENT)


def run_branch(run_name: str) -> str:
    """``idlm-runs/<name>`` with the name made a valid ref (Prefect names are words-words)."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-") or "run"
    return BRANCH_PREFIX + safe


def publish_run(workspace: Path, run_name: str) -> dict[str, str]:
    """``dvc push``, then the lock and params committed as the run's branch (see above)."""
    _dvc(workspace, "push", "-q")
    branch = run_branch(run_name)
    commit = _commit_on_branch(workspace, branch, f"idlm run {run_name}: dvc.lock and params")
    _git(workspace, "update-ref", f"refs/heads/{LATEST}", commit)
    pushed = "no git remote"
    if _git(workspace, "remote").split().count("origin"):
        _git(workspace, "push", "-q", "-f", "origin", f"{branch}:{branch}",
             f"{LATEST}:{LATEST}")
        pushed = "origin"
    return {"branch": branch, "commit": commit, "git_push": pushed}


def _commit_on_branch(workspace: Path, branch: str, message: str) -> str:
    """A commit of HEAD's tree plus ``RECORDED`` as they are on disk, as ``branch``."""
    missing = [name for name in RECORDED if not (workspace / name).is_file()]
    if missing:
        raise StageError(f"cannot record the run: {', '.join(missing)} missing in {workspace}")
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(folder) / "index")}
        _git(workspace, "read-tree", "HEAD", env=env)
        present = [name for name in RECORDED_IF_PRESENT if (workspace / name).is_file()]
        _git(workspace, "add", "-f", *RECORDED, *present, env=env)
        tree = _git(workspace, "write-tree", env=env)
    commit = _git(workspace, "-c", "user.name=idlm", "-c", "user.email=idlm@localhost",
                  "commit-tree", tree, "-p", "HEAD", "-m", message)
    _git(workspace, "update-ref", f"refs/heads/{branch}", commit)
    return commit


def restore(workspace: Path, remote: str = "origin") -> str:
    """Into a fresh checkout: the last published run's lock and data import, and its
    outputs from the DVC remote. Returns what was restored (nothing on a first run)."""
    try:
        _git(workspace, "fetch", "-q", remote, f"+refs/heads/{LATEST}:refs/heads/{LATEST}")
    except StageError:
        return "nothing (no published run yet)"
    files = [name for name in RESTORED
             if _git(workspace, "ls-tree", "--name-only", LATEST, name)]
    _git(workspace, "checkout", LATEST, "--", *files)
    _dvc(workspace, "pull", "-q", "--allow-missing")
    return f"{', '.join(files)} of {_git(workspace, 'rev-parse', '--short', LATEST)} " \
           "and its outputs"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m idlm.orchestration.storage",
        description="restore: the last published run (branch idlm-runs/latest) into this "
                    "fresh checkout: its dvc.lock, data import and outputs (dvc pull)")
    parser.add_argument("action", choices=["restore"])
    parser.add_argument("--workspace", default=".")
    args = parser.parse_args(argv)
    try:
        print(f"restored {restore(Path(args.workspace))}")
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _git(workspace: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise StageError(f"git {args[0]} failed in {workspace}: "
                         f"{(done.stderr or done.stdout).strip()[-300:]}")
    return done.stdout.strip()


def _dvc(workspace: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StageError(f"dvc {args[0]} failed in {workspace}: "
                         f"{(done.stderr or done.stdout).strip()[-300:]} (is a default remote "
                         "configured? `dvc remote add -d storage s3://…`)")


if __name__ == "__main__":
    sys.exit(main())
