"""The ``sglang.srt.plugins`` entry point: what SGLang runs in each of its processes.

``register`` (named in pyproject's ``[project.entry-points."sglang.srt.plugins"]``)
makes sure our algorithm module is in ``sglang/srt/dllm/algorithm/`` (and, if SGLang has
already scanned that package, adds the class to its table), then registers the hooks.
SGLang applies registered hooks itself right after running its plugins.
"""

from __future__ import annotations

import logging
import sys

from idlm.serving.sglang import ALGORITHM_NAME

logger = logging.getLogger(__name__)
ALGORITHM_PACKAGE = "sglang.srt.dllm.algorithm"


def ensure_installed() -> None:
    from idlm.serving.sglang.install import InstallError, install, status

    try:
        if status() != "installed":
            logger.info("idlm: installed %s", install())
    except InstallError as error:
        logger.error("idlm: %s", error)


def add_to_loaded_table() -> None:
    """SGLang builds its name -> class table once, when the package is first imported; a
    shim written after that is found only on the next start, so add the class now."""
    package = sys.modules.get(ALGORITHM_PACKAGE)
    if package is None or ALGORITHM_NAME in package.algo_name_to_cls:
        return
    from idlm.serving.sglang.algorithm import algorithm_class

    package.algo_name_to_cls[ALGORITHM_NAME] = algorithm_class()


def register() -> None:
    from idlm.serving.sglang.hooks import register_all

    ensure_installed()
    add_to_loaded_table()
    register_all()
