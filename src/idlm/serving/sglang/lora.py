"""R-ISD's gated LoRA for SGLang's fused projections, in plain torch.

SGLang runs LoRA through its own manager, which its dLLM mode switches off, and its
Qwen3-layout models fuse q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``. So
the plugin applies our adapter itself: the PEFT tensors of each projection are fused
into one (A, B) pair per SGLang module (A stacked, B block-diagonal, the LoRA scaling
folded into B), and :class:`GatedLoraLinear` adds ``B A x`` only at the rows the gate
opens (the MASK slots), copying every other row from the base output untouched, which
is what keeps R-ISD lossless. The gate lives in a fixed :class:`GateBuffer` that the
algorithm fills before each forward, so captured CUDA graphs read the current gate.
An adapter's MASK-embedding delta (``idlm_mask_embedding.safetensors``) is added, at the
same gated rows, to the first decoder layer's input, which in SGLang's SDAR model is the
embedding output (the place training adds it; pipeline parallel is off for SDAR).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

# SGLang module (per decoder layer) -> the PEFT projections it fuses, in output order.
FUSED_MODULES = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
PEFT_PREFIX = "base_model.model.model.layers."
# Written by idlm.model.gated_lora (not imported: the plugin must load with torch alone).
MASK_EMBEDDING_FILE = "idlm_mask_embedding.safetensors"
MASK_EMBEDDING_KEY = "mask_embedding_delta"


class AdapterError(ValueError):
    """An adapter the plugin cannot apply, as one line saying what to do."""


def projection_sizes(config: Any) -> dict[str, int]:
    """Output rows of each PEFT projection of a Qwen3-layout layer (unsharded)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"self_attn.q_proj": config.num_attention_heads * head_dim,
            "self_attn.k_proj": config.num_key_value_heads * head_dim,
            "self_attn.v_proj": config.num_key_value_heads * head_dim,
            "self_attn.o_proj": config.hidden_size,
            "mlp.gate_proj": config.intermediate_size, "mlp.up_proj": config.intermediate_size,
            "mlp.down_proj": config.hidden_size}


def read_adapter(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], float, int]:
    """(PEFT tensors by name, LoRA scaling, the MASK id the adapter was trained to gate)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        gate = json.loads((adapter_dir / "idlm_gate.json").read_text())
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except (OSError, ValueError) as error:
        raise AdapterError(f"cannot read the gated adapter in {adapter_dir} ({error}): "
                           "re-export the R-ISD bundle") from None
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return tensors, scaling, int(gate["mask_token_id"])


def read_mask_embedding(adapter_dir: Path) -> torch.Tensor | None:
    """The adapter's MASK-embedding delta [hidden], or None if it was saved without one."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    try:
        gate = json.loads((adapter_dir / "idlm_gate.json").read_text())
        if "mask_embedding" not in gate:
            return None
        return load_file(str(adapter_dir / MASK_EMBEDDING_FILE))[MASK_EMBEDDING_KEY]
    except (OSError, ValueError, KeyError) as error:
        raise AdapterError(f"cannot read the MASK-embedding delta in {adapter_dir} ({error}): "
                           "re-export the R-ISD bundle") from None


def fuse_layer(tensors: dict[str, torch.Tensor], scaling: float, layer: int,
               sizes: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{sglang module: (A [R, in], B [out, R])}`` for one layer; modules the adapter
    does not touch are left out, projections it skips inside a fused module get zeros."""
    fused = {}
    for module, parts in FUSED_MODULES.items():
        pairs = [_pair(tensors, layer, part) for part in parts]
        if all(pair is None for pair in pairs):
            continue
        in_features = next(a.shape[1] for a, _ in filter(None, pairs))
        ranks = [0 if pair is None else pair[0].shape[0] for pair in pairs]
        a_stack = torch.zeros(sum(ranks), in_features)
        b_block = torch.zeros(sum(sizes[part] for part in parts), sum(ranks))
        row = col = 0
        for part, pair, rank in zip(parts, pairs, ranks, strict=True):
            if pair is not None:
                a, b = pair
                if b.shape[0] != sizes[part]:
                    raise AdapterError(f"adapter {part} of layer {layer} has {b.shape[0]} "
                                       f"output rows, the model {sizes[part]}: wrong base model")
                a_stack[col:col + rank] = a.float()
                b_block[row:row + sizes[part], col:col + rank] = b.float() * scaling
            row, col = row + sizes[part], col + rank
        fused[module] = (a_stack, b_block)
    return fused


def _pair(tensors: dict[str, torch.Tensor], layer: int, part: str
          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    stem = f"{PEFT_PREFIX}{layer}.{part}"
    a, b = tensors.get(f"{stem}.lora_A.weight"), tensors.get(f"{stem}.lora_B.weight")
    if (a is None) != (b is None):
        raise AdapterError(f"adapter has only one of lora_A / lora_B for {stem}: re-export it")
    return None if a is None else (a, b)


def gated_output(base_output: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``base + B A x`` at gated rows, ``base`` (bit for bit) elsewhere. Dense on every row
    (no data-dependent shapes, so CUDA graphs can capture it)."""
    delta = (x.to(lora_a.dtype) @ lora_a.T) @ lora_b.T
    return torch.where(gate[:, None], base_output + delta.to(base_output.dtype), base_output)


class GateBuffer:
    """The per-token gate of the current forward, in one fixed buffer (graph-safe)."""

    def __init__(self, capacity: int, device: torch.device | str) -> None:
        self.buffer = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.active = True   # False: a context pass, where no row is a MASK slot

    def write(self, gate: torch.Tensor) -> None:
        if gate.numel() > self.buffer.numel():
            raise AdapterError(f"{gate.numel()} tokens in one forward exceed the gate buffer "
                               f"({self.buffer.numel()}): lower --max-running-requests")
        self.buffer[:gate.numel()].copy_(gate.reshape(-1))
        self.buffer[gate.numel():].fill_(False)
        self.active = True

    def clear(self) -> None:
        """A context pass: no MASK slot anywhere (graphs captured earlier read the zeros)."""
        self.buffer.fill_(False)
        self.active = False

    def rows(self, count: int) -> torch.Tensor:
        if count > self.buffer.numel():
            raise AdapterError(f"a {count}-token window forward exceeds the gate buffer")
        return self.buffer[:count]


class GatedLoraLinear(nn.Module):
    """Wraps one SGLang linear (which returns ``(output, bias)``) or a plain ``nn.Linear``."""

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 gate: GateBuffer) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        self.gate = gate

    def __getattr__(self, name: str) -> Any:
        """Anything else (weight, quant_method, ...) is the wrapped layer's, so code that
        inspects the projection still finds what it expects."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = self.base(x, *args, **kwargs)
        if not self.gate.active:
            return result
        output, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
        flat = x.reshape(-1, x.shape[-1])
        gated = gated_output(output.reshape(-1, output.shape[-1]), flat, self.lora_a,
                             self.lora_b, self.gate.rows(flat.shape[0])).view_as(output)
        return gated if rest is None else (gated, *rest)


class MaskEmbeddingShift:
    """Forward pre-hook for the first decoder layer: its ``hidden_states`` (the embeddings)
    gain the delta at gated rows; every other row passes bit for bit. Dense ``where`` over
    the gate buffer, so CUDA graphs can capture it."""

    def __init__(self, delta: torch.Tensor, gate: GateBuffer) -> None:
        self.delta = delta
        self.gate = gate

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not self.gate.active:
            return None
        positional = "hidden_states" not in kwargs   # SDARBlock(positions, hidden_states, ...)
        hidden = args[1] if positional else kwargs["hidden_states"]
        flat = hidden.reshape(-1, hidden.shape[-1])
        shifted = torch.where(self.gate.rows(flat.shape[0])[:, None],
                              flat + self.delta.to(flat.dtype), flat).view_as(hidden)
        if positional:
            return (args[0], shifted, *args[2:]), kwargs
        return args, {**kwargs, "hidden_states": shifted}


def attach(layers: nn.ModuleList, adapter_dir: Path, config: Any, gate: GateBuffer,
           device: torch.device | str, dtype: torch.dtype) -> int:
    """Wrap every adapted module of ``layers`` (SGLang's decoder layers) and hook in the
    MASK-embedding delta if the adapter has one; returns how many modules were wrapped."""
    tensors, scaling, _ = read_adapter(adapter_dir)
    sizes = projection_sizes(config)
    wrapped = 0
    for index, layer in enumerate(layers):
        for name, (lora_a, lora_b) in fuse_layer(tensors, scaling, index, sizes).items():
            parent_name, attribute = name.split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, attribute, GatedLoraLinear(
                getattr(parent, attribute), lora_a.to(device, dtype), lora_b.to(device, dtype),
                gate))
            wrapped += 1
    if wrapped == 0:
        raise AdapterError(f"the adapter in {adapter_dir} touches no decoder-layer projection")
    delta = read_mask_embedding(adapter_dir)
    if delta is not None:
        if tuple(delta.shape) != (config.hidden_size,):
            raise AdapterError(f"the MASK-embedding delta has shape {tuple(delta.shape)}, the "
                               f"model's hidden size is {config.hidden_size}: wrong base model")
        layers[0].register_forward_pre_hook(
            MaskEmbeddingShift(delta.to(device, dtype), gate), with_kwargs=True)
    return wrapped
