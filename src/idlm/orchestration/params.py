"""The flow's inputs in the workspace: profile and overrides into ``params.yaml``, flow settings.

Overrides are applied exactly as ``dvc exp run -S key=value`` applies them (DVC's own
Hydra-based editor, on the tracked ``params.yaml``), so DVC sees each changed key as a
changed stage param and reruns precisely the stages that depend on it. A profile is made
active first, as ``idlm config use PROFILE`` does. Any failure puts ``params.yaml`` back.
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
    """Make ``profile`` active (when given), apply ``overrides`` as ``dvc exp run -S`` does,
    validate the result; on any error restore ``params.yaml`` and raise ConfigError."""
    from dvc.utils.hydra import apply_overrides

    path = workspace / PARAMS_FILE
    original = path.read_bytes() if path.is_file() else None
    try:
        if profile:
            config_mod.write_active(config_mod.load_profile(profile), path)
        if overrides:
            apply_overrides(str(path), list(overrides))
        return config_mod.load(path)
    except Exception as exc:
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(original)
        if isinstance(exc, config_mod.ConfigError):
            raise
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise config_mod.ConfigError(f"overrides {list(overrides)}: {exc}{cause}") from None


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
