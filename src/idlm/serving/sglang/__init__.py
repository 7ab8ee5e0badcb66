"""ISD and R-ISD inside SGLang, as a plugin against one pinned release: sglang 0.5.21.

Why 0.5.21: it is the newest release that has both ``sglang/srt/dllm/algorithm/``
(algorithms found as modules exposing ``Algorithm = TheClass``) and the general plugin
entry-point group ``sglang.srt.plugins`` (hooks and class replacement), *and* pins the
same torch as this project (``torch==2.13.0``). 0.5.22 and 0.5.23 have both features too
but pin torch 2.14.1, which cannot share an environment with our torch pin. (Every
release pins an older transformers than ours, 5.12.1 here against 5.23.0, so the GPU
server's environment is built with ``scripts/setup_serve.sh``: sglang with its own
pins, then idlm without dependencies; the plugin needs only torch and pyyaml.)

Layout (sglang is imported only inside functions, so every module imports on CPU):

* ``window``: the pure per-step logic (fixed-width window, verify, commit, KV keep,
  gate), built on ``idlm.decoding.acceptance`` / ``bookkeeping`` / ``sampling``;
* ``lora``: the gated LoRA's PEFT tensors fused for SGLang's merged projections;
* ``compat``: the export's check of a bundle against facts extracted from 0.5.21's source;
* ``install``: writes our algorithm module into ``sglang/srt/dllm/algorithm/``;
* ``algorithm``, ``hooks``, ``plugin``: the thin SGLang-facing glue.
"""

SGLANG_VERSION = "0.5.21"
ALGORITHM_NAME = "IntrospectiveStridedDecoding"   # the value of --dllm-algorithm
ALGORITHM_MODULE = "idlm_isd"                    # sglang/srt/dllm/algorithm/idlm_isd.py
ARCHITECTURE = "SDARForCausalLM"                 # a dLLM architecture SGLang's table knows
ALGORITHM_CONFIG_FORMAT = "idlm-isd-algorithm/1"
PLUGIN_GROUP = "sglang.srt.plugins"
PLUGIN_NAME = "idlm_isd"
