"""Would the pinned SGLang accept this bundle? Checked offline, against extracted facts.

``sglang_facts.json`` (written by ``scripts/extract_sglang_facts.py`` from the pinned
release's source) holds the model registry's architecture names and the dLLM table of
``DllmConfig.from_server_args``. :func:`config_problems` replays that function's checks
on a bundle's ``config.json`` and algorithm config, plus what our algorithm needs, and
returns every problem as one line; an empty list means SGLang would start the server.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from idlm.serving.sglang import ALGORITHM_NAME, ARCHITECTURE, SGLANG_VERSION

FACTS_FILE = Path(__file__).resolve().parents[1] / "sglang_facts.json"
# The model family whose weight names and layer layout SGLang's SDAR model loads.
SDAR_MODEL_TYPES = ("qwen3", "sdar")


@cache
def load_facts(path: Path = FACTS_FILE) -> dict[str, Any]:
    facts = json.loads(Path(path).read_text())
    if facts.get("sglang_version") != SGLANG_VERSION:
        raise ValueError(f"{path} describes sglang {facts.get('sglang_version')}, the plugin "
                         f"is pinned to {SGLANG_VERSION}: rerun scripts/extract_sglang_facts.py")
    return facts


def effective_config(config: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``config.json`` as SGLang sees it after ``--json-model-override-args``."""
    return {**config, **(overrides or {})}


def config_problems(config: dict[str, Any], algorithm_config: dict[str, Any],
                    facts: dict[str, Any] | None = None) -> list[str]:
    """Every reason the pinned SGLang (or our algorithm in it) would refuse to serve."""
    facts = facts or load_facts()
    version = facts["sglang_version"]
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not architectures:
        return [f"config.json declares no architectures: sglang {version} refuses a dLLM "
                "without one (DllmConfig.from_server_args)"]
    arch = architectures[0]
    table = facts["dllm_params"]
    problems = []
    if arch not in table:
        problems.append(f"architectures[0] {arch!r} is not in sglang {version}'s dLLM table "
                        f"({', '.join(sorted(table))}): 'Unknown diffusion LLM'")
    if arch not in facts["model_architectures"]:
        problems.append(f"{arch!r} is not a model class of sglang {version}'s registry")
    required = table.get(arch, {}).get("algorithm")
    if required is not None and required != ALGORITHM_NAME:
        problems.append(f"sglang {version} serves {arch} only with {required}, "
                        f"not {ALGORITHM_NAME}")
    if arch != ARCHITECTURE:
        problems.append(f"{ALGORITHM_NAME} supports {ARCHITECTURE} only (got {arch})")
    if config.get("model_type") not in SDAR_MODEL_TYPES:
        problems.append(f"model_type {config.get('model_type')!r}: SGLang's {ARCHITECTURE} loads "
                        f"Qwen3-layout weights ({', '.join(SDAR_MODEL_TYPES)})")
    problems += _algorithm_problems(config, algorithm_config, table.get(arch, {}))
    return problems


def _algorithm_problems(config: dict[str, Any], algorithm_config: dict[str, Any],
                        table_entry: dict[str, Any]) -> list[str]:
    problems = []
    stride = algorithm_config.get("stride")
    block_size = algorithm_config.get("block_size", table_entry.get("block_size"))
    if not isinstance(stride, int) or stride < 2:
        problems.append(f"algorithm config stride {stride!r}: an integer >= 2 is needed")
    elif block_size != 2 * stride - 1:
        problems.append(f"block_size {block_size!r} must be the ISD window 2N-1 = "
                        f"{2 * stride - 1} for stride {stride} (set it in the algorithm config)")
    mask = algorithm_config.get("mask_token_id", table_entry.get("mask_id"))
    vocab = config.get("vocab_size")
    if not isinstance(mask, int) or not isinstance(vocab, int) or not 0 <= mask < vocab:
        problems.append(f"MASK id {mask!r} is not a row of the {vocab!r}-token embedding")
    if config.get("layer_types") and set(config["layer_types"]) != {"full_attention"}:
        problems.append("sliding-window layers: ISD's KV trimming assumes full attention")
    return problems


def mask_note(algorithm_config: dict[str, Any], facts: dict[str, Any] | None = None) -> str:
    """How the MASK id reaches the server: SGLang's table, or our algorithm config."""
    facts = facts or load_facts()
    table_mask = facts["dllm_params"].get(ARCHITECTURE, {}).get("mask_id")
    ours = algorithm_config.get("mask_token_id")
    if ours == table_mask:
        return f"MASK id {ours} equals sglang's table value for {ARCHITECTURE}"
    return (f"MASK id {ours} differs from sglang's table value {table_mask} for "
            f"{ARCHITECTURE}; {ALGORITHM_NAME} takes it from the algorithm config")
