"""A config file as data: YAML read with one-line errors, ``extends: PROFILE`` resolved,
overrides applied in DVC's dialect. ``idlm.config`` validates the result against the schema.

Only yaml is imported here, and DVC's and Hydra's override modules when there are
overrides (about 0.1 s): validation must fail fast, before anything heavy.
"""

from __future__ import annotations

import copy
import re
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


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with ``overrides`` applied in DVC's dialect, the one ``dvc exp run -S``
    uses on ``params.yaml`` (Hydra's override grammar): ``key=value`` changes a setting (a
    mapping merges into the one there), ``+key=value`` adds one, ``~key`` deletes one. The
    flow, ``idlm config use`` and the stage scripts all read overrides this way. One
    override at a time, so an error names it."""
    result = copy.deepcopy(data)
    for text in overrides:
        result = _apply_one(result, text)
    return result


def _apply_one(data: dict[str, Any], text: str) -> dict[str, Any]:
    """What ``dvc.utils.hydra.apply_overrides`` does to a params file, on data in memory:
    the same parser, the same Hydra call and the same merge, without its two YAML round
    trips through a file (0.3 s of pure-Python YAML per override)."""
    from dvc.utils.collections import merge_dicts, remove_missing_keys, to_omegaconf
    from dvc.utils.hydra import to_hydra_overrides
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import ConfigCompositionException, OverrideParseException
    from omegaconf import OmegaConf

    try:
        parsed = to_hydra_overrides([text])
        new_data = OmegaConf.create(to_omegaconf(data), flags={"allow_objects": True})
        OmegaConf.set_struct(new_data, True)
        ConfigLoaderImpl._apply_overrides_to_config(parsed, new_data)
        new_data = OmegaConf.to_object(new_data)
    except (ConfigCompositionException, OverrideParseException) as exc:
        raise ConfigError(f"override '{text}': {_hydra_problem(exc, text)}") from None
    return remove_missing_keys(merge_dicts(data, new_data), new_data)


def _hydra_problem(exc: Exception, text: str) -> str:
    """Hydra's complaint about one override, in one line, with the way to fix it."""
    chain = []
    while exc is not None and len(chain) < 8:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    said = "\n".join(chain)
    key = text.lstrip("+~").split("=", 1)[0]
    unknown = re.search(r"full_key: (\S+)", said)
    if "To append to your config use" in said and unknown:
        name = re.sub(r"\[(\d+)\]", r".\1", unknown[1])
        return (f"unknown key '{name}' (check the spelling against configs/tiny.yaml; "
                f"a new key is added with +{text.lstrip('+')})")
    if "Could not append" in said:
        return f"'{key}' is already set; change it with {text.lstrip('+')}"
    if "Error merging override" in said or "Could not delete" in said:
        return (f"key '{key}' does not lead to a setting (lists take an index: "
                "ic.phases.0.steps=10)")
    if "=" not in text and not text.startswith("~"):
        return "expected key=value, e.g. ic.train.lr=1e-4"
    first = chain[0].splitlines()[0]
    return (f"not a valid override ({first}); quote a value that has spaces, brackets or "
            "'=', e.g. key='a=b' (https://hydra.cc/docs/advanced/override_grammar/basic)")


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
