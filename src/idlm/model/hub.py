"""Resolve a base checkpoint (hub id + revision, or a local directory) and pin it by hash.

Hub ids go through ``huggingface_hub.snapshot_download``, so ``HF_HUB_OFFLINE``,
``HF_HUB_CACHE`` and tokens behave as everywhere else in the HF stack; local directories
are used in place. Either way the checkpoint is checked before anything heavy touches it
(config present, safetensors weights present, every shard's header readable) and every
file that matters gets a streaming sha256, so a run records exactly which weights it used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from idlm.errors import StageError

logger = logging.getLogger(__name__)

# What a causal-LM checkpoint needs; the same filter for hub downloads and local directories
# keeps one checkpoint's fingerprint the same whichever way it arrives.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
WEIGHTS_SUFFIX = ".safetensors"
SHARD_INDEX = "model.safetensors.index.json"
UNHASHED_PREFIX = "unhashed:size="
_HASH_CHUNK_BYTES = 8 * 1024 * 1024
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


class CheckpointError(StageError):
    """A checkpoint that cannot be used, phrased as one line saying what to do."""


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where a checkpoint lives and what exactly it contains (``files``: name -> sha256)."""

    path: Path
    source: Literal["local", "hub"]
    repo_id: str | None
    revision: str | None
    commit_sha: str | None
    files: dict[str, str]
    fingerprint: str


def resolve_checkpoint(
    name_or_path: str, revision: str | None = None, hash_weights: bool = True
) -> ResolvedCheckpoint:
    """Find, check and hash a checkpoint; ``hash_weights=False`` records weight sizes only."""
    local_path = Path(name_or_path).expanduser()
    if local_path.exists():
        if revision is not None:
            raise CheckpointError(
                f"revision {revision!r} applies to hub ids, but {name_or_path} is a local path: "
                "drop the revision or pass a hub id"
            )
        source, repo_id, commit_sha, path = "local", None, None, local_path.resolve()
    elif _looks_like_repo_id(name_or_path):
        revision = revision or "main"
        path = _download_snapshot(name_or_path, revision)
        source, repo_id = "hub", name_or_path
        commit_sha = path.name if _COMMIT_SHA.match(path.name) else None
    else:
        raise CheckpointError(
            f"checkpoint path {name_or_path} not found: fix the path or give a hub id (org/name)"
        )
    names = _checkpoint_files(path)
    files = _hash_files(path, names, hash_weights)
    return ResolvedCheckpoint(
        path=path,
        source=source,
        repo_id=repo_id,
        revision=revision,
        commit_sha=commit_sha,
        files=files,
        fingerprint=manifest_fingerprint(files),
    )


def _looks_like_repo_id(name: str) -> bool:
    explicit_path = name.startswith(("/", ".", "~")) or "\\" in name
    return not explicit_path and _REPO_ID.match(name) is not None


def _download_snapshot(repo_id: str, revision: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}"
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_PATTERNS)
        )
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot fetch {where}: the hub is unreachable (or HF_HUB_OFFLINE is set) and the HF "
            f"cache {constants.HF_HUB_CACHE} has no complete snapshot of it; go online once, "
            "point HF_HUB_CACHE at a cache that has it, or pass a local path"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"revision {revision!r} not found in hub repo {repo_id}: check the revision"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"hub repo {repo_id} not found or not accessible: check the id, or log in "
            "(`hf auth login`) for a gated or private model"
        ) from None
    except HfHubHTTPError as error:
        raise CheckpointError(f"hub error while fetching {where}: {error}; retry later") from None


def _checkpoint_files(path: Path) -> list[str]:
    """The checkpoint's relevant files (relative posix names), after checking it is complete."""
    from huggingface_hub.utils import filter_repo_objects

    if not path.is_dir():
        raise CheckpointError(f"{path} is a file: pass the checkpoint directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} has no config.json: point at a directory written by save_pretrained"
        )
    every_file = [
        candidate.relative_to(path).as_posix()
        for candidate in path.rglob("*")
        if candidate.is_file() and not _is_hidden(candidate.relative_to(path))
    ]
    names = sorted(filter_repo_objects(every_file, allow_patterns=CHECKPOINT_PATTERNS))
    weights = [name for name in names if name.endswith(WEIGHTS_SUFFIX)]
    if not weights:
        raise CheckpointError(
            f"{path} has no *.safetensors weights: save it with save_pretrained "
            "(safetensors is the only weight format accepted)"
        )
    _check_shards_listed_in_index(path, weights)
    for name in weights:
        check_safetensors_header(path / name)
    return names


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _check_shards_listed_in_index(path: Path, weights: list[str]) -> None:
    index_path = path / SHARD_INDEX
    if not index_path.is_file():
        return
    try:
        shards = set(json.loads(index_path.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index_path} is corrupt ({error}): re-download it") from None
    missing = sorted(shards - set(weights))
    if missing:
        raise CheckpointError(
            f"{path} misses {len(missing)} weight shard(s) named in {SHARD_INDEX} "
            f"(first: {missing[0]}): re-download the checkpoint"
        )


def check_safetensors_header(path: Path) -> None:
    """Cheap integrity check: the header parses and covers the file, no tensor is loaded."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.metadata()
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({error}): re-download or re-save it"
        ) from None


def _hash_files(path: Path, names: list[str], hash_weights: bool) -> dict[str, str]:
    from tqdm.auto import tqdm

    to_hash = [name for name in names if hash_weights or not name.endswith(WEIGHTS_SUFFIX)]
    total_bytes = sum((path / name).stat().st_size for name in to_hash)
    on_terminal = sys.stderr.isatty()
    files: dict[str, str] = {}
    with tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="sha256", disable=not on_terminal
    ) as progress:
        for position, name in enumerate(names, start=1):
            if name not in to_hash:
                files[name] = f"{UNHASHED_PREFIX}{(path / name).stat().st_size}"
                continue
            files[name] = sha256_of_file(path / name, progress.update)
            if not on_terminal:
                logger.info("sha256 %d/%d %s %s", position, len(names), name, files[name])
    return files


def sha256_of_file(path: Path, on_bytes_read: Callable[[int], object] | None = None) -> str:
    """Streaming sha256 (checkpoints reach tens of GB); reports progress in bytes."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while read_count := handle.readinto(buffer):
            digest.update(view[:read_count])
            if on_bytes_read is not None:
                on_bytes_read(read_count)
    return digest.hexdigest()


def manifest_fingerprint(files: Mapping[str, str]) -> str:
    """One sha256 over the sorted ``name<TAB>digest`` manifest."""
    manifest = "".join(f"{name}\t{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(manifest.encode()).hexdigest()


def check_mask_row(config: Any, mask_token_id: int) -> None:
    """The MASK id must be an existing embedding row (Qwen3: 151669 < 151936, no resize)."""
    vocab_size = config.get("vocab_size") if isinstance(config, Mapping) else None
    if vocab_size is None:
        vocab_size = getattr(config, "vocab_size", None)
    if not isinstance(vocab_size, int):
        raise CheckpointError("model config has no integer vocab_size: cannot place the MASK row")
    if not 0 <= mask_token_id < vocab_size:
        raise CheckpointError(
            f"mask token id {mask_token_id} is not a row of the embedding (vocab_size "
            f"{vocab_size}): use an id below {vocab_size} or resize the embeddings first"
        )


def to_json(resolved: ResolvedCheckpoint) -> dict[str, Any]:
    """A JSON-ready pin record of a resolved checkpoint."""
    return {
        "path": os.fspath(resolved.path),
        "source": resolved.source,
        "repo_id": resolved.repo_id,
        "revision": resolved.revision,
        "commit_sha": resolved.commit_sha,
        "fingerprint": resolved.fingerprint,
        "files": dict(sorted(resolved.files.items())),
    }
