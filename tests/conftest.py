"""Shared fixtures: tiny random Qwen3 models, seeded."""

from __future__ import annotations

import pytest
import torch

MASK_ID = 127
PAD_ID = 0


def tiny_qwen3(seed: int = 0, vocab: int = 128, attention: str = "sdpa"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=128, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=PAD_ID)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture
def model():
    return tiny_qwen3()
