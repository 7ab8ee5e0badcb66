"""``torch.compile`` for the lean forward (optional, off by default).

A forward without LoRA rows (every AR and ISD step; R-ISD's only at a cold start) runs its
layers as one compiled graph: the norms, the fused projections as plain matmuls, RoPE,
the K/V writes into the engine's cache and SDPA, the same maths (``layer_math``) as the
eager layers. The window's rows (B x W) and the key length (a whole bucket) are its only
shapes, compiled as dynamic: an engine compiles four graphs (a row count and a width of
one, or more), seconds each on a CPU, on its first requests.
Forwards with MASK rows to update (R-ISD) stay eager: their rows change from step to step.

If compiling fails (no C++ compiler, an unsupported device), the engine logs the reason
once and decodes eagerly from then on. A failed graph leaves nothing half done: its only
side effect, the window's K/V writes, is repeated at the same slots by the eager layers.

Compiled and eager kernels round differently (~1e-5 in fp32), so they agree on tokens
except at near-ties (the tests compare both). ``verify``'s lossless check compares two
engines built the same way, and the pipeline builds them eagerly.

Measured on 2 AMD EPYC cores (AVX2), random tiny-profile model, ``bench/decode.py
--compile``: a 1-row AR forward 2.1 -> 1.4 ms, a 7-row ISD window and batches of 4 or more
unchanged (the README's "Measured"). So compiling speeds AR at batch 1 and not ISD.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from idlm.decoding.kv_cache import RaggedKVCache, write_window
from idlm.decoding.layer_math import (
    attend,
    attention_inputs,
    attention_output_and_mlp,
    heads_first,
)

logger = logging.getLogger(__name__)

# Graphs one process may compile for the layers: 4 shape classes, each for every dtype and
# device in use, with room to spare.
RECOMPILE_LIMIT = 32
# One layer's weights as the graph takes them: input norm, q/k head norm, fused q/k/v
# [in, out], output projection, post-attention norm, fused gate/up, down.
LayerTensors = tuple[torch.Tensor, ...]


def _layers(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
            write_index: torch.Tensor, weights: list[LayerTensors], keys: list[torch.Tensor],
            values: list[torch.Tensor], heads: tuple[int, int, int], eps: float,
            scale: float, gqa: bool) -> torch.Tensor:
    rows, width, key_length = write_index.shape[0], write_index.shape[2], mask.shape[-1]
    for layer, key_buffer, value_buffer in zip(weights, keys, values, strict=True):
        input_norm, head_norm, qkv, out, post_norm, gate_up, down = layer
        query, key, value = attention_inputs(hidden, input_norm, head_norm, (cos, sin),
                                             lambda x, w=qkv: torch.mm(x, w), heads, eps)
        readable = write_window(key_buffer, value_buffer, write_index,
                                heads_first(key, rows, width),
                                heads_first(value, rows, width), key_length)
        attended = attend(heads_first(query, rows, width), *readable, mask, scale, gqa)
        hidden = attention_output_and_mlp(
            hidden, attended, post_norm, lambda x, w=out: torch.mm(x, w),
            lambda x, w=gate_up: torch.mm(x, w), lambda x, w=down: torch.mm(x, w), eps)
    return hidden


class CompiledStack:
    """One decoder's layers as a compiled graph, with the eager layers as the fallback."""

    def __init__(self, weights: list[LayerTensors], heads: tuple[int, int, int], eps: float,
                 scale: float) -> None:
        # Dynamic from the first call: one graph per (rows == 1 or not, width == 1 or not),
        # prefills included, whatever the batch, window, prompt or key length. Engines in
        # one process share these graphs (and dynamo's per-function recompile limit).
        self._graph = torch.compile(_layers, fullgraph=True, dynamic=True)
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        self.weights, self.heads, self.eps, self.scale = weights, heads, eps, scale
        self.failure: str | None = None   # why compiling failed; then every call is eager

    def __call__(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 mask: torch.Tensor, cache: RaggedKVCache,
                 eager: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Every layer: [B*W, hidden] in and out, the window's K/V written to ``cache``;
        ``eager()`` (the same, uncompiled) once compiling has failed."""
        if self.failure is None:
            try:
                return self._graph(hidden, *rope, mask, cache.write_index, self.weights,
                                   cache.keys, cache.values, self.heads, self.eps,
                                   self.scale, self.heads[0] != self.heads[1])
            except Exception as error:  # dynamo and inductor raise their own types
                logger.debug("torch.compile failed", exc_info=True)
                first_line = (str(error).strip().splitlines() or [""])[0][:200]
                self.failure = f"{type(error).__name__}: {first_line}"
                logger.warning("decoding engine: torch.compile failed (%s); decoding "
                               "eagerly", self.failure)
        return eager()
