"""The hooks the plugin puts into sglang 0.5.21 (via ``HookRegistry``), thin by design.

Each acts only when ``--dllm-algorithm IntrospectiveStridedDecoding`` is selected and
delegates its decisions to the pure ``window`` / ``lora`` functions:

* ``SDARAttention.__init__`` (after): causal attention. SGLang's SDAR layers attend
  bidirectionally inside a block (``ENCODER_ONLY``); ISD's window is strictly causal.
  Also takes RoPE's theta from ``rope_parameters`` as Qwen3's own layer does (SDAR reads
  only a top-level ``rope_theta``, which transformers 5 configs no longer carry).
* ``SDARForCausalLM.load_weights`` (after): wrap the projections with the gated LoRA
  when the algorithm config turns the gate on (R-ISD); SGLang's own LoRA is off in dLLM mode.
* ``ReqDllmMixin._init_fill_ids_for_dllm`` (around): the window starts at the pending
  token (``window.fill_ids``), not after the last committed token.
* ``SchedulerDllmMixin.process_batch_result_dllm`` (before): keep each request's
  ``RowState`` (drafts, q, step counter, slots to keep) on ``req.dllm_algo_state``; the
  synchronous commit path then appends the 1..N emitted tokens itself.
* ``SchedulerDllmMixin._stash_dllm_context`` (around): keep the KV of the pending token
  and the accepted drafts, free the rest of the window (``window.trimmed_context``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from idlm.serving.sglang import ALGORITHM_NAME

# The gate buffer of this process's model (set when the adapter is attached).
GATES: dict[str, Any] = {}
GATE_CAPACITY_REQUESTS = 8192  # window forwards up to this many requests (CUDA graphs pad)

TARGETS = {
    "attention": "sglang.srt.models.sdar.SDARAttention.__init__",
    "weights": "sglang.srt.models.sdar.SDARForCausalLM.load_weights",
    "fill": "sglang.srt.dllm.mixin.req.ReqDllmMixin._init_fill_ids_for_dllm",
    "result": "sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin.process_batch_result_dllm",
    "stash": "sglang.srt.dllm.mixin.scheduler.SchedulerDllmMixin._stash_dllm_context",
}


def rope_settings(config: Any) -> tuple[float, Any]:
    """(theta, scaling) as SGLang's Qwen3 layer reads them: ``rope_parameters`` first."""
    parameters = getattr(config, "rope_parameters", None)
    if parameters and "rope_theta" in parameters:
        return float(parameters["rope_theta"]), parameters
    return float(getattr(config, "rope_theta", 1_000_000)), getattr(config, "rope_scaling", None)


def selected() -> bool:
    from sglang.srt.runtime_context import get_exec

    return get_exec().dllm.dllm_algorithm == ALGORITHM_NAME


def algorithm_settings() -> dict[str, Any]:
    """The algorithm config this server was started with, adapter path made absolute."""
    import yaml
    from sglang.srt.runtime_context import get_exec

    path = get_exec().dllm.dllm_algorithm_config
    if path is None:
        raise ValueError(f"{ALGORITHM_NAME} needs --dllm-algorithm-config (the bundle's "
                         "idlm_algorithm.yaml)")
    settings = yaml.safe_load(Path(path).read_text()) or {}
    if settings.get("adapter"):
        settings["adapter"] = str((Path(path).parent / settings["adapter"]).resolve())
    return settings


def causal_sdar_attention(result: Any, attention: Any, *args: Any, **kwargs: Any) -> None:
    if not selected():
        return
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.layers.rotary_embedding import get_rope

    config = kwargs.get("config", args[0] if args else None)
    attention.attn.attn_type = AttentionType.DECODER
    theta, scaling = rope_settings(config)
    attention.rotary_emb = get_rope(attention.head_dim, rotary_dim=attention.head_dim,
                                    max_position=getattr(config, "max_position_embeddings",
                                                         32768),
                                    base=theta, rope_scaling=scaling)


def attach_gated_adapter(result: Any, model: Any, *args: Any, **kwargs: Any) -> None:
    if not selected():
        return
    settings = algorithm_settings()
    if not settings.get("gate"):
        return
    from sglang.srt.runtime_context import get_parallel

    from idlm.serving.sglang.lora import GateBuffer, attach

    if get_parallel().tp_size != 1:
        raise ValueError("R-ISD's gated LoRA supports tensor parallel size 1 only")
    from idlm.model.base_weights import check_adapter_base

    # Before any adapter tensor is applied: SGLang read its weights from the folder
    # transformers' config was loaded from (config._name_or_path, the --model-path).
    check_adapter_base(settings["adapter"], _weights_folder(model.config),
                       allow_other_base=bool(settings.get("allow_other_base", False)))
    weight = next(model.parameters())
    gate = GateBuffer(GATE_CAPACITY_REQUESTS * int(settings["block_size"]), weight.device)
    attach(model.model.layers, Path(settings["adapter"]), model.config, gate, weight.device,
           weight.dtype)
    GATES["model"] = gate


def _weights_folder(config: Any) -> Path:
    """The folder the server read its weights from: the local --model-path, or the HF
    cache snapshot of a hub id (already downloaded by SGLang, so no network here)."""
    name = str(getattr(config, "_name_or_path", ""))
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, revision=getattr(config, "_commit_hash", None),
                                  local_files_only=True, allow_patterns=["*.safetensors"]))


def isd_fill_ids(original: Any, req: Any) -> None:
    config = req.dllm_config
    if config.algorithm != ALGORITHM_NAME or req.dllm_incomplete_ids:
        return original(req)
    from array import array

    from idlm.serving.sglang.window import fill_ids

    committed = [*req.origin_input_ids, *req.output_ids]
    if not req.dllm_initialized:
        req.dllm_algo_state = None   # fresh or retracted: no KV, the next window cold-starts
    req.dllm_block_offset, fill = fill_ids(committed, config.block_size, req.dllm_initialized)
    req.full_untruncated_fill_ids = array("q", fill)
    req.dllm_initialized = True
    return None


def keep_states(scheduler: Any, batch: Any, result: Any, *args: Any, **kwargs: Any) -> None:
    if (scheduler.dllm_config.algorithm != ALGORITHM_NAME
            or not batch.forward_mode.is_dllm_extend() or result.dllm_algo_state is None):
        return None
    for req, state in zip(batch.reqs, result.dllm_algo_state, strict=True):
        req.dllm_algo_state = state
    return None


def trim_window_kv(original: Any, scheduler: Any, req: Any) -> None:
    if scheduler.dllm_config.algorithm != ALGORITHM_NAME:
        return original(scheduler, req)
    from idlm.serving.sglang.window import trimmed_context

    state = req.dllm_algo_state
    kept = state.kept if state is not None else 0   # a context-only pass keeps no window
    assert req.extend_range.end == req.dllm_block_offset + scheduler.dllm_config.block_size
    allocated = req.kv.kv_allocated_len
    context, free_start = trimmed_context(req.dllm_block_offset, kept, allocated,
                                          scheduler.token_to_kv_pool_allocator.page_size)
    if free_start < allocated:
        slots = scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx,
                                                         free_start:allocated]
        scheduler.token_to_kv_pool_allocator.free_segment(slots, start_pos=free_start)
    req.kv.kv_committed_len = context
    req.kv.kv_allocated_len = context
    req.set_extend_range(context, context)
    scheduler.stash_chunked_request(req)
    return None


def register_all() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGETS["attention"], causal_sdar_attention, HookType.AFTER)
    HookRegistry.register(TARGETS["weights"], attach_gated_adapter, HookType.AFTER)
    HookRegistry.register(TARGETS["fill"], isd_fill_ids, HookType.AROUND)
    HookRegistry.register(TARGETS["result"], keep_states, HookType.BEFORE)
    HookRegistry.register(TARGETS["stash"], trim_window_kv, HookType.AROUND)
