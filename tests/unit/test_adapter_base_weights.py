"""Adapters are bound to the exact base weights they were trained on (issue 15, item 2).

An adapter records a sha256 over its base's weight files; ``idlm generate``, ``idlm
serve`` and every stage loader (they all build through ``load_engine``) refuse other
weights in one line before the model loads; ``--allow-other-base`` loads anyway and
says what losslessness then means. The SGLang plugin makes the same check.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from idlm.cli.generate import main
from idlm.decoding.loading import load_engine
from idlm.decoding.requests import DecodingError
from idlm.model.base_weights import (
    WEIGHTS_FIELD,
    BaseWeightsError,
    check_adapter_base,
    weights_fingerprint,
)
from tests.unit.test_serve import build_model_dir


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A base, an 'IC model' of the same shape (other weights) and an adapter on the base."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from idlm.model.adapter_files import base_fingerprint, save_gated_lora
    from idlm.model.gated_lora import attach_gated_lora

    root = tmp_path_factory.mktemp("bound")
    base = build_model_dir(root / "base", seed=0, context=128)
    other = build_model_dir(root / "ic", seed=1, context=128)
    mask_id = AutoTokenizer.from_pretrained(base).mask_token_id
    gated = attach_gated_lora(Qwen3ForCausalLM.from_pretrained(base), mask_id, rank=2,
                              alpha=4.0, dropout=0.0)
    save_gated_lora(gated, root / "adapter", base_fingerprint(gated, weights_dir=base))
    return {"base": base, "ic": other, "adapter": root / "adapter", "root": root}


def test_the_adapter_records_its_bases_weights(folders) -> None:
    record = json.loads((folders["adapter"] / "idlm_gate.json").read_text())
    model_file = folders["base"] / "model.safetensors"
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    manifest = f"model.safetensors\t{digest}\n"
    assert record["base_fingerprint"][WEIGHTS_FIELD] == hashlib.sha256(
        manifest.encode()).hexdigest() == weights_fingerprint(folders["base"])


def test_the_right_base_loads(folders) -> None:
    engine = load_engine(folders["base"], folders["adapter"], mode="risd")
    assert engine is not None


def test_other_weights_are_refused_in_one_line_before_loading(folders, monkeypatch) -> None:
    import idlm.decoding.loading as loading

    def never(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(loading, "_model", never)
    with pytest.raises(DecodingError) as info:
        load_engine(folders["ic"], folders["adapter"], mode="risd")
    message = str(info.value)
    assert "\n" not in message and str(folders["ic"]) in message
    assert "recorded base weights" in message and "--allow-other-base" in message


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_the_clis_refuse_in_one_line(folders, command: str, capsys) -> None:
    from idlm.cli import main as idlm_main

    argv = [command, "--model", str(folders["ic"]), "--adapter", str(folders["adapter"]),
            "--mode", "risd"] + (["hello"] if command == "generate" else [])
    run = main if command == "generate" else idlm_main
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: adapter ") and err.count("\n") == 1
    assert "recorded base weights" in err


def test_the_override_loads_and_says_what_lossless_then_means(folders, capsys) -> None:
    argv = ["generate", "--model", str(folders["ic"]), "--adapter", str(folders["adapter"]),
            "--mode", "risd", "--allow-other-base", "--max-new-tokens", "4", "--json", "hi"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: adapter" in err and "not of the base the adapter was trained on" in err


def test_an_adapter_without_a_weights_record_is_refused(folders, tmp_path) -> None:
    import shutil

    old = shutil.copytree(folders["adapter"], tmp_path / "old")
    record = json.loads((old / "idlm_gate.json").read_text())
    del record["base_fingerprint"][WEIGHTS_FIELD]
    (old / "idlm_gate.json").write_text(json.dumps(record))
    with pytest.raises(BaseWeightsError, match="has no base weights hash"):
        check_adapter_base(old, folders["base"])
    assert check_adapter_base(old, folders["base"], allow_other_base=True)


def test_hf_cache_blobs_are_taken_by_their_name_not_reread(tmp_path) -> None:
    """A hub snapshot's files link to blobs named by their sha256: no 16 GB re-hash."""
    payload = b"weights"
    blob = tmp_path / "blobs" / hashlib.sha256(payload).hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(payload)
    snapshot, plain = tmp_path / "snapshot", tmp_path / "plain"
    snapshot.mkdir()
    plain.mkdir()
    (snapshot / "model.safetensors").symlink_to(blob)
    (plain / "model.safetensors").write_bytes(payload)
    assert weights_fingerprint(snapshot) == weights_fingerprint(plain)
    # A pin's recorded digests are used as given.
    assert weights_fingerprint(plain, {"model.safetensors": "0" * 64}) != weights_fingerprint(
        plain)


def test_a_folder_without_weights_is_one_line(tmp_path) -> None:
    with pytest.raises(BaseWeightsError, match="holds no .safetensors weights"):
        weights_fingerprint(tmp_path)


def test_the_sglang_hook_finds_the_weights_folder(folders) -> None:
    from types import SimpleNamespace

    from idlm.serving.sglang.hooks import _weights_folder

    config = SimpleNamespace(_name_or_path=str(folders["base"]))
    assert _weights_folder(config) == folders["base"]
    with pytest.raises(BaseWeightsError, match="recorded base weights"):
        check_adapter_base(folders["adapter"], _weights_folder(
            SimpleNamespace(_name_or_path=str(folders["ic"]))))
