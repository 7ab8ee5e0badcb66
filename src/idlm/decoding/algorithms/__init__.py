"""Decoding algorithms as a registry: one small module each, found by discovery.

Every module of this package whose name does not start with ``_`` (``base`` aside) exports
``ALGORITHM``, an :class:`~idlm.decoding.algorithms.base.Algorithm` named like the module,
so adding an algorithm is one file (and its test). Registered: ``ar`` (the reference),
``isd``, ``risd`` and ``argmax`` (the argmax-proposal variant of ISD and R-ISD: see its
module). What the rest of the code reads from here instead of spelling out names:

* ``for_request(mode, proposal, gated)``: the algorithm that runs a request;
* ``for_mode(mode)``: its window shape (drafts per stride, stride limits);
* ``modes()`` / ``proposals()`` / ``systems()``: what a request's ``mode``, its
  ``proposal`` and ``load_engine`` / ``idlm generate --mode`` accept;
* ``get(name)`` / ``names()``.

Torch-free, like ``base``: the CLI builds its choices from it before anything heavy loads.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from functools import cache

from idlm.decoding.algorithms.base import DEFAULT_PROPOSAL, MAX_STRIDE, Algorithm, gate
from idlm.decoding.errors import DecodingError

__all__ = ["DEFAULT_PROPOSAL", "MAX_STRIDE", "Algorithm", "discover", "for_mode", "for_request",
           "gate", "get", "mode_error", "modes", "names", "proposal_error", "proposals",
           "registry", "systems"]

NOT_ALGORITHMS = frozenset({"base"})


def discover(path: Iterable[str], package: str) -> dict[str, Algorithm]:
    """Import every algorithm module found on ``path`` (the folders of ``package``)."""
    found: dict[str, Algorithm] = {}
    for module in sorted(pkgutil.iter_modules(list(path)), key=lambda info: info.name):
        if module.name.startswith("_") or module.name in NOT_ALGORITHMS:
            continue
        imported = importlib.import_module(f"{package}.{module.name}")
        algorithm = getattr(imported, "ALGORITHM", None)
        if not isinstance(algorithm, Algorithm) or algorithm.name != module.name:
            raise DecodingError(f"{package}.{module.name} must export ALGORITHM = "
                                f"Algorithm(name={module.name!r}, ...)")
        found[module.name] = algorithm
    for mode in dict.fromkeys(a.mode for a in found.values()):
        # One window shape per mode: a request's drafts must not depend on its proposal.
        if len({a.drafts for a in found.values() if a.mode == mode}) > 1:
            raise DecodingError(f"the algorithms of mode {mode!r} disagree on drafting")
    return found


@cache
def registry() -> dict[str, Algorithm]:
    """This package's algorithms by name (discovered once)."""
    return discover(__path__, __name__)


def names() -> tuple[str, ...]:
    return tuple(registry())


def get(name: str) -> Algorithm:
    algorithm = registry().get(name)
    if algorithm is None:
        raise DecodingError(f"unknown decoding algorithm {name!r}: known are "
                            f"{', '.join(names())}")
    return algorithm


def modes() -> tuple[str, ...]:
    """The values a request's ``mode`` takes (``ar``, ``isd``)."""
    return tuple(dict.fromkeys(a.mode for a in registry().values()))


def proposals() -> tuple[str, ...]:
    """The proposal rules of the drafting algorithms, the default first."""
    rules = dict.fromkeys(a.proposal for a in registry().values() if a.proposal is not None)
    return tuple(sorted(rules, key=lambda rule: rule != DEFAULT_PROPOSAL))


def systems() -> tuple[str, ...]:
    """The algorithms tied to a kind of model (what ``load_engine`` takes as its mode)."""
    return tuple(a.name for a in registry().values() if a.system)


def mode_error(mode: str) -> str | None:
    if mode in modes():
        return None
    hints = [f"{a.name} is {a.mode} on a gated model" for a in registry().values()
             if a.gated and a.name != a.mode]
    return (f"unknown mode {mode!r}: use {_either(modes())}"
            + (f" ({'; '.join(hints)})" if hints else ""))


def proposal_error(proposal: str) -> str | None:
    if proposal in proposals():
        return None
    return f"unknown proposal {proposal!r}: use {_either(proposals())}"


def for_mode(mode: str) -> Algorithm:
    """The algorithm that fixes a ``mode``'s window shape (all of a mode's draft alike)."""
    candidates = [a for a in registry().values() if a.mode == mode]
    if not candidates:
        raise DecodingError(mode_error(mode))
    return next((a for a in candidates if a.name == mode), candidates[0])


def for_request(mode: str, proposal: str, gated: bool) -> Algorithm:
    """What runs a request of ``mode`` with ``proposal`` on a model with (``gated``) or
    without the gated adapter: ``ar`` for mode ar (it proposes nothing), else the drafting
    algorithm with that proposal rule and that gate (``argmax`` runs with either)."""
    problem = mode_error(mode)
    if problem is not None:
        raise DecodingError(problem)
    matches = [a for a in registry().values() if a.serves(mode, proposal, gated)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise DecodingError(f"mode {mode!r} with proposal {proposal!r} is ambiguous: "
                            f"{', '.join(a.name for a in matches)} all serve it")
    model = "with" if gated else "without"
    raise DecodingError(proposal_error(proposal) or f"no algorithm runs mode {mode!r} with "
                        f"proposal {proposal!r} on a model {model} the gated adapter")


def _either(values: tuple[str, ...]) -> str:
    quoted = [repr(value) for value in values]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
