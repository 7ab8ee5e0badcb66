"""A batched KV cache for ragged decoding: one padded buffer, a valid length per row.

Layout per layer: ``keys`` / ``values`` of shape ``[rows, kv_heads, capacity, head_dim]``.
Row r holds its committed tokens in slots ``0 .. lengths[r]-1``, contiguous, with no holes.
A forward writes its window of W new tokens at slots ``lengths[r] .. lengths[r]+W-1`` of
every row (a scatter, so rows may sit at different lengths) and attends slots
``<= lengths[r] + query_index``. After verification the caller advances ``lengths[r]`` by
the number of tokens it keeps; everything beyond is stale and the next window overwrites
it before anything can attend it. So trimming rejected drafts and MASK entries costs
nothing: no copy, no crop, just a smaller length.

Rows leave (finished requests) through :meth:`select_rows` and join (newly admitted
requests, prefilled separately) through :meth:`concat`; both copy the buffers once.
The object is handed to a transformers decoder as ``past_key_values``; the attention
layers only ever call :meth:`update`.
"""

from __future__ import annotations

import torch

# Capacity grows in whole chunks so that a long generation reallocates O(log n) times.
CAPACITY_CHUNK = 64


class RaggedKVCache:
    """Per-layer K/V buffers with per-row write offsets set before each forward."""

    def __init__(self, num_layers: int, rows: int, kv_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device | str) -> None:
        capacity = _round_up(max(capacity, 1))
        shape = (rows, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._write_index: torch.Tensor | None = None
        self._key_length = 0

    @classmethod
    def for_model(cls, config: object, rows: int, capacity: int, dtype: torch.dtype,
                  device: torch.device | str) -> RaggedKVCache:
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        return cls(config.num_hidden_layers, rows, config.num_key_value_heads, head_dim,
                   capacity, dtype, device)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def begin_forward(self, lengths: torch.Tensor, width: int, key_length: int) -> None:
        """Point the next forward's writes at ``lengths[r] + 0..width-1`` for each row.

        ``key_length`` (``max(lengths) + width``, known to the caller) is how many slots the
        attention reads; the caller's mask hides each row's slots beyond its own window.
        """
        self.reserve(key_length)
        slots = lengths[:, None] + torch.arange(width, device=lengths.device)
        _, kv_heads, _, head_dim = self.keys[0].shape
        self._write_index = slots[:, None, :, None].expand(-1, kv_heads, -1, head_dim)
        self._key_length = key_length

    @property
    def write_index(self) -> torch.Tensor:
        """The scatter index of this forward's window (``begin_forward``): [B, kv, W, d]."""
        if self._write_index is None:
            raise RuntimeError("RaggedKVCache.begin_forward must be called before each forward")
        return self._write_index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformers cache hook: store the window's K/V, return the readable slots."""
        return write_window(self.keys[layer_idx], self.values[layer_idx], self.write_index,
                            key_states, value_states, self._key_length)

    def reserve(self, slots: int) -> None:
        """Grow every buffer (one copy) so that ``slots`` positions fit."""
        if slots <= self.capacity:
            return
        capacity = _round_up(max(slots, 2 * self.capacity))
        self.keys = [_grow(buffer, capacity) for buffer in self.keys]
        self.values = [_grow(buffer, capacity) for buffer in self.values]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (e.g. the unfinished requests), in that order."""
        self.keys = [buffer.index_select(0, rows) for buffer in self.keys]
        self.values = [buffer.index_select(0, rows) for buffer in self.values]

    def concat(self, other: RaggedKVCache) -> None:
        """Append ``other``'s rows after this cache's rows (capacities are matched)."""
        # Exactly the larger capacity on both sides: reserve() may round one side up
        # further (it doubles), which would leave the buffers unequal.
        capacity = max(self.capacity, other.capacity)
        for cache in (self, other):
            if cache.capacity < capacity:
                cache.keys = [_grow(buffer, capacity) for buffer in cache.keys]
                cache.values = [_grow(buffer, capacity) for buffer in cache.values]
        self.keys = [torch.cat(pair) for pair in zip(self.keys, other.keys, strict=True)]
        self.values = [torch.cat(pair) for pair in zip(self.values, other.values, strict=True)]

    # transformers asks a few cache questions outside attention; answer them honestly.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._key_length

    def __len__(self) -> int:
        return len(self.keys)


def _round_up(slots: int) -> int:
    return -(-slots // CAPACITY_CHUNK) * CAPACITY_CHUNK


def _grow(buffer: torch.Tensor, capacity: int) -> torch.Tensor:
    rows, heads, old, head_dim = buffer.shape
    grown = buffer.new_zeros(rows, heads, capacity, head_dim)
    grown[:, :, :old] = buffer
    return grown


def write_window(keys: torch.Tensor, values: torch.Tensor, write_index: torch.Tensor,
                 key_states: torch.Tensor, value_states: torch.Tensor, key_length: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter a window's K/V [B, kv, W, d] into one layer's buffers at ``write_index``;
    the first ``key_length`` slots of each (what attention reads)."""
    keys.scatter_(2, write_index, key_states.to(keys.dtype))
    values.scatter_(2, write_index, value_states.to(values.dtype))
    return keys[:, :, :key_length], values[:, :, :key_length]
