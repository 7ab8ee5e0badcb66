"""Where the config lives and the files it names: the workspace (the checkout we act on),
its configs and active ``params.yaml``, and how a value that names a file is resolved.
Imports nothing heavy, as nothing in ``idlm.config`` does."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def workspace() -> Path:
    """The project checkout we act on: $IDLM_WORKSPACE, else the nearest folder (from the
    current directory up) holding dvc.yaml, else the checkout this package came from.
    DVC runs stage commands from the folder of dvc.yaml, so stages find it either way."""
    if os.environ.get("IDLM_WORKSPACE"):
        return Path(os.environ["IDLM_WORKSPACE"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "configs").is_dir():
            return folder
    return PACKAGE_ROOT


def pipeline_stages(root: Path | None = None) -> list[str]:
    """The stages of ``dvc.yaml``, in its order: the one list of stages (the flow takes its
    DAG order from DVC's own index, ``orchestration.pipeline``)."""
    import yaml

    spec = yaml.safe_load(((root or workspace()) / "dvc.yaml").read_text())
    return list(spec["stages"])


def config_dir() -> Path:
    return workspace() / "configs"


def active_config() -> Path:
    return workspace() / "params.yaml"


# The outputs folder of every profile, relative to the repository root.
DEFAULT_OUTPUTS = "outputs"


class ConfigError(ValueError):
    """A config problem, already phrased as one line for the user."""



def looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


def resolve_path(value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else workspace() / path
