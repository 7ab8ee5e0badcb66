"""The model registry functions of idlm.tracking: register a bundle folder, aliases."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from idlm import tracking


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _bundle(root: Path, text: str) -> Path:
    bundle = root / "isd"
    bundle.mkdir(exist_ok=True)
    (bundle / "manifest.json").write_text(text)
    return bundle


def test_versions_count_up_and_uploaded_files_live_in_the_registry(workspace: Path) -> None:
    bundle = _bundle(workspace, '{"v": 1}')
    first = tracking.register_bundle("idlm-isd", bundle, workspace=workspace,
                                     tags={"manifest_sha256": "ab" * 32})
    (bundle / "manifest.json").write_text('{"v": 2}')
    second = tracking.register_bundle("idlm-isd", bundle, workspace=workspace)
    assert (first, second) == ("1", "2")
    stored = Path(urlparse(tracking.model_version_source("idlm-isd", first,
                                                         workspace=workspace)).path)
    assert stored.is_relative_to(workspace / tracking.ARTIFACTS_NAME)
    assert (stored / "manifest.json").read_text() == '{"v": 1}'  # a copy, not the folder


def test_without_upload_the_version_points_at_the_folder(workspace: Path) -> None:
    bundle = _bundle(workspace, "{}")
    version = tracking.register_bundle("idlm-risd", bundle, workspace=workspace, upload=False)
    assert tracking.model_version_source("idlm-risd", version,
                                         workspace=workspace) == bundle.resolve().as_uri()


def test_alias_is_none_until_set_then_follows_the_latest_set(workspace: Path) -> None:
    bundle = _bundle(workspace, "{}")
    assert tracking.get_alias("idlm-isd", "champion", workspace=workspace) is None  # no model
    one = tracking.register_bundle("idlm-isd", bundle, workspace=workspace, upload=False)
    two = tracking.register_bundle("idlm-isd", bundle, workspace=workspace, upload=False)
    assert tracking.get_alias("idlm-isd", "champion", workspace=workspace) is None
    tracking.set_alias("idlm-isd", "champion", one, workspace=workspace)
    assert tracking.get_alias("idlm-isd", "champion", workspace=workspace) == one
    tracking.set_alias("idlm-isd", "champion", int(two), workspace=workspace)
    assert tracking.get_alias("idlm-isd", "champion", workspace=workspace) == two


def test_workspace_defaults_to_the_stage_workspace(workspace: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDLM_WORKSPACE", str(workspace))
    version = tracking.register_bundle("idlm-isd", _bundle(workspace, "{}"), upload=False)
    tracking.set_alias("idlm-isd", "champion", version)
    assert tracking.get_alias("idlm-isd", "champion") == version
    assert (workspace / tracking.DB_NAME).is_file()


def test_a_missing_bundle_folder_is_refused(workspace: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        tracking.register_bundle("idlm-isd", workspace / "nope", workspace=workspace)
