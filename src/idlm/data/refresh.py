"""Resolve the training data to an immutable version, so that DVC reruns on new data only.

A scheduled retraining must rerun when the data changed and only then. ``revision: main``
does not change when the data does, and a bucket prefix has no version at all; so before
any stage runs, the flow resolves the source to a version and writes it into
``params.yaml`` as ``prepare.dataset.version``, a key of the ``prepare`` section that DVC
tracks. Same data -> same version -> every stage skipped; new data -> ``prepare`` and
everything after it rerun.

* ``prepare.dataset.import_url`` (an object-store prefix such as ``s3://data/sft/`` or a
  folder): ``dvc import-url`` into ``data/source`` the first time, ``dvc update`` after; the
  version is the imported folder's DVC hash, and ``prepare`` reads that folder.
* a hub dataset id: its ``revision`` (a branch or tag) resolved to the commit sha, which
  ``prepare`` then loads (``huggingface_hub``; needs the hub, or a mirror via HF_ENDPOINT).
* anything else (synthetic data, a local folder given by path) is versioned by the config
  and the files DVC already hashes: nothing to resolve.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from idlm.config import Config
from idlm.config.paths import looks_local
from idlm.errors import StageError

IMPORT_PATH = "data/source"   # where an import_url lands, relative to the workspace


@dataclass(frozen=True)
class DataVersion:
    source: str     # the url or hub id that was resolved
    version: str    # the immutable version (DVC hash or hub commit sha)
    kind: str       # "import-url" or "hub"

    def override(self) -> str:
        return f"prepare.dataset.version={self.version}"


def refresh(workspace: Path, cfg: Config) -> DataVersion | None:
    """Fetch / resolve the configured source; None when it has no version to resolve."""
    spec = cfg.prepare.dataset
    if cfg.prepare.source != "hub":
        return None
    if spec.import_url:
        return _import(workspace, spec.import_url)
    if spec.name_or_path and not looks_local(spec.name_or_path):
        return DataVersion(spec.name_or_path, _hub_commit(spec.name_or_path, spec.revision),
                           "hub")
    return None


def _import(workspace: Path, url: str) -> DataVersion:
    dvc_file = workspace / f"{IMPORT_PATH}.dvc"
    if dvc_file.is_file() and _imported_url(dvc_file) == url:
        _dvc(workspace, "update", "-q", str(dvc_file.relative_to(workspace)))
    else:
        (workspace / IMPORT_PATH).parent.mkdir(parents=True, exist_ok=True)
        _dvc(workspace, "import-url", "-q", "--force", url, IMPORT_PATH)
    return DataVersion(url, _imported_hash(dvc_file), "import-url")


def _imported_url(dvc_file: Path) -> str | None:
    deps = yaml.safe_load(dvc_file.read_text()).get("deps") or [{}]
    return deps[0].get("path")


def _imported_hash(dvc_file: Path) -> str:
    outs = yaml.safe_load(dvc_file.read_text()).get("outs") or [{}]
    digest = outs[0].get("md5") or outs[0].get("hash")
    if not digest:
        raise StageError(f"{dvc_file} records no hash of the imported data")
    return str(digest).removesuffix(".dir")


def _hub_commit(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(repo_id, revision=revision)
    except Exception as exc:  # offline, unknown id or revision: one line, before any work
        raise StageError(f"cannot resolve dataset {repo_id}@{revision or 'main'} to a commit: "
                         f"{str(exc).splitlines()[0]}") from None
    return str(info.sha)


def _dvc(workspace: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StageError(f"dvc {args[0]} failed: "
                         f"{(done.stderr or done.stdout).strip()[-300:]}")
