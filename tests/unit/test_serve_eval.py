"""The evaluation's ``EndpointBackend`` against ``idlm serve`` gives the same greedy
completions and verdicts, sample for sample, as the in-process ``EngineBackend`` on the
same weights: for AR, ISD and R-ISD (a real, non-zero gated adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idlm.benchmarks.endpoint import EndpointBackend
from idlm.benchmarks.engine_backend import engine_backend
from idlm.benchmarks.runner import log_path, run_evaluation
from idlm.config.downstream import EvalOverride, EvalSampling, EvaluateSection
from tests.unit.test_serve import NAME, build_model_dir, running_server

ITEMS = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks" / "tiny_eval_items.jsonl"
BENCHMARKS = ("tiny_arithmetic", "tiny_multiple_choice", "tiny_instruction")
STRIDE = 3


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from idlm.model.adapter_files import base_fingerprint, save_gated_lora
    from idlm.model.gated_lora import attach_gated_lora

    rows = [json.loads(line) for line in ITEMS.read_text().splitlines()]
    texts = [f"user\n{r['prompt']}\nassistant\n{r['reference']}\n" for r in rows] * 4
    root = tmp_path_factory.mktemp("serve_eval")
    model_dir = build_model_dir(root / "model", texts, seed=3, context=512)
    mask_id = AutoTokenizer.from_pretrained(model_dir).mask_token_id
    gated = attach_gated_lora(Qwen3ForCausalLM.from_pretrained(model_dir), mask_id, rank=4,
                              alpha=8.0, dropout=0.0)
    torch.manual_seed(1)
    for name, parameter in gated.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)   # an adapter that really drafts
    save_gated_lora(gated, root / "adapter", base_fingerprint(gated, weights_dir=model_dir))
    return model_dir, root / "adapter"


def outputs(out_dir: Path, system: str) -> list[tuple[str, str, bool]]:
    rows = []
    for name in BENCHMARKS:
        lines = log_path(out_dir, system, name).read_text().splitlines()[1:]
        rows += [(r["id"], r["output"], r["correct"]) for r in map(json.loads, lines)]
    return rows


@pytest.mark.parametrize("system", ["ar", "isd", "risd"])
def test_endpoint_on_idlm_serve_equals_the_in_process_engine(folders, tmp_path: Path,
                                                              system: str) -> None:
    from idlm.decoding.loading import load_engine

    model_dir, adapter_dir = folders
    adapter = adapter_dir if system == "risd" else None
    in_process = engine_backend(model_dir, adapter, system=system, stride=STRIDE)
    settings = EvaluateSection(
        benchmarks=BENCHMARKS, batch_size=8,
        sampling=EvalSampling(temperature=0.0, max_new_tokens=12),
        overrides={name: EvalOverride(path=str(ITEMS)) for name in BENCHMARKS})
    served_engine = load_engine(model_dir, adapter, system, max_batch_size=8)
    with running_server(served_engine, mode=system, max_waiting=64) as url:
        endpoint = EndpointBackend(url, NAME, name="served", concurrency=4, retries=0)
        results = run_evaluation({"engine": in_process, "served": endpoint}, settings,
                                 tmp_path, log=lambda _: None)
        metrics = endpoint_metrics(url)
    assert len(results) == 6 and all(r.errors == 0 for r in results)
    engine_rows, served_rows = outputs(tmp_path, "engine"), outputs(tmp_path, "served")
    assert served_rows == engine_rows
    assert len(engine_rows) >= 10 and sum(bool(output) for _, output, _ in engine_rows) > 5
    assert metrics["requests_completed"] == len(engine_rows)
    if system != "ar":   # drafts were verified (and some accepted) through the server
        assert metrics["full_accept_rounds"] + metrics["reject_rounds"] > 0


def endpoint_metrics(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/metrics", timeout=30).json()
