"""Typed configuration: one schema for every profile and stage.

A profile is a YAML file under ``configs/`` (``tiny``, ``qwen3-8b``, ``qwen3-32b``).
``params.yaml`` at the repo root is the *active, fully resolved* config: DVC tracks
its sections as stage params (so ``dvc exp run -S ic.lr=...`` edits it), and
``idlm config use PROFILE [key=value ...]`` rewrites it from a profile. Overrides are
written in DVC's dialect everywhere (``idlm.config.files.apply_overrides``).

Only pydantic and yaml are imported here, so validation fails fast (well under
2 s) with one line naming the file, the key and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from idlm.config.checks import check_files
from idlm.config.files import apply_overrides, read_config
from idlm.config.paths import (
    DEFAULT_OUTPUTS,
    ConfigError,
    active_config,
    config_dir,
    pipeline_stages,
    workspace,
)
from idlm.config.schema import (
    Config,
    FlowConfig,
    HubData,
    LoraSection,
    ModelConfig,
    Optimisation,
    Phase,
    SyntheticData,
    TinyArchitecture,
    TokenizerSpec,
    TrainSettings,
)

__all__ = ["DEFAULT_OUTPUTS", "Config", "ConfigError", "FlowConfig", "HubData", "LoraSection",
           "ModelConfig", "Optimisation", "Phase", "SyntheticData", "TinyArchitecture",
           "TokenizerSpec", "TrainSettings", "active_config", "config_dir", "dump", "load",
           "load_profile", "pipeline_stages", "resolved_data", "validate", "workspace",
           "write_active"]

# Parts of an error location that name a member of a union type, not a key.
_UNION_TAG = re.compile(r"^(constrained-\w+|int|float|bool|str|function-\w+\[.*\]|\w+\[.*\])$")


def _describe_error(err: dict[str, Any]) -> str:
    parts = [str(p) for p in err["loc"]]
    key = ".".join(p for p in parts if not _UNION_TAG.match(p)) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}' (check the spelling against configs/tiny.yaml)"
    if kind == "missing":
        return f"missing key '{key}'"
    if kind == "value_error":  # our validators: the message names its key and the allowed values
        message = err["msg"].removeprefix("Value error, ")
        return message if message.startswith("key '") or key == "<root>" else (
            f"key '{key}': {message}")
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    return f"key '{key}': {err['msg'].lower()} (got {shown})"


def validate(data: dict[str, Any], source: str | Path) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe_error(exc.errors()[0])}") from None


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load the active config (``params.yaml``) or any config file, with overrides.

    Overrides apply to the resolved config (every default filled in), as ``dvc exp run -S``
    applies them to ``params.yaml``: the same keys exist and the same dialect holds."""
    path = Path(path) if path else active_config()
    data = read_config(path)
    if overrides:
        try:
            data = apply_overrides(resolved_data(validate(data, path)), overrides)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    cfg = validate(data, path)
    check_files(cfg, path)
    return cfg


def load_profile(profile: str, overrides: list[str] | None = None) -> Config:
    path = config_dir() / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in config_dir().glob("*.yaml")))
        raise ConfigError(f"{path}: no such profile '{profile}' (known: {known})")
    return load(path, overrides)


def resolved_data(cfg: Config) -> dict[str, Any]:
    """``cfg`` as plain YAML data, every default filled in: what ``params.yaml`` holds.
    Integer keys (a gate threshold's concurrency) stay integers, as a profile writes them,
    so an override names them the same way in a profile and in ``params.yaml``."""
    return _int_keys(cfg.model_dump(mode="json"))


def _int_keys(node: Any) -> Any:
    if isinstance(node, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_int_keys(v) for v in node]
    return node


def dump(cfg: Config) -> str:
    return yaml.safe_dump(resolved_data(cfg), sort_keys=False)


def write_active(cfg: Config, path: Path | None = None) -> Path:
    path = path or active_config()
    header = f"# Active config, resolved from configs/{cfg.profile}.yaml by `idlm config use`.\n"
    header += "# DVC tracks its sections as stage params: `dvc exp run -S key=value` edits them.\n"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + dump(cfg))
    tmp.replace(path)
    return path
