"""Put our algorithm where SGLang looks for it: a module in ``sglang/srt/dllm/algorithm/``.

SGLang 0.5.21 finds dLLM algorithms only by importing every module of that package
(``Algorithm = TheClass``); there is no entry point for them. So installing is a file
write, done reproducibly: :func:`install` writes a two-line shim (content fixed by this
code, checked byte for byte by :func:`status`), atomically, into the package folder that
``importlib`` finds for ``sglang`` (without importing sglang). The plugin entry point
calls :func:`ensure_installed` in every SGLang process; ``python -m
idlm.serving.sglang.install`` does it by hand (e.g. in an image build, where the
server's user may not own site-packages).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from idlm.serving.sglang import ALGORITHM_MODULE, ALGORITHM_NAME, SGLANG_VERSION

SHIM = (f'"""{ALGORITHM_NAME}: ISD / R-ISD from idlm (written by idlm.serving.sglang.install'
        f' for sglang {SGLANG_VERSION}; do not edit)."""\n'
        "from idlm.serving.sglang.algorithm import algorithm_class\n\n"
        "Algorithm = algorithm_class()\n")


class InstallError(RuntimeError):
    """The shim cannot be placed, as one line saying what to do."""


def algorithm_package(root: Path | None = None) -> Path:
    """``sglang/srt/dllm/algorithm`` of the installed sglang (or under ``root``)."""
    if root is None:
        spec = importlib.util.find_spec("sglang")
        if spec is None or not spec.submodule_search_locations:
            raise InstallError("sglang is not installed here: build the server environment "
                               "with scripts/setup_serve.sh")
        root = Path(next(iter(spec.submodule_search_locations))).parent
    folder = Path(root) / "sglang" / "srt" / "dllm" / "algorithm"
    if not (folder / "__init__.py").is_file():
        raise InstallError(f"{folder} is not an sglang dLLM algorithm package: sglang "
                           f"{SGLANG_VERSION} is required")
    return folder


def shim_path(root: Path | None = None) -> Path:
    return algorithm_package(root) / f"{ALGORITHM_MODULE}.py"


def status(root: Path | None = None) -> str:
    """``installed``, ``missing`` or ``stale`` (a different file under our module name)."""
    path = shim_path(root)
    if not path.is_file():
        return "missing"
    return "installed" if path.read_text() == SHIM else "stale"


def install(root: Path | None = None) -> Path:
    """Write the shim (idempotent, atomic: an import never sees half a file)."""
    path = shim_path(root)
    if status(root) == "installed":
        return path
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            handle.write(SHIM)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as error:
        raise InstallError(f"cannot write {path} ({error.strerror}): run `python -m "
                           "idlm.serving.sglang.install` as the owner of the sglang "
                           "installation") from None
    return path


def uninstall(root: Path | None = None) -> bool:
    path = shim_path(root)
    if status(root) == "missing":
        return False
    path.unlink()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idlm.serving.sglang.install",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("action", nargs="?", default="install",
                        choices=["install", "status", "uninstall"])
    parser.add_argument("--root", type=Path, default=None,
                        help="folder holding the sglang package (default: the installed one)")
    args = parser.parse_args(argv)
    try:
        if args.action == "status":
            print(f"{status(args.root)}: {shim_path(args.root)}")
        elif args.action == "uninstall":
            print(("removed " if uninstall(args.root) else "not installed: ")
                  + str(shim_path(args.root)))
        else:
            print(f"installed {install(args.root)}")
    except InstallError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
