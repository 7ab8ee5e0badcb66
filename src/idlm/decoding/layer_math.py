"""One Qwen3 decoder layer's maths outside attention, as pure functions of tensors.

The lean forward (``lean_forward``) runs them eagerly, with each projection a ``Matmul``
plus the gated-LoRA update; ``compiled`` runs the same functions through ``torch.compile``
with plain matmuls. The KV-cache writes between them are ``kv_cache.write_window``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

Linear = Callable[[torch.Tensor], torch.Tensor]


def attention_inputs(hidden: torch.Tensor, input_norm: torch.Tensor, head_norm: torch.Tensor,
                     rope: tuple[torch.Tensor, torch.Tensor], qkv: Linear,
                     heads: tuple[int, int, int], eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer up to attention: query and key (normed per head, rotated) and value, each
    [B*W, heads, d]. ``qkv`` is the fused projection (with the LoRA update, if any)."""
    q_heads, kv_heads, head_dim = heads
    projected = qkv(rms_norm(hidden, input_norm, eps)).view(
        -1, q_heads + 2 * kv_heads, head_dim)
    query_key = rotate(rms_norm(projected[:, :q_heads + kv_heads], head_norm, eps), *rope)
    query, key = query_key.split([q_heads, kv_heads], dim=1)
    return query, key, projected[:, q_heads + kv_heads:]


def heads_first(heads: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """[B*W, heads, d] -> [B, heads, W, d] (a view)."""
    return heads.view(rows, width, heads.shape[1], heads.shape[2]).transpose(1, 2)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
           scale: float, gqa: bool) -> torch.Tensor:
    """SDPA of a window's queries [B, q_heads, W, d] over the readable keys and values,
    with the additive mask; [B*W, q_heads * d]."""
    rows, _, width, _ = query.shape
    attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                              scale=scale, enable_gqa=gqa)
    return attended.transpose(1, 2).reshape(rows * width, -1)


def attention_output_and_mlp(hidden: torch.Tensor, attended: torch.Tensor,
                             post_norm: torch.Tensor, out: Linear, gate_up: Linear,
                             down: Linear, eps: float) -> torch.Tensor:
    """A layer after attention: output projection and residual, then the SwiGLU MLP."""
    hidden = hidden + out(attended)
    gate, up = gate_up(rms_norm(hidden, post_norm, eps)).chunk(2, dim=-1)
    return hidden + down(F.silu(gate) * up)


def rotate(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, HF's ``x * cos + rotate_half(x) * sin``: ``sin`` carries rotate_half's sign
    (its first half negated), so rotate_half becomes a swap of the halves."""
    half = heads.shape[-1] // 2
    swapped = torch.cat([heads[..., half:], heads[..., :half]], dim=-1)
    return heads * cos + swapped * sin


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Qwen3RMSNorm (in fp32, weight applied in the input dtype); the q/k head norm
    passes one weight row per head. In fp32, F.rms_norm gives HF's bits in one dispatch
    instead of six (the tests check both)."""
    if hidden.dtype == torch.float32:
        size = (hidden.shape[-1],)
        if weight.dim() == 1:
            return F.rms_norm(hidden, size, weight, eps)
        return weight * F.rms_norm(hidden, size, None, eps)
    upcast = hidden.float()
    normed = upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(hidden.dtype)
