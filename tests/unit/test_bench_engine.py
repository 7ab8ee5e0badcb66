"""The in-process engine as a backend: chat template with thinking on/off, and an
evaluation of AR, ISD and R-ISD where greedy R-ISD answers equal the AR base's answers
sample for sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idlm.benchmarks.backends import Backend, render_prompt
from idlm.benchmarks.engine_backend import EngineBackend
from idlm.benchmarks.runner import log_path, run_evaluation
from idlm.config.downstream import EvalOverride, EvalSampling, EvaluateSection
from tests.conftest import tiny_qwen3

ITEMS = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks" / "tiny_eval_items.jsonl"
BENCHMARKS = ("tiny_arithmetic", "tiny_multiple_choice", "tiny_instruction")


@pytest.fixture(scope="module")
def tokenizer():
    from idlm.data.tokenizer import train_bpe_tokenizer

    rows = [json.loads(line) for line in ITEMS.read_text().splitlines()]
    texts = [f"user\n{r['prompt']}\nassistant\n{r['reference']}\n" for r in rows] * 4
    return train_bpe_tokenizer(texts, vocab_size=300)


def engines(tokenizer):
    from idlm.decoding import DecodingEngine
    from idlm.model.gated_lora import attach_gated_lora

    vocab = 384
    assert len(tokenizer) <= vocab
    base = tiny_qwen3(seed=3, vocab=vocab)
    gated = attach_gated_lora(tiny_qwen3(seed=3, vocab=vocab), tokenizer.mask_token_id,
                              rank=4, alpha=8.0, dropout=0.0)
    torch.manual_seed(1)
    for name, parameter in gated.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)  # a really non-zero adapter
    options = dict(pad_token_id=tokenizer.pad_token_id,
                   stop_token_ids=[tokenizer.eos_token_id], tokenizer=tokenizer)
    return (DecodingEngine(base, tokenizer.mask_token_id, **options),
            DecodingEngine(gated.eval(), tokenizer.mask_token_id, **options))


def test_greedy_risd_answers_equal_the_ar_base(tokenizer, tmp_path: Path) -> None:
    base_engine, risd_engine = engines(tokenizer)
    systems = {"ar": EngineBackend(base_engine, "ar"),
               "isd": EngineBackend(base_engine, "isd", stride=3),
               "risd": EngineBackend(risd_engine, "isd", stride=3)}
    assert all(isinstance(backend, Backend) for backend in systems.values())
    assert systems["risd"].name == "risd" and systems["isd"].name == "isd"
    settings = EvaluateSection(
        benchmarks=BENCHMARKS, batch_size=8,
        sampling=EvalSampling(temperature=0.0, max_new_tokens=12),
        overrides={name: EvalOverride(path=str(ITEMS)) for name in BENCHMARKS})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from more on a shared machine
    try:
        results = run_evaluation(systems, settings, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert len(results) == 9 and all(r.errors == 0 for r in results)
    accepted: dict[str, list] = {"isd": [], "risd": []}
    for name in BENCHMARKS:
        logs = {system: [json.loads(line) for line in
                         log_path(tmp_path, system, name).read_text().splitlines()[1:]]
                for system in systems}
        ar = [(r["id"], r["output"], r["correct"]) for r in logs["ar"]]
        assert ar == [(r["id"], r["output"], r["correct"]) for r in logs["risd"]]
        assert any(r["output"] for r in logs["ar"])
        assert all(r["stats"]["mode"] == "risd" for r in logs["risd"])
        assert logs["ar"][0]["prompt_text"].endswith("<|im_start|>assistant\n")
        for system in accepted:
            accepted[system] += [r["stats"]["accepted"] for r in logs[system]]
    # The adapter really drafted (R-ISD's acceptance differs from plain ISD on the base).
    assert accepted["isd"] != accepted["risd"]


def test_thinking_switch_reaches_the_qwen3_template() -> None:
    from idlm.data.qwen_vocab import build_qwen3_tokenizer

    qwen = build_qwen3_tokenizer()
    messages = [{"role": "user", "content": "What is 2+2?"}]
    thinking = render_prompt(qwen, messages, thinking=True)
    plain = render_prompt(qwen, messages, thinking=False)
    assert thinking.endswith("<|im_start|>assistant\n")
    assert plain == thinking + "<think>\n\n</think>\n\n"
