"""What every ``stages/<name>.py`` shares: argument parsing, config loading, atomic writes.

Every stage's ``run(cfg)`` is ``idlm.stages.<name>.run``, named as in ``dvc.yaml``; it
never parses arguments or reads the environment. The script ``stages/<name>.py`` calls
:func:`stage_main`, which does both, validates the whole config before anything heavy is
imported, then imports the stage and runs it, and prints the stage's metrics.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from idlm import config as config_mod
from idlm.errors import StageError
from idlm.training.distributed import exit_process  # noqa: F401 - the stage scripts' exit


def write_json_atomic(path: Path, payload: Any) -> Path:
    """Write JSON via a temp file + rename so a killed stage never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared files
    os.replace(tmp, path)
    return path


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; on success it replaces ``final`` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are shared folders
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"stages/{name}.py", description=description)
    p.add_argument("--config", default=None,
                   help="config file (default: params.yaml, the active resolved config)")
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment is used.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. ic.train.lr=1e-4")
    return p


def stage_main(name: str, description: str, argv: list[str] | None = None,
               run: Callable[[config_mod.Config], dict[str, Any]] | None = None) -> int:
    """Parse, validate (fast, before heavy imports), run ``idlm.stages.<name>.run`` (or
    ``run``), print its metrics as JSON."""
    args = parser(name, description).parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from idlm.decoding.errors import DecodingError  # a model folder a stage could not load

    if run is None:
        run = importlib.import_module(f"idlm.stages.{name}").run

    try:
        metrics = run(cfg)
    except (StageError, DecodingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"stage": name, **(metrics or {})}, indent=2, sort_keys=True, default=str))
    return 0
