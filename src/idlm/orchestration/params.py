"""The flow's inputs in the workspace: profile and overrides into ``params.yaml``, flow settings.

Overrides are applied exactly as ``dvc exp run -S key=value`` applies them (DVC's own
Hydra-based editor, through ``idlm.config.load``, the one path the stage scripts and
``idlm config use`` take too), so DVC sees each changed key as a changed stage param and
reruns precisely the stages that depend on it. A profile is made active first, as
``idlm config use PROFILE`` does. Nothing is written unless the result validates.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from idlm import config as config_mod

PARAMS_FILE = "params.yaml"


def flow_settings(cfg: config_mod.Config, retries: int | None = None,
                  stages: list[str] | None = None) -> config_mod.FlowConfig:
    """``cfg.flow``, its per-stage retries checked against ``stages`` (dvc.yaml's);
    ``retries`` (a flow parameter) overrides the default for every stage."""
    settings = cfg.flow
    unknown = sorted(set(settings.stage_retries) - set(stages or settings.stage_retries))
    if unknown:
        raise config_mod.ConfigError(
            f"flow.stage_retries: no stage named {', '.join(unknown)} in dvc.yaml")
    if retries is not None:
        settings = settings.model_copy(update={"retries": retries, "stage_retries": {}})
    return settings


@contextmanager
def use_workspace(workspace: Path) -> Iterator[Path]:
    """Point the config loader (and every stage the flow starts) at ``workspace``."""
    before = os.environ.get("IDLM_WORKSPACE")
    os.environ["IDLM_WORKSPACE"] = str(workspace)
    try:
        yield workspace
    finally:
        if before is None:
            os.environ.pop("IDLM_WORKSPACE", None)
        else:
            os.environ["IDLM_WORKSPACE"] = before


def prepare_params(workspace: Path, profile: str | None,
                   overrides: list[str]) -> config_mod.Config:
    """Make ``profile`` active (when given, else keep ``params.yaml``) with ``overrides``
    applied as ``dvc exp run -S`` applies them (``idlm.config.load``: DVC's own function
    on the resolved config), and write it. Validated before anything is written, so a
    bad profile or override raises ConfigError and leaves ``params.yaml`` as it was."""
    path = workspace / PARAMS_FILE
    cfg = (config_mod.load_profile(profile, overrides) if profile
           else config_mod.load(path, overrides))
    config_mod.write_active(cfg, path)
    return cfg


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "none"


def git_commit(workspace: Path) -> tuple[str, bool]:
    """(commit, dirty) of the workspace checkout; ("none", False) outside git."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "none", False
    status = git("status", "--porcelain", "--untracked-files=no")
    return head.stdout.strip(), bool(status.stdout.strip())
