"""A gated LoRA read out of its PEFT modules once, as fused low-rank updates.

PEFT keeps one A and one B per linear. The lean forward fuses q/k/v (and gate/up) into one
matmul, so their updates fuse too: the A matrices stacked (one ``x @ A.T`` for the group)
and the B matrices, scaling folded in, placed block-diagonally (one ``@ B.T`` that writes
each projection's slice of the fused output). A projection without LoRA gets a zero block.
Training still saves and loads the adapter in PEFT's format; only inference reads it here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class LeanUnsupported(ValueError):
    """The lean forward cannot run this model; the message says what it found."""


@dataclass
class GroupLora:
    """The low-rank update of one fused projection group."""

    down: torch.Tensor  # [sum of ranks, in]: the stacked A matrices
    up: torch.Tensor    # [sum of outs, sum of ranks]: B * scaling, block-diagonal

    def delta(self, inputs: torch.Tensor) -> torch.Tensor:
        # In the adapter's dtype, as PEFT computes it, then back to the base's.
        low_rank = F.linear(inputs.to(self.down.dtype), self.down)
        return F.linear(low_rank, self.up).to(inputs.dtype)


@dataclass
class LayerLora:
    """One layer's updates; a group is None when none of its projections has LoRA."""

    qkv: GroupLora | None
    out: GroupLora | None
    gate_up: GroupLora | None
    down: GroupLora | None


def layer_lora(qkv: list[nn.Module], gate_up: list[nn.Module], out: nn.Module,
               down: nn.Module) -> LayerLora | None:
    """The layer's gated LoRA as fused groups, or None for a layer without one."""
    groups = [_group(modules) for modules in (qkv, [out], gate_up, [down])]
    if all(group is None for group in groups):
        return None
    return LayerLora(*groups)


def _group(modules: list[nn.Module]) -> GroupLora | None:
    pairs = [_lora_pair(module) for module in modules]
    if all(pair is None for pair in pairs):
        return None
    present = [pair for pair in pairs if pair is not None]
    reference = present[0][0]
    ranks = [0 if pair is None else pair[0].shape[0] for pair in pairs]
    outs = [_out_features(module) for module in modules]
    up = reference.new_zeros(sum(outs), sum(ranks))
    row = column = 0
    for pair, rank, out in zip(pairs, ranks, outs, strict=True):
        if pair is not None:
            up[row:row + out, column:column + rank] = pair[1]
        row, column = row + out, column + rank
    down = torch.cat([pair[0] for pair in present])
    return GroupLora(down.contiguous(), up)


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
