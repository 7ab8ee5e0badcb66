"""Gated LoRA for lossless R-ISD: a PEFT LoRA whose delta applies only at MASK tokens.

Every non-MASK row is computed with the frozen base weights alone (bit-identical, not
merely close), which is what makes R-ISD's greedy output the base model's greedy output.

How it plugs into PEFT: ``GatedLinear`` subclasses PEFT's own ``lora.Linear`` (PEFT keeps
the A/B matrices, scaling, dropout, init, state-dict naming and save/load) and is
registered through PEFT's documented custom-module hook, ``LoraConfig._register_custom_module``.
Only ``forward`` changes: the delta is added to the gated rows by ``index_add``; the other
rows are copied untouched from the base output.

How the gate reaches the layers: a forward pre-hook on the decoder (``Qwen3Model``) turns
``input_ids == mask_token_id`` into a bool gate and passes it down as a keyword argument.
Transformers forwards extra keyword arguments from the decoder to each decoder layer and
on to its ``self_attn``; a pre-hook there pops it (attention kernels never see it) and
publishes it to the shared ``TokenGate`` that the layer's gated linears read; a post-hook
on the layer's ``mlp`` clears it. Routing through keyword arguments, not a global set once
per forward, is what keeps the gate right under gradient checkpointing: transformers 5
replays a layer's ``forward`` (with the same keyword arguments) during backward, long
after the outer forward returned, and the attention/MLP hooks run again inside the replay.

The MASK embedding: embeddings are not LoRA targets, so without help the MASK row (an
untrained row on a real Qwen3) would never learn. ``mask_embedding=True`` adds a trainable
vector to the embedding output at the gated rows only, driven by the same gate (the decoder
pre-hook hands it to a hook on ``embed_tokens``, which runs inside the decoder's forward).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from idlm.errors import StageError
from idlm.model.gate_holder import GATE_ATTRIBUTE, token_gate_of

GATE_RULE = "input_ids == mask_token_id"
GATE_FILE = "idlm_gate.json"
GATE_FORMAT = "idlm-gated-lora/1"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", GATE_FILE)
# Optional: present, and named in the gate record, only for adapters with a MASK-embedding delta.
MASK_EMBEDDING_FILE = "idlm_mask_embedding.safetensors"
MASK_EMBEDDING_KEY = "mask_embedding_delta"
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
)
CHECKPOINT_HASH_FIELD = "checkpoint_sha256"
# Private keyword that carries the gate from the decoder to its layers; popped before attention.
_GATE_KWARG = "idlm_token_gate"


class GatedLoraError(StageError):
    """A gated-LoRA misuse or a bad adapter, phrased as one line saying what to do."""


def gate_from_token_ids(token_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The R-ISD gate: True exactly where the input token is MASK (shared with decoding)."""
    return token_ids == mask_token_id


class MaskEmbeddingDelta(nn.Module):
    """A trainable vector added to the input embedding at gated (MASK) rows only."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, embeddings: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # Applied by calling this module (not by reading ``delta`` from a hook) so ZeRO-3's
        # module hooks gather the parameter first. ``where`` copies ungated rows bit for bit,
        # and keeps ``delta`` in the graph (zero gradient) when no row is gated.
        shifted = embeddings + self.delta.to(embeddings.dtype)
        return torch.where(gate.to(embeddings.device)[..., None], shifted, embeddings)


class TokenGate:
    """The one gate holder that a model's gated layers share, plus the hooks that fill it.

    The hooks are bound methods so that ``copy.deepcopy`` of a model copies them together
    with this holder instead of leaving the copy wired to the original's holder.
    """

    def __init__(self, mask_token_id: int) -> None:
        self.mask_token_id = mask_token_id
        self.explicit: torch.Tensor | None = None
        self.current: torch.Tensor | None = None
        self.mask_embedding: MaskEmbeddingDelta | None = None
        # The gate of the decoder forward under way, for the embed_tokens hook inside it.
        self._embedding_gate: torch.Tensor | None = None
        # (gate, its flat nonzero rows): every gated layer of one forward shares the gate
        # tensor, so the row index (a device sync) is computed once, not once per layer.
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_decoder_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        if self.explicit is not None:
            tokens = input_ids if input_ids is not None else inputs_embeds[..., 0]
            if tuple(self.explicit.shape) != tuple(tokens.shape):
                raise GatedLoraError(
                    f"explicit gate has shape {tuple(self.explicit.shape)} but the input has "
                    f"{tuple(tokens.shape)} tokens: pass one bool per (batch, position)"
                )
            gate = self.explicit.to(tokens.device)
        elif input_ids is not None:
            gate = gate_from_token_ids(input_ids, self.mask_token_id)
        else:
            raise GatedLoraError(
                "gated LoRA finds MASK positions from input_ids, but only inputs_embeds were "
                "given: wrap the call in `with explicit_gate(model, gate): ...`"
            )
        self._rows = None  # a new forward: never reuse rows, even for a reused gate tensor
        kwargs = {**kwargs, _GATE_KWARG: gate}
        shift_lookup = self.mask_embedding is not None and input_ids is not None
        self._embedding_gate = gate if shift_lookup else None
        if self.mask_embedding is not None and input_ids is None:
            # embed_tokens will not run: shift the given embeddings here instead.
            kwargs["inputs_embeds"] = self.mask_embedding(inputs_embeds, gate)
        return args, kwargs

    def on_embedding_done(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        gate, self._embedding_gate = self._embedding_gate, None
        if gate is None or self.mask_embedding is None:
            return None  # a lookup outside a decoder forward stays the base's
        return self.mask_embedding(output, gate)

    def on_attention_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kwargs = dict(kwargs)
        self.current = kwargs.pop(_GATE_KWARG, None)
        return args, kwargs

    def on_layer_done(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.current = None

    def gate_for(self, hidden: torch.Tensor) -> torch.Tensor:
        """The current gate, checked against a gated layer's input rows."""
        if self.current is None:
            raise GatedLoraError(
                "a gated LoRA layer ran outside a gated decoder forward: call the model or its "
                "decoder (model.get_decoder()) with input_ids, not a layer directly"
            )
        if tuple(self.current.shape) != tuple(hidden.shape[:-1]):
            raise GatedLoraError(
                f"gate shape {tuple(self.current.shape)} does not match the layer input rows "
                f"{tuple(hidden.shape[:-1])}: the gate must be (batch, sequence)"
            )
        return self.current.to(hidden.device)

    def gated_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """Flat indices of the gated rows of ``hidden`` (cached per gate tensor)."""
        gate = self.gate_for(hidden)
        cached = self._rows
        if cached is not None and cached[0] is self.current and cached[1].device == gate.device:
            return cached[1]
        rows = gate.reshape(-1).nonzero().squeeze(-1)
        self._rows = (self.current, rows)
        return rows


class GatedLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` whose delta is added only at gated (MASK) rows."""

    token_gate: TokenGate | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise GatedLoraError("gated LoRA does not support mixed-adapter batches")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if self.token_gate is None:
            raise GatedLoraError("gated LoRA layer has no gate: build it with attach_gated_lora")
        gated_rows = self.token_gate.gated_rows(x)
        # Empty selections still run the LoRA matmuls so every LoRA parameter stays in the
        # graph (DDP / ZeRO expect every trainable parameter to receive a gradient).
        gated_inputs = x.reshape(-1, x.shape[-1]).index_select(0, gated_rows)
        delta = self._gated_delta(gated_inputs)
        flat_result = result.reshape(-1, result.shape[-1])
        # index_add copies ungated rows verbatim, so they stay bit-identical to the base.
        return flat_result.index_add(0, gated_rows, delta.to(result.dtype)).view_as(result)

    def _gated_delta(self, gated_inputs: torch.Tensor) -> torch.Tensor:
        delta: torch.Tensor | None = None
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            if adapter in self.lora_variant:
                raise GatedLoraError(f"adapter {adapter!r} uses a LoRA variant (e.g. DoRA)")
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            inputs = self._cast_input_dtype(gated_inputs, lora_a.weight.dtype)
            term = lora_b(lora_a(self.lora_dropout[adapter](inputs))) * self.scaling[adapter]
            delta = term if delta is None else delta + term
        if delta is None:
            return gated_inputs.new_zeros(gated_inputs.shape[0], self.out_features)
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise GatedLoraError(
            "a gated LoRA cannot be merged into the base weights: merged, its delta would apply "
            "at every token and R-ISD would no longer be lossless; keep it as an adapter"
        )


def attach_gated_lora(
    model: nn.Module,
    mask_token_id: int,
    rank: int,
    alpha: float,
    dropout: float,
    targets: list[str] | str = "all-linear",
    mask_embedding: bool = False,
) -> PeftModel:
    """Wrap a causal LM in a gated LoRA; the base is frozen, only LoRA parameters (and, with
    ``mask_embedding``, a MASK-embedding delta starting at zero) train."""
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    lora_config._register_custom_module({nn.Linear: GatedLinear})
    peft_model = get_peft_model(model, lora_config)
    _install_gate(peft_model, mask_token_id, mask_embedding)
    return peft_model


def _install_gate(
    peft_model: PeftModel, mask_token_id: int, mask_embedding: bool = False
) -> TokenGate:
    decoder = peft_model.get_base_model().get_decoder()
    if token_gate_of(decoder) is not None:
        raise GatedLoraError("this model already carries a gated LoRA; attach only one")
    token_gate = TokenGate(mask_token_id)
    setattr(decoder, GATE_ATTRIBUTE, token_gate)
    decoder.register_forward_pre_hook(token_gate.on_decoder_call, with_kwargs=True)
    gated_in_layers: set[int] = set()
    for layer in decoder.layers:
        if not (hasattr(layer, "self_attn") and hasattr(layer, "mlp")):
            raise GatedLoraError(
                f"{type(layer).__name__} has no self_attn/mlp: gated LoRA supports "
                "Qwen3/Llama-style decoder layers only"
            )
        layer.self_attn.register_forward_pre_hook(token_gate.on_attention_call, with_kwargs=True)
        layer.mlp.register_forward_hook(token_gate.on_layer_done)
        for module in [*layer.self_attn.modules(), *layer.mlp.modules()]:
            if isinstance(module, GatedLinear):
                module.token_gate = token_gate
                gated_in_layers.add(id(module))
    _check_all_gated_layers_reachable(peft_model, gated_in_layers)
    if mask_embedding:
        _install_mask_embedding(decoder, token_gate)
    return token_gate


def _install_mask_embedding(decoder: nn.Module, token_gate: TokenGate) -> None:
    embeddings = decoder.get_input_embeddings()
    # embedding_dim, not weight.shape: under ZeRO-3 the weight may be a partitioned stub.
    delta_module = MaskEmbeddingDelta(embeddings.embedding_dim).to(embeddings.weight.device)
    # A submodule of the decoder, so the trainer (and DeepSpeed) see its parameter.
    decoder.idlm_mask_embedding = delta_module
    token_gate.mask_embedding = delta_module
    embeddings.register_forward_hook(token_gate.on_embedding_done)


def _check_all_gated_layers_reachable(peft_model: PeftModel, gated_ids: set[int]) -> None:
    outside = [
        name
        for name, module in peft_model.named_modules()
        if isinstance(module, GatedLinear) and id(module) not in gated_ids
    ]
    if outside:
        raise GatedLoraError(
            f"LoRA targets outside decoder layers' self_attn/mlp cannot be gated: {outside[:3]};"
            " target decoder-layer linears only (the default 'all-linear' does)"
        )


def find_token_gate(model: nn.Module) -> TokenGate:
    """The gate holder of a gated-LoRA model (PeftModel, CausalLM, decoder or DeepSpeed engine)."""
    for module in model.modules():
        token_gate = token_gate_of(module)
        if isinstance(token_gate, TokenGate):
            return token_gate
    raise GatedLoraError("this model has no gated LoRA: build it with attach_gated_lora")


@contextmanager
def explicit_gate(model: nn.Module, gate: torch.Tensor) -> Iterator[None]:
    """Use ``gate`` (bool, batch x sequence) for forwards in the block, e.g. with inputs_embeds."""
    if gate.dtype != torch.bool:
        raise GatedLoraError(f"explicit gate must be a bool tensor, got {gate.dtype}")
    token_gate = find_token_gate(model)
    previous = token_gate.explicit
    token_gate.explicit = gate
    try:
        yield
    finally:
        token_gate.explicit = previous
