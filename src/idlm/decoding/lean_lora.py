"""A gated LoRA read out of its PEFT modules once, as fused low-rank updates.

PEFT keeps one A and one B per linear. The lean forward fuses q/k/v (and gate/up) into one
matmul, so their updates share one ``x @ A.T`` too (the A matrices stacked); each B, with
its scaling folded in, then adds into its own projection's columns of the fused output.
(A block-diagonal B would be one matmul, but mostly zeros: at the tiny model's rank 64 it
reads more bytes than the matmuls it saves cost.) Kept [in, out] in the base weights'
dtype, as the lean forward keeps its own.
Training still saves and loads the adapter in PEFT's format; only inference reads it here.

The update is added in place at the gated rows only: a slice when they are contiguous
(one row's MASK tail, e.g. every step at batch 1), else an index. Other rows keep the
base result bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TailRows:
    """The same gated tail ``start..W-1`` in each of ``rows`` windows of width W (every
    row drafting D after the same layout: a uniform window at batch > 1)."""

    rows: int
    width: int
    start: int

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        """The tail of flat [B*W, ...] rows as a [B, W-start, ...] view."""
        return flat.view(self.rows, self.width, *flat.shape[1:])[:, self.start:]


# The gated rows of one forward's flattened [B*W] rows: a slice when contiguous (batch 1),
# a per-row tail, or an index.
GatedRows = slice | TailRows | torch.Tensor


class LeanUnsupported(ValueError):
    """The lean forward cannot run this model; the message says what it found."""


@dataclass
class GroupLora:
    """The low-rank update of one fused projection group."""

    down: torch.Tensor  # [in, sum of ranks]: the stacked A matrices
    # (B * scaling as [rank, out], its part of the low-rank result, its output part)
    ups: list[tuple[torch.Tensor, int, int]]
    rank_sizes: list[int]   # the low-rank result's parts (one per projection with LoRA)
    out_sizes: list[int]    # the output's parts (one per projection of the group)

    @property
    def whole(self) -> bool:
        """One projection owns all of the group's columns (o, down): no splitting."""
        return len(self.out_sizes) == 1

    def add_to(self, output: torch.Tensor, inputs: torch.Tensor, rows: GatedRows) -> None:
        """``output[rows] += inputs[rows] @ A.T @ B.T * scaling``, in place."""
        if isinstance(rows, torch.Tensor):
            self._add_at_index(output, inputs, rows)
            return
        if isinstance(rows, slice):
            low_rank, gated = torch.mm(inputs[rows], self.down), output[rows]
        else:
            low_rank = torch.mm(rows.of(inputs).reshape(-1, inputs.shape[1]), self.down)
            gated = rows.of(output)
        if self.whole:
            _add_product(gated, low_rank, self.ups[0][0])
            return
        # One split per side (each part a view) instead of two slicing ops per projection.
        lows, outs = low_rank.split(self.rank_sizes, dim=1), gated.split(self.out_sizes, -1)
        for up, rank_part, out_part in self.ups:
            _add_product(outs[out_part], lows[rank_part], up)

    def _add_at_index(self, output: torch.Tensor, inputs: torch.Tensor, rows: torch.Tensor
                      ) -> None:
        low_rank = torch.mm(inputs.index_select(0, rows), self.down)
        delta = low_rank.new_zeros(low_rank.shape[0], output.shape[1])
        lows, outs = low_rank.split(self.rank_sizes, dim=1), delta.split(self.out_sizes, 1)
        for up, rank_part, out_part in self.ups:
            outs[out_part].addmm_(lows[rank_part], up)
        output.index_add_(0, rows, delta)


def _add_product(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``target += left @ right`` in place; ``target`` is a 2-D view (one addmm) or a
    [B, T, out] view of window tails (the product's rows in the same order)."""
    if target.dim() == 2:
        target.addmm_(left, right)
    else:
        target += torch.mm(left, right).view(target.shape)


@dataclass
class LayerLora:
    """One layer's updates; a group is None when none of its projections has LoRA."""

    qkv: GroupLora | None
    out: GroupLora | None
    gate_up: GroupLora | None
    down: GroupLora | None


def layer_lora(qkv: list[nn.Module], gate_up: list[nn.Module], out: nn.Module,
               down: nn.Module, dtype: torch.dtype) -> LayerLora | None:
    """The layer's gated LoRA as fused groups, or None for a layer without one."""
    groups = [_group(modules, dtype) for modules in (qkv, [out], gate_up, [down])]
    if all(group is None for group in groups):
        return None
    return LayerLora(*groups)


def _group(modules: list[nn.Module], dtype: torch.dtype) -> GroupLora | None:
    pairs = [_lora_pair(module) for module in modules]
    if all(pair is None for pair in pairs):
        return None
    ups, rank_sizes = [], []
    for out_part, pair in enumerate(pairs):
        if pair is not None:
            ups.append((pair[1].t().to(dtype).contiguous(), len(rank_sizes), out_part))
            rank_sizes.append(pair[0].shape[0])
    down = torch.cat([pair[0] for pair in pairs if pair is not None])
    return GroupLora(down.t().to(dtype).contiguous(), ups, rank_sizes,
                     [_out_features(module) for module in modules])


def _lora_pair(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B * scaling) of a gated-LoRA linear, None for a plain linear or a disabled one."""
    if not hasattr(module, "base_layer"):
        return None
    from idlm.model.gated_lora import GatedLinear

    if not isinstance(module, GatedLinear):
        raise LeanUnsupported(f"{type(module).__name__} is a PEFT layer without the MASK "
                              "gate: its update applies at every row")
    if module.disable_adapters:
        return None
    adapters = [name for name in module.active_adapters if name in module.lora_A]
    if len(adapters) != 1:
        raise LeanUnsupported(f"{len(adapters)} active adapters in one layer (one is read)")
    name = adapters[0]
    if name in module.lora_variant:
        raise LeanUnsupported(f"adapter {name!r} uses a LoRA variant (e.g. DoRA)")
    lora_a, lora_b = module.lora_A[name], module.lora_B[name]
    if getattr(lora_b, "bias", None) is not None:
        raise LeanUnsupported(f"adapter {name!r} has a LoRA bias")
    scaling = module.scaling[name]
    return lora_a.weight.detach(), (lora_b.weight.detach() * scaling)


def _out_features(module: nn.Module) -> int:
    return getattr(module, "base_layer", module).weight.shape[0]
