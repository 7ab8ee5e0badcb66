"""``idlm generate`` end to end on a saved tiny model + trained BPE tokenizer, the bench's
one-line failure when its inputs are missing, and the bench in bf16."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from idlm.cli.generate import main
from idlm.model.adapter_files import base_fingerprint, save_gated_lora
from idlm.model.gated_lora import attach_gated_lora

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"user\nwhat is {a} plus {b}?\nassistant\n{a}+{b}={a + b}\n"
         for a in range(12) for b in range(12)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from idlm.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("generate")
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         intermediate_size=64, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapter = attach_gated_lora(Qwen3ForCausalLM(config), tokenizer.mask_token_id, rank=2,
                                alpha=4.0, dropout=0.0)
    model_copy = Qwen3ForCausalLM.from_pretrained(root / "model")
    adapter.get_base_model().load_state_dict(model_copy.state_dict(), strict=False)
    save_gated_lora(adapter, root / "adapter",
                    base_fingerprint(adapter, weights_dir=root / "model"))
    return root / "model", root / "adapter"


@pytest.mark.parametrize("mode", ["ar", "isd", "risd"])
def test_generate_json(model_dirs, mode: str, capsys) -> None:
    model_dir, adapter_dir = model_dirs
    argv = ["generate", "--model", str(model_dir), "--mode", mode, "--stride", "3",
            "--max-new-tokens", "6", "--json", "what is 2 plus 3?"]
    if mode == "risd":
        argv[3:3] = ["--adapter", str(adapter_dir)]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == mode and isinstance(report["text"], str)
    assert 1 <= report["stats"]["tokens"] <= 6 and report["stats"]["forwards"] >= 1
    assert report["prompt_tokens"] > 5   # the chat template wrapped the message


def test_generate_human_output_and_sampling(model_dirs, capsys) -> None:
    model_dir, _ = model_dirs
    argv = ["generate", "--model", str(model_dir), "--mode", "isd", "--temperature", "0.8",
            "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "5", "hi"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "--- isd N=4" in first and "acceptance per draft position" in first
    assert main(argv) == 0 and capsys.readouterr().out.split("---")[0] == first.split("---")[0]


@pytest.mark.parametrize(("extra", "message"), [
    (["--mode", "risd"], "needs an adapter"),
    (["--mode", "isd", "--stride", "1"], "stride N=1"),
    (["--mode", "isd", "--adapter", "x"], "only used in mode risd"),
])
def test_generate_bad_input_is_one_line(model_dirs, capsys, extra, message) -> None:
    model_dir, _ = model_dirs
    assert main(["generate", "--model", str(model_dir), *extra, "hello"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_generate_missing_model(tmp_path, capsys) -> None:
    assert main(["generate", "--model", str(tmp_path / "nope"), "hello"]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_bench_fails_with_one_line_without_models(tmp_path) -> None:
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "decode.py"), "--model", str(tmp_path / "ic"),
         "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")],
        capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and "not found" in completed.stderr


def test_bench_runs_every_engine_in_the_dtype_asked_for(tmp_path) -> None:
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "decode.py"), "--random-tiny", "--dtype",
         "bfloat16", "--batch-sizes", "1,2", "--max-new-tokens", "4", "--repeats", "1",
         "--min-prompts", "2", "--threads", "1", "--plot", str(tmp_path / "decode.png")],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    assert report["dtype"] == "bfloat16"
    assert report["engine_dtypes"] == {"ar": "bfloat16", "isd": "bfloat16", "risd": "bfloat16"}
    for cell in report["results"].values():
        assert set(cell) == {"hf_generate", "ar", "isd", "risd"}
        assert all(run["tokens"] > 0 for run in cell.values())
    assert (tmp_path / "decode.png").is_file()
