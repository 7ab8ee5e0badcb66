"""Build or load the Qwen3 causal LM that every stage trains and decodes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from idlm.config import ModelConfig, TinyArchitecture

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, Qwen3Config


def attention_implementation(requested: str, device: str) -> str:
    """``flex`` needs a GPU for speed (a dense 2L x 2L mask is too big at L=4096)."""
    if requested == "auto":
        return "flex_attention" if device.startswith("cuda") else "sdpa"
    return {"sdpa": "sdpa", "flex": "flex_attention"}[requested]


def tiny_config(
    arch: TinyArchitecture,
    vocab_size: int,
    pad_token_id: int,
    eos_token_id: int,
    max_position_embeddings: int,
) -> Qwen3Config:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        head_dim=arch.head_dim,
        intermediate_size=arch.intermediate_size,
        rope_theta=arch.rope_theta,
        tie_word_embeddings=arch.tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def build_tiny(
    arch: TinyArchitecture,
    vocab_size: int,
    pad_token_id: int,
    eos_token_id: int,
    max_position_embeddings: int,
    seed: int,
    attention: str = "sdpa",
) -> PreTrainedModel:
    """A freshly initialised tiny Qwen3ForCausalLM (seeded, fp32)."""
    import torch
    from transformers import Qwen3ForCausalLM

    config = tiny_config(arch, vocab_size, pad_token_id, eos_token_id, max_position_embeddings)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)


def load_causal_lm(
    path: str | Path,
    model_cfg: ModelConfig | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    attention: str | None = None,
) -> PreTrainedModel:
    """Load a saved/resolved checkpoint folder with the configured dtype and attention."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is None:
        name = model_cfg.dtype if model_cfg else "float32"
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
    if attention is None:
        attention = attention_implementation(model_cfg.attention if model_cfg else "auto", device)
    check_weight_files(Path(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention)
    return model.to(device)


def check_weight_files(folder: Path) -> None:
    """Every weight file's header parses and covers the file, before transformers reads it:
    a truncated or damaged file is one line naming it and what to do, not a traceback."""
    from idlm.model.hub import CheckpointError, check_safetensors_header

    for weights in sorted(folder.glob("*.safetensors")):
        try:
            check_safetensors_header(weights)
        except CheckpointError:
            raise CheckpointError(f"{weights}: truncated or corrupt safetensors file; "
                                  f"{rerun_hint(folder)}") from None


def rerun_hint(folder: Path) -> str:
    """What rebuilds a model folder: its stage (outputs/<stage>/model) or its source."""
    from idlm.config import pipeline_stages

    stage = folder.resolve().parent.name
    if folder.name == "model" and stage in pipeline_stages():
        return f"rerun `dvc repro {stage}` (it rewrites {folder})"
    return "re-save or re-download the checkpoint"


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
