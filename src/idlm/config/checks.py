"""The check that every file a config names exists, before any heavy work starts."""

from __future__ import annotations

from pathlib import Path

from idlm.config.paths import DEFAULT_OUTPUTS, ConfigError, looks_local, resolve_path, workspace
from idlm.config.schema import Config


def check_files(cfg: Config, source: str | Path) -> None:
    """Files the config names must exist before any heavy work starts."""
    ds_files = [("base.train.deepspeed", cfg.base.train.deepspeed)] if cfg.base.train else []
    ds_files.append(("ic.train.deepspeed", cfg.ic.train.deepspeed))
    ds_files.append(("lora.train.deepspeed", cfg.lora.train.deepspeed))
    for key, rel in ds_files:
        if not resolve_path(rel).is_file():
            raise ConfigError(f"{source}: key '{key}': file '{rel}' not found")
    local = [("model.name_or_path", cfg.model.name_or_path),
             ("prepare.dataset.name_or_path", cfg.prepare.dataset.name_or_path),
             ("prepare.tokenizer.name_or_path", cfg.prepare.tokenizer.name_or_path),
             ("gate.tokenizer", cfg.gate.tokenizer or "")]
    local += [(f"evaluate.overrides.{name}.path", override.path or "")
              for name, override in cfg.evaluate.overrides.items()]
    for key, value in local:
        if looks_local(value) and not _made_by_a_stage(cfg, value) and \
                not resolve_path(value).exists():
            raise ConfigError(f"{source}: key '{key}': path '{value}' not found")
    # Inputs the user supplies must exist whatever they look like; a file under the outputs
    # folder is a stage's output (the default, prepare's held-out items), which `dvc repro`
    # deletes and rebuilds: the stage that reads it checks it when it runs.
    prompt_file = cfg.gate.prompt_file
    if prompt_file and not _made_by_a_stage(cfg, prompt_file) and \
            not resolve_path(prompt_file).is_file():
        raise ConfigError(f"{source}: key 'gate.prompt_file': file '{cfg.gate.prompt_file}' not "
                          "found; give a JSONL file with a 'prompt' field per row, or null")


def _made_by_a_stage(cfg: Config, value: str) -> bool:
    """Under this run's outputs folder, or under the profiles' default one: a run with
    ``outputs=<elsewhere>`` (a test, an experiment) still names the default prompt file."""
    path = resolve_path(value).resolve()
    roots = (cfg.out().resolve(), (workspace() / DEFAULT_OUTPUTS).resolve())
    return any(path.is_relative_to(root) for root in roots)
