"""The stage tests' view of the suite's trained workspace: a copy of its outputs, so a test
that runs a stage again (resume, rerun, bad input) never changes the shared one."""

from __future__ import annotations

import json
import shutil

import pytest

from idlm.config import Config, load_profile
from tests.workspace import PROFILE


@pytest.fixture(scope="session")
def trained(trained_workspace: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    outputs = tmp_path_factory.mktemp("stages") / "outputs"
    shutil.copytree(trained_workspace["root"] / "outputs", outputs, symlinks=True)
    cfg: Config = load_profile(PROFILE, [f"outputs={outputs}"])
    metrics = {stage: json.loads(cfg.out(stage, "metrics.json").read_text())
               for stage in ("base", "ic", "lora")}
    return {"cfg": cfg, "workspace": trained_workspace["root"], **metrics}
