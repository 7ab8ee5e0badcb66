"""SGLang 0.5.21 serves our exported bundles through the plugin (GPU + sglang only).

Builds a small workspace, runs the export stage, starts each bundle's own ``launch.sh``
(fp32, triton attention, so kernels and our engine agree to the bit on greedy argmax),
and checks over HTTP:

* ISD: SGLang's greedy output equals our engine's greedy ISD output of the same bundle;
* R-ISD: SGLang's greedy output equals the *base* model's greedy AR output (lossless).

Run in the server environment (``scripts/setup_serve.sh``) on a CUDA machine:
``.venv-serve/bin/pytest -m gpu tests/gpu/test_sglang_serving.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.workspace import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                       reason="needs sglang 0.5.21 (scripts/setup_serve.sh)"),
]

SERVER_ARGS = ["--dtype", "float32", "--attention-backend", "triton",
               "--mem-fraction-static", "0.2", "--disable-cuda-graph"]
STARTUP_SECONDS = 600


def _small_qwen3(vocab: int, seed: int):  # noqa: ANN202
    """Head dim 64: what SGLang's attention kernels take (the CPU tests' 16 is too small)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, hidden_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         intermediate_size=512, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from idlm import config as config_mod
    from idlm.data.tokenizer import train_bpe_tokenizer
    from idlm.model.adapter_files import base_fingerprint, save_gated_lora
    from idlm.model.gated_lora import attach_gated_lora
    from idlm.serving.sglang.install import install
    from idlm.stages.export import run

    install()
    root = tmp_path_factory.mktemp("ws")
    out = root / "outputs"
    texts = ["What is 12+7? #### 19", "def square(x):\n    return x * x"] * 50
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    tokenizer.save_pretrained(out / "prepare" / "tokenizer")
    base = _small_qwen3(len(tokenizer), seed=1)
    for folder, model in ((out / "base" / "model", base),
                          (out / "ic" / "model", _small_qwen3(len(tokenizer), seed=2))):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    (out / "base" / "base.json").write_text(json.dumps(
        {"kind": "tiny", "path": "base/model", "fingerprint": "gpu-test"}))
    adapter = attach_gated_lora(_small_qwen3(len(tokenizer), seed=1), tokenizer.mask_token_id,
                                rank=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    save_gated_lora(adapter, out / "lora" / "adapter",
                    base_fingerprint(base, "gpu-test", weights_dir=out / "base" / "model"))
    cfg = config_mod.load_profile("tiny", [f"outputs={out}", "export.stride=3",
                                           "export.check_prompts=2",
                                           "export.registry.enabled=false"])
    os.environ["IDLM_WORKSPACE"] = str(root)
    run(cfg)
    return cfg, tokenizer


@pytest.fixture()
def server(request: pytest.FixtureRequest, exported: tuple, tmp_path: Path) -> Iterator[str]:
    cfg, _ = exported
    bundle = cfg.out("export", request.param)
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(["bash", str(bundle / "launch.sh"), "--port", str(port),
                                *SERVER_ARGS], stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, tmp_path / "server.log")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def _wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"SGLang exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"SGLang not healthy after {STARTUP_SECONDS} s:\n{log.read_text()[-4000:]}")


def _generate(url: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    body = json.dumps({"input_ids": prompt, "sampling_params": {
        "temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}}).encode()
    request = urllib.request.Request(f"{url}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return list(json.loads(response.read())["output_ids"])


def _reference(cfg, mode: str, prompts: list[list[int]], new: int) -> list[list[int]]:  # noqa: ANN001
    from idlm.decoding.loading import load_engine
    from idlm.decoding.requests import GenerationRequest, SamplingParams

    if mode == "isd":
        engine = load_engine(cfg.out("export", "isd"), device="cuda")
        requests = [GenerationRequest(p, "isd", 3, SamplingParams(max_new_tokens=new,
                                                                  stop_token_ids=()))
                    for p in prompts]
    else:   # the lossless claim: R-ISD reproduces the base model's AR output
        engine = load_engine(cfg.out("base", "model"), mode="ar", device="cuda")
        requests = [GenerationRequest(p, "ar", 1, SamplingParams(max_new_tokens=new,
                                                                 stop_token_ids=()))
                    for p in prompts]
    return [result.token_ids for result in engine.generate(requests)]


@pytest.mark.parametrize("server", ["isd", "risd"], indirect=True)
def test_sglang_greedy_output_matches_the_engine(server: str, exported: tuple,
                                                 request: pytest.FixtureRequest) -> None:
    cfg, tokenizer = exported
    mode = request.node.callspec.params["server"]
    prompts = [tokenizer("What is 12+7?")["input_ids"], tokenizer("def square(x):")["input_ids"],
               [tokenizer.eos_token_id]]
    got = [_generate(server, prompt, 24) for prompt in prompts]
    assert got == _reference(cfg, mode, prompts, 24)
