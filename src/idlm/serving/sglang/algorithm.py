"""``IntrospectiveStridedDecoding``: the SGLang dLLM algorithm class (thin glue).

Built by :func:`algorithm_class` because it subclasses sglang's ``DllmAlgorithm``: this
module imports without sglang, the class exists only inside an SGLang process (the
installed shim calls the factory). One SGLang round = one ISD step per request:

* a context pass (``EXTEND``; SGLang's separate context encoding) encodes a new prompt
  up to its last token, causally, with the gate closed;
* a window pass (``DLLM_EXTEND``) writes each request's window into the block,
  runs one forward, verifies (``window.step``) and returns 1..N tokens per request plus
  its next ``RowState``; the hooks commit the tokens and trim the window's KV.
"""

from __future__ import annotations

import hashlib
from functools import cache
from typing import Any

from idlm.serving.sglang import ALGORITHM_CONFIG_FORMAT, ALGORITHM_NAME, ARCHITECTURE


def window_spec(algorithm_config: dict[str, Any], block_size: int) -> Any:
    """The bundle's algorithm config as a ``WindowSpec``, checked against SGLang's block size."""
    from idlm.serving.sglang.window import WindowSpec

    if algorithm_config.get("format") != ALGORITHM_CONFIG_FORMAT:
        raise ValueError(f"{ALGORITHM_NAME} needs the bundle's idlm_algorithm.yaml "
                         f"({ALGORITHM_CONFIG_FORMAT}) as --dllm-algorithm-config")
    spec = WindowSpec(int(algorithm_config["stride"]), int(algorithm_config["mask_token_id"]),
                      int(algorithm_config.get("pad_token_id", 0)),
                      str(algorithm_config.get("proposal", "sample")),
                      gated=bool(algorithm_config.get("gate", False)))
    if block_size != spec.width:
        raise ValueError(f"dLLM block size {block_size} is not the ISD window {spec.width} "
                         f"(2N-1 for N={spec.stride}): keep block_size in the algorithm config")
    return spec


def request_seed(rid: str, base_seed: int) -> int:
    """A request's sampling seed when the client gave none: stable per request id."""
    digest = hashlib.blake2b(f"{base_seed}:{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@cache
def algorithm_class() -> type:
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view
    from sglang.srt.dllm.algorithm.base import DllmAlgorithm

    from idlm.serving.sglang import window as isd
    from idlm.serving.sglang.hooks import GATES

    class IntrospectiveStridedDecoding(DllmAlgorithm):
        supported_architectures = (ARCHITECTURE,)
        requires_separate_context_encoding = True

        @classmethod
        def configure_server_args(cls, server_args: Any) -> None:
            if resolving_view(server_args).dllm_fdfo:
                raise ValueError(f"{ALGORITHM_NAME} commits 1..N tokens per step, which only "
                                 "the synchronous dLLM path takes: launch with --no-dllm-fdfo")
            # A window's KV is trimmed after each step, so no cross-request prefix reuse.
            declare_resolution(server_args, cls.__name__, disable_radix_cache=True,
                               chunked_prefill_size=-1)

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.spec = window_spec(config.algorithm_config, config.block_size)
            self.seed = int(config.algorithm_config.get("seed", 0))
            # tp_worker hands run() each request's dllm_algo_state only when this is set;
            # the commit path stays synchronous (--no-dllm-fdfo, checked above).
            self.fdfo = True

        def run(self, model_runner: Any, forward_batch: Any,
                algo_states: list[Any] | None = None) -> tuple:
            gate = GATES.get("model")
            if not forward_batch.forward_mode.is_dllm_extend():
                if gate is not None:
                    gate.clear()
                if forward_batch.input_ids.numel() == 0:
                    return None, [], None, None, False
                out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
                return out.logits_output, [], None, None, out.can_run_graph
            rows, width = forward_batch.batch_size, self.spec.width
            states = list(algo_states or [None] * rows)
            block = forward_batch.input_ids.view(rows, width)
            offsets = forward_batch.positions.view(rows, width)[:, 0].long()
            window = isd.layout(self.spec, block[:, 0].long(), offsets, states)
            block.copy_(window.input_ids.to(block.dtype))   # in place: CUDA-graph inputs
            if gate is not None:
                gate.write(isd.gate(window))
            out = model_runner.forward(forward_batch, pp_proxy_tensors=None)
            logits = out.logits_output.full_logits.view(rows, width, -1)
            result = isd.step(self.spec, window, logits, states, self._sampling(forward_batch))
            import torch

            emitted = [torch.tensor(tokens, dtype=torch.long) for tokens in result.emitted]
            return out.logits_output, emitted, None, result.states, out.can_run_graph

        def _sampling(self, forward_batch: Any) -> Any:
            info = forward_batch.sampling_info
            seeds = (info.sampling_seed.tolist() if info.sampling_seed is not None else
                     [request_seed(rid, self.seed) for rid in forward_batch.rids])
            return isd.RowSampling.from_lists(
                info.temperatures.view(-1).tolist(), info.top_ks.tolist(),
                info.top_ps.tolist(), seeds, device=forward_batch.input_ids.device)

    return IntrospectiveStridedDecoding
