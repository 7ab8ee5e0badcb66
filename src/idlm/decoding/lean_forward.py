"""The engine's decoder forward: a functional Qwen3 over the model's own weights.

transformers' decoder spends most of a small decode step on plumbing (mask builders,
cache and kwargs handling, PEFT's per-linear wrappers and the gate hooks), not arithmetic.
``LeanDecoder`` runs the same maths in a few ops per layer: fused q/k/v and gate/up
matmuls, one RMSNorm over the q and k heads together, RoPE from tables built once, K/V
written straight into the engine's ``RaggedKVCache`` and one SDPA call.

Every step, AR or ISD, attends through the same call (an explicit additive mask, GQA
inside SDPA, the key length rounded up to a bucket), so an AR step and an ISD window's
anchor rows run the same attention kernel over the same keys in the same dtype. Whether
their logits are then bit-equal depends on the matmul backend too: bf16 (oneDNN) gives a
row the same bits whatever the row count, fp32 does not (MKL picks a kernel by row count,
and ``cpu_matmul`` takes oneDNN for the windows where it is faster), so there they agree
to ~1e-6 only; see the tests.

Memory: the fused q/k/v and gate/up matrices are copies (on CPU, o, down and the LM head
are also copied, transposed, and fp32 keeps a oneDNN-packed copy of each, see
``cpu_matmul``), so those weights are held two or three times while an engine lives.

R-ISD: a gated LoRA (``idlm.model.gated_lora``) is read from its PEFT modules once, as
fused low-rank updates (``lean_lora.py``) applied only at the gated (MASK) rows, and not
at all in a step without one. Ungated rows run exactly the base model's ops, so they are
bit-identical to it, as on the PEFT path.

``compile`` runs the layers of a forward without LoRA rows (AR, ISD) as one
``torch.compile``'d graph (``compiled.py``), with an eager fallback.

``decoder_forward`` picks this path, or, for a model it cannot run (not Qwen3-shaped, an
ungated or multi-adapter PEFT model, dynamic RoPE), the transformers decoder with a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from idlm.decoding.compiled import CompiledStack
from idlm.decoding.cpu_matmul import Matmul
from idlm.decoding.kv_cache import CAPACITY_CHUNK, RaggedKVCache
from idlm.decoding.layer_math import (
    attend,
    attention_inputs,
    attention_output_and_mlp,
    heads_first,
    rms_norm,
)
from idlm.decoding.lean_lora import (
    GatedRows,
    GroupLora,
    LayerLora,
    LeanUnsupported,
    TailRows,
    layer_lora,
)

# RoPE types whose tables depend on the sequence length: the fixed tables would be wrong.
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")
# Key-length bucket: the KV cache's capacity chunk, so a bucket never outgrows the buffer.
KEY_BUCKET = CAPACITY_CHUNK
# Positions past the context length that a window's padding slots may reach (2N-1 wide).
WINDOW_MARGIN = 64


class DecoderForward(Protocol):
    """One decode forward: write the window's K/V into the cache, return hidden states."""

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 cache: RaggedKVCache, lengths: torch.Tensor, key_length: int,
                 drafting: torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class LayerWeights:
    """One decoder layer's tensors, q/k/v and gate/up fused along the output dim."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    head_norm: torch.Tensor   # [q_heads + kv_heads, head_dim]: q_norm then k_norm weights
    qkv: Matmul               # hidden -> (q_heads + 2 kv_heads) * head_dim
    out: Matmul
    gate_up: Matmul           # hidden -> 2 * intermediate
    down: Matmul
    lora: LayerLora | None


class LeanDecoder:
    """A Qwen3 decoder forward for the engine, built once per model."""

    def __init__(self, decoder: nn.Module, config: Any, context_length: int,
                 token_gate: Any = None, compile: bool = False) -> None:
        _check_shape(decoder, config)
        self.q_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.decoder = decoder
        # Detached views of the model's parameters (no copies), except the fused matrices.
        with torch.no_grad():
            self.embed = decoder.embed_tokens.weight.detach()
            self.final_norm = decoder.norm.weight.detach()
            self.layers = [self._layer(layer) for layer in decoder.layers]
        self.mask_delta = _mask_delta(token_gate, self.embed.dtype)
        self.gated = token_gate is not None
        # The layers as one torch.compile'd graph for forwards without LoRA rows.
        self.compiled = self._compiled() if compile else None
        # The gated rows of the last ``drafting`` seen (a reused layout skips the search).
        self._last_drafting: torch.Tensor | None = None
        self._last_gated_rows: GatedRows | None = None
        self._tables(context_length + WINDOW_MARGIN)

    def _compiled(self) -> CompiledStack:
        # ``Matmul.weight`` is the [in, out] operand that ``torch.mm`` takes.
        weights = [(layer.input_norm, layer.head_norm, layer.qkv.weight, layer.out.weight,
                    layer.post_norm, layer.gate_up.weight, layer.down.weight)
                   for layer in self.layers]
        return CompiledStack(weights, (self.q_heads, self.kv_heads, self.head_dim),
                             self.eps, self.scale)

    def _tables(self, key_length: int) -> None:
        """RoPE tables and the slot index for positions < ``key_length`` (built once; grown
        only if a window reaches past the context length the engine was made for)."""
        self.cos, self.sin = _rope_tables(self.decoder, key_length, self.embed)
        # Every mask and window index is a slice of this: nothing is built per step.
        self.slots = torch.arange(key_length, device=self.embed.device)
        self.blocked = torch.tensor(float("-inf"), dtype=self.embed.dtype,
                                    device=self.embed.device)

    def _layer(self, layer: nn.Module) -> LayerWeights:
        attention, mlp = layer.self_attn, layer.mlp
        q_norm = attention.q_norm.weight.expand(self.q_heads, -1)
        k_norm = attention.k_norm.weight.expand(self.kv_heads, -1)
        qkv = [attention.q_proj, attention.k_proj, attention.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        return LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            head_norm=torch.cat([q_norm, k_norm]).contiguous(),
            qkv=Matmul(torch.cat([_base_weight(m) for m in qkv])),
            out=Matmul(_base_weight(attention.o_proj)),
            gate_up=Matmul(torch.cat([_base_weight(m) for m in gate_up])),
            down=Matmul(_base_weight(mlp.down_proj)),
            lora=layer_lora(qkv, gate_up, attention.o_proj, mlp.down_proj, self.embed.dtype))

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 cache: RaggedKVCache, lengths: torch.Tensor, key_length: int,
                 drafting: torch.Tensor | None) -> torch.Tensor:
        """Hidden states [B, W, hidden] after the final norm; the window's K/V are cached.

        ``drafting`` marks the MASK slots (R-ISD's gate); ``None`` or no True: no LoRA.
        """
        rows, width = input_ids.shape
        # Keys read in whole buckets (masked beyond each row's window): an AR step and an
        # ISD window over the same context then attend the same key count, which SDPA's
        # reductions depend on. The cache's capacity is a whole number of buckets.
        key_length = -(-key_length // KEY_BUCKET) * KEY_BUCKET
        if key_length > self.slots.shape[0]:
            self._tables(key_length + WINDOW_MARGIN)
        cache.begin_forward(lengths, width, key_length)
        gated_rows = self._gated_rows(drafting)
        hidden = F.embedding(input_ids, self.embed).view(rows * width, -1)
        if gated_rows is not None and self.mask_delta is not None:
            # The same add as MaskEmbeddingDelta's, at the gated rows only.
            if isinstance(gated_rows, slice):
                hidden[gated_rows] += self.mask_delta
            elif isinstance(gated_rows, TailRows):
                gated_rows.of(hidden).add_(self.mask_delta)
            else:
                hidden.index_copy_(0, gated_rows, hidden.index_select(0, gated_rows)
                                   + self.mask_delta)
        positions = position_ids.reshape(-1)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        mask = self._mask(lengths, width, key_length)

        def eager() -> torch.Tensor:
            return self.layer_stack(hidden, gated_rows, cache, (cos, sin), mask,
                                    (rows, width))

        if self.compiled is not None and gated_rows is None:
            hidden = self.compiled(hidden, (cos, sin), mask, cache, eager)
        else:
            hidden = eager()
        return rms_norm(hidden, self.final_norm, self.eps).view(rows, width, -1)

    def layer_stack(self, hidden: torch.Tensor, gated_rows: GatedRows | None,
                    cache: RaggedKVCache, rope: tuple[torch.Tensor, torch.Tensor],
                    mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Every layer, eagerly: [B*W, hidden] in and out, K/V written to ``cache``."""
        for index, layer in enumerate(self.layers):
            lora = layer.lora if gated_rows is not None else None
            hidden = self._layer_forward(layer, lora, hidden, gated_rows, cache, index,
                                         rope, mask, shape)
        return hidden

    def _gated_rows(self, drafting: torch.Tensor | None) -> GatedRows | None:
        """The flat MASK rows, once per forward (a slice when contiguous); None when the
        LoRA can be skipped."""
        if not self.gated or drafting is None:
            return None
        if drafting is self._last_drafting:   # a uniform window's layout, reused as is
            return self._last_gated_rows
        found = _gated_layout(drafting)
        self._last_drafting, self._last_gated_rows = drafting, found
        return found

    def _mask(self, lengths: torch.Tensor, width: int, key_length: int) -> torch.Tensor:
        """Additive [B, 1, W, K]: query i of row r sees slots <= lengths[r] + i (causal,
        ragged). Built once per forward as the float mask SDPA would make of a bool one in
        every layer."""
        query_limit = lengths[:, None] + self.slots[:width]
        visible = (self.slots[:key_length] <= query_limit[:, :, None])[:, None]
        return self.blocked.new_zeros(()).where(visible, self.blocked)

    def _layer_forward(self, layer: LayerWeights, lora: LayerLora | None,
                       hidden: torch.Tensor, gated_rows: GatedRows | None,
                       cache: RaggedKVCache, index: int,
                       rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                       shape: tuple[int, int]) -> torch.Tensor:
        rows, width = shape
        query, key, value = attention_inputs(
            hidden, layer.input_norm, layer.head_norm, rope,
            lambda x: _linear(x, layer.qkv, lora and lora.qkv, gated_rows),
            (self.q_heads, self.kv_heads, self.head_dim), self.eps)
        keys, values = cache.update(heads_first(key, rows, width),
                                    heads_first(value, rows, width), index)
        attended = attend(heads_first(query, rows, width), keys, values, mask, self.scale,
                          self.q_heads != self.kv_heads)
        return attention_output_and_mlp(
            hidden, attended, layer.post_norm,
            lambda x: _linear(x, layer.out, lora and lora.out, gated_rows),
            lambda x: _linear(x, layer.gate_up, lora and lora.gate_up, gated_rows),
            lambda x: _linear(x, layer.down, lora and lora.down, gated_rows), self.eps)


def _gated_layout(drafting: torch.Tensor) -> GatedRows | None:
    """The gated rows of a [B, W] gate: None, a slice (contiguous), the same tail of every
    window (``TailRows``), or an index."""
    gated_rows = drafting.reshape(-1).nonzero().squeeze(-1)
    if not gated_rows.numel():
        return None
    first, last = gated_rows[[0, -1]].tolist()
    if last - first + 1 == gated_rows.numel():
        return slice(first, last + 1)
    rows, width = drafting.shape
    start = first % width
    tail = torch.zeros(width, dtype=torch.bool, device=drafting.device)
    tail[start:] = True
    if bool((drafting == tail).all()):
        return TailRows(rows, width, start)
    return gated_rows


def _linear(inputs: torch.Tensor, weight: Matmul, lora: GroupLora | None,
            gated_rows: GatedRows | None) -> torch.Tensor:
    """``inputs @ weight``, plus the low-rank update at the gated rows."""
    output = weight(inputs)
    if lora is not None and gated_rows is not None:
        lora.add_to(output, inputs, gated_rows)
    return output


@torch.no_grad()
def _rope_tables(decoder: nn.Module, positions: int, like: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for every position, from the model's own rotary module (its
    inv_freq, scaling and dtype), so a table lookup equals what HF computes per call."""
    cos, sin = decoder.rotary_emb(like[:1], torch.arange(positions, device=like.device)[None])
    half = sin.shape[-1] // 2
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos[0].contiguous(), signed_sin[0].contiguous()


def _mask_delta(token_gate: Any, dtype: torch.dtype) -> torch.Tensor | None:
    delta_module = getattr(token_gate, "mask_embedding", None)
    # Cast as MaskEmbeddingDelta casts it: to the embeddings' dtype, before the add.
    return None if delta_module is None else delta_module.delta.detach().to(dtype)


def lm_head(head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LM head as a ``Matmul`` (on CPU about 2.5x faster than F.linear at an ISD
    window's 7 rows; its weight copies are held as the fused matrices' are); the module
    itself when it is not a bias-free nn.Linear."""
    if type(head) is not nn.Linear or head.bias is not None:
        return head
    matmul = Matmul(head.weight.detach())
    return lambda hidden: matmul(hidden.reshape(-1, hidden.shape[-1])).view(
        *hidden.shape[:-1], -1)


def _base_weight(module: nn.Module) -> torch.Tensor:
    """The frozen weight of a plain or gated-LoRA linear (PEFT keeps it in ``base_layer``)."""
    linear = getattr(module, "base_layer", module)
    if not isinstance(linear, nn.Linear) or linear.bias is not None:
        raise LeanUnsupported(f"{type(linear).__name__} is not a bias-free nn.Linear")
    return linear.weight.detach()


def _check_shape(decoder: nn.Module, config: Any) -> None:
    """Qwen3's layer layout and a static RoPE, or ``LeanUnsupported`` saying what differs."""
    if getattr(config, "model_type", None) != "qwen3":
        raise LeanUnsupported(f"model type {getattr(config, 'model_type', None)!r} "
                              "is not qwen3")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise LeanUnsupported(f"activation {config.hidden_act!r} is not silu")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in DYNAMIC_ROPE_TYPES:
        raise LeanUnsupported(f"RoPE type {rope_type!r} changes with the sequence length")
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, part):
            raise LeanUnsupported(f"the decoder has no {part}")


class HFDecoder:
    """The transformers decoder behind the same interface (the fallback path)."""

    def __init__(self, decoder: nn.Module, token_gate: Any = None) -> None:
        self.decoder = decoder
        self.gated = token_gate is not None

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 cache: RaggedKVCache, lengths: torch.Tensor, key_length: int,
                 drafting: torch.Tensor | None) -> torch.Tensor:
        rows, width = input_ids.shape
        cache.begin_forward(lengths, width, key_length)
        slots = torch.arange(key_length, device=lengths.device)
        query_limit = lengths[:, None] + slots[:width]
        mask = (slots <= query_limit[:, :, None])[:, None]
        if drafting is None:
            drafting = torch.zeros_like(input_ids, dtype=torch.bool)
        gate = gate_positions(self.decoder, drafting) if self.gated else nullcontext()
        with gate:
            return self.decoder(input_ids=input_ids, position_ids=position_ids,
                                attention_mask={"full_attention": mask},
                                past_key_values=cache, use_cache=True).last_hidden_state


def decoder_forward(decoder: nn.Module, config: Any, context_length: int,
                    token_gate: Any = None, compile: bool = False
                    ) -> tuple[DecoderForward, str | None]:
    """The lean forward when it applies (its layers compiled if ``compile``), else
    transformers' (never compiled) with the reason why not."""
    try:
        return LeanDecoder(decoder, config, context_length, token_gate, compile), None
    except LeanUnsupported as error:
        return HFDecoder(decoder, token_gate), f"transformers decoder: {error}"


@contextmanager
def gate_positions(decoder: nn.Module, gate: torch.Tensor) -> Iterator[None]:
    """Gate a gated-LoRA decoder by position for the forwards in the block."""
    from idlm.model.gated_lora import explicit_gate

    # explicit_gate finds the gate holder by walking modules; the decoder holds it itself,
    # so the walk stops at the first module.
    with explicit_gate(decoder, gate):
        yield
