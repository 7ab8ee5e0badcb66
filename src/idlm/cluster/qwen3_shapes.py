"""Qwen3 dense architectures, from the public ``config.json`` of each hub checkpoint.

``idlm preflight`` builds the model from these when the checkpoint's own config is not on
this machine (no local folder, no hub cache): no weights and no network are needed to
size a training plan. Keys are Qwen3Config arguments; the name matches the hub id's tail.
"""

from __future__ import annotations

from typing import Any

# Shared by every Qwen3 dense checkpoint.
_COMMON: dict[str, Any] = {
    "vocab_size": 151936,
    "head_dim": 128,
    "num_key_value_heads": 8,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
}

QWEN3_SHAPES: dict[str, dict[str, Any]] = {
    name: {**_COMMON, **shape} for name, shape in {
        "qwen3-0.6b": {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
                       "intermediate_size": 3072, "tie_word_embeddings": True},
        "qwen3-1.7b": {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16,
                       "intermediate_size": 6144, "tie_word_embeddings": True},
        "qwen3-4b": {"hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                     "intermediate_size": 9728, "tie_word_embeddings": True},
        "qwen3-8b": {"hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                     "intermediate_size": 12288, "tie_word_embeddings": False},
        "qwen3-14b": {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                      "intermediate_size": 17408, "tie_word_embeddings": False},
        "qwen3-32b": {"hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 64,
                      "intermediate_size": 25600, "tie_word_embeddings": False},
    }.items()
}


def known_shape(name_or_path: str) -> dict[str, Any] | None:
    """The shape for ``Qwen/Qwen3-8B`` (or ``.../Qwen3-8B-Base``, a local ``qwen3-8b``)."""
    tail = name_or_path.rstrip("/").rsplit("/", 1)[-1].lower().removesuffix("-base")
    return QWEN3_SHAPES.get(tail)
