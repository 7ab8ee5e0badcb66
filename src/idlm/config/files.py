"""A config file as data: YAML read with one-line errors, ``extends: PROFILE`` resolved,
``key=value`` overrides applied. ``idlm.config`` validates the result against the schema.

Only yaml is imported here (validation must fail fast, before anything heavy).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from idlm.config.paths import ConfigError, config_dir


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (profiles live in {config_dir()})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. ic.train.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': the value is not valid YAML; quote it, "
                          "e.g. key='text'") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        try:
            node: Any = data
            for k in keys[:-1]:
                node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
            if isinstance(node, list):
                node[int(keys[-1])] = value
            else:
                node[keys[-1]] = value
        except (ValueError, IndexError, TypeError, AttributeError):
            # A path through a scalar or past a list's end: name it instead of a traceback.
            raise ConfigError(f"override '{text}': key '{'.'.join(keys)}' does not lead to a "
                              "setting (lists take an index: ic.phases.0.steps=10)") from None
    return data


def _merged(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``: a mapping merges key by key; anything else, an empty
    mapping included (``overrides: {}``), replaces."""
    out = copy.deepcopy(parent)
    for key, value in child.items():
        if value and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's data; ``extends: PROFILE`` starts from that profile (same folder)."""
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: 'extends' names a profile, e.g. extends: tiny")
    parent_path = path.parent / f"{parent}.yaml"
    if parent_path.resolve() in {p.resolve() for p in (*_chain, path)}:
        raise ConfigError(f"{path}: 'extends: {parent}' loops back to itself")
    if not parent_path.is_file():
        raise ConfigError(f"{path}: 'extends: {parent}' but {parent_path} does not exist")
    return _merged(read_config(parent_path, (*_chain, path)), data)
