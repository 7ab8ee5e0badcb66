"""`idlm data refresh`: a data source becomes an immutable, DVC-tracked version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from idlm import config as config_mod
from idlm.data.refresh import refresh
from idlm.errors import StageError
from tests.workspace import make_workspace


def _idlm(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("IDLM_WORKSPACE", None)
    return subprocess.run([sys.executable, "-m", "idlm.cli", *args], cwd=workspace, env=env,
                          capture_output=True, text=True)


def _version(workspace: Path) -> str:
    return yaml.safe_load((workspace / "params.yaml").read_text())["prepare"]["dataset"][
        "version"]


def test_same_files_same_version_new_files_new_version(tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path / "workspace")
    source = tmp_path / "bucket"
    source.mkdir()
    (source / "a.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    use = _idlm(workspace, "config", "use", "test", "prepare.source=hub",
                f"prepare.dataset.import_url={source}")
    assert use.returncode == 0, use.stderr
    first = _idlm(workspace, "data", "refresh")
    assert first.returncode == 0, first.stderr
    version = _version(workspace)
    assert version and version in first.stdout
    assert (workspace / "data/source/a.jsonl").is_file()
    assert _idlm(workspace, "data", "refresh").returncode == 0
    assert _version(workspace) == version
    (source / "b.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    assert _idlm(workspace, "data", "refresh").returncode == 0
    assert _version(workspace) != version
    assert (workspace / "data/source/b.jsonl").is_file()


def test_synthetic_data_has_nothing_to_resolve(tmp_path: Path) -> None:
    assert refresh(tmp_path, config_mod.load_profile("test")) is None


def test_an_unreachable_hub_fails_in_one_line(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config_mod.load_profile("test", ["prepare.source=hub",
                                           "prepare.dataset.name_or_path=org/no-such-data"])
    with pytest.raises(StageError, match="cannot resolve dataset org/no-such-data@main") as err:
        refresh(tmp_path, cfg)
    assert "\n" not in str(err.value)
