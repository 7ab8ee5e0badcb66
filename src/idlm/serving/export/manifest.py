"""A bundle's ``manifest.json``: every file's sha256 and size, checked before anything loads.

The manifest lists each file of the bundle folder (relative posix names) except itself;
:func:`verify_bundle` refuses a bundle with a missing, changed, truncated or unlisted
file, naming the file and what to do, so a corrupted download never reaches a server.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from idlm.errors import StageError
from idlm.model.hub import sha256_of_file
from idlm.stage import write_json_atomic

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "idlm-bundle/1"


class BundleError(StageError):
    """A bundle that cannot be trusted or used, phrased as one line saying what to do."""


def bundle_files(folder: Path) -> list[str]:
    """Relative names of every file in ``folder`` except the manifest (hidden ones too:
    an unexpected file is a change like any other)."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST)


def hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for every file of the bundle."""
    return {name: {"sha256": sha256_of_file(folder / name),
                   "bytes": (folder / name).stat().st_size}
            for name in bundle_files(folder)}


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Hash the folder and write ``manifest.json`` (format, files, plus ``fields``)."""
    files = hash_files(folder)
    manifest = {"format": BUNDLE_FORMAT, **fields, "files": files,
                "total_bytes": sum(entry["bytes"] for entry in files.values())}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def manifest_sha256(folder: Path) -> str:
    """The manifest's own hash: one value that pins every file of the bundle."""
    return hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"bundle folder {folder} not found: run the export stage first")
    if not path.is_file():
        raise BundleError(f"{folder} has no {MANIFEST}: it is not a complete bundle; "
                          "re-export it (or re-download it from the registry)")
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != BUNDLE_FORMAT or not isinstance(manifest["files"], dict):
            raise ValueError(f"format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BundleError(f"{path} is corrupt ({error}): re-export the bundle") from None
    return manifest


def verify_bundle(folder: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise ``BundleError``."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    expected: dict[str, dict[str, Any]] = manifest["files"]
    present = set(bundle_files(folder))
    missing = sorted(set(expected) - present)
    if missing:
        raise BundleError(f"bundle {folder} is missing {missing[0]} (listed in {MANIFEST}"
                          f"{f' with {len(missing) - 1} more' if len(missing) > 1 else ''}): "
                          "re-download or re-export the bundle")
    extra = sorted(present - set(expected))
    if extra:
        raise BundleError(f"bundle {folder} holds {extra[0]}, which {MANIFEST} does not list: "
                          "remove it or re-export the bundle")
    for name in sorted(expected):
        entry, path = expected[name], folder / name
        if path.stat().st_size != entry["bytes"]:
            raise BundleError(f"bundle file {path} has {path.stat().st_size} bytes, the manifest "
                              f"says {entry['bytes']}: it is truncated or replaced; re-download "
                              "or re-export the bundle")
        if sha256_of_file(path) != entry["sha256"]:
            raise BundleError(f"bundle file {path} does not match its sha256 in {MANIFEST} "
                              "(corrupted or modified): re-download or re-export the bundle")
    return manifest
