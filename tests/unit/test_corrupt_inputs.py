"""Corrupt inputs at the stage boundaries are one line naming the file and the fix
(issue 15, item 5).

Readers, per boundary: a model folder (outputs/base/model, outputs/ic/model) is read by
ic and lora through ``load_causal_lm`` and by verify, evaluate, export, ``idlm serve``
and ``idlm generate`` through ``load_engine``; the prepared tokenizer and data shards by
base, ic and lora through ``load_tokenizer`` / ``load_split``. A changed file in an
exported bundle is covered by test_export_bundle (flip, truncate, delete, extra file,
manifest). Stage scripts print DecodingError and StageError as one line, exit 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from idlm.decoding.loading import load_engine
from idlm.decoding.requests import DecodingError
from idlm.errors import StageError
from idlm.model.hub import CheckpointError
from idlm.stage import stage_main
from tests.unit.test_serve import build_model_dir


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """outputs/base/model: a tiny model folder as the base stage leaves it."""
    root = tmp_path_factory.mktemp("corrupt") / "outputs"
    build_model_dir(root / "base" / "model", context=128)
    return root


def damaged(outputs: Path, tmp_path: Path, damage: str) -> Path:
    copy = tmp_path / "outputs"
    shutil.copytree(outputs, copy)
    folder = copy / "base" / "model"
    if damage == "truncated weights":
        weights = folder / "model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "weights header":
        weights = folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[10] ^= 0xFF   # inside the JSON header
        weights.write_bytes(bytes(data))
    else:
        text = (folder / "tokenizer.json").read_text()
        (folder / "tokenizer.json").write_text(text[: len(text) // 3])
    return folder


WEIGHT_DAMAGE = ["truncated weights", "weights header"]
EXPECTED = {"truncated weights": "model.safetensors: truncated or corrupt safetensors file; "
                                 "rerun `dvc repro base`",
            "weights header": "model.safetensors: truncated or corrupt safetensors file; "
                              "rerun `dvc repro base`"}


@pytest.mark.parametrize("damage", WEIGHT_DAMAGE)
def test_ic_and_lora_read_a_damaged_base_in_one_line(outputs, tmp_path, damage: str) -> None:
    from idlm.model.factory import load_causal_lm

    folder = damaged(outputs, tmp_path, damage)
    with pytest.raises(CheckpointError) as info:
        load_causal_lm(folder)
    assert isinstance(info.value, StageError) and "\n" not in str(info.value)
    assert str(folder / "model.safetensors") in str(info.value)
    assert EXPECTED[damage] in str(info.value)


@pytest.mark.parametrize("damage", [*WEIGHT_DAMAGE, "tokenizer"])
def test_engine_loaders_refuse_in_one_line(outputs, tmp_path, damage: str) -> None:
    """verify, evaluate, export, serve and generate all load through load_engine."""
    folder = damaged(outputs, tmp_path, damage)
    with pytest.raises(DecodingError) as info:
        load_engine(folder, mode="isd")
    message = str(info.value)
    assert "\n" not in message and str(folder) in message
    assert "rerun `dvc repro base`" in message


@pytest.mark.parametrize("damage", [*WEIGHT_DAMAGE, "tokenizer"])
def test_a_stage_script_prints_one_line_and_exits_1(outputs, tmp_path, damage: str,
                                                    capsys) -> None:
    folder = damaged(outputs, tmp_path, damage)

    def verify_like(_cfg) -> dict:  # noqa: ANN001 - what verify's run does first
        load_engine(folder, mode="ar")
        return {}

    assert stage_main("verify", "test", argv=[], run=verify_like) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("damage", [*WEIGHT_DAMAGE, "tokenizer"])
def test_idlm_generate_is_one_line_without_traceback(outputs, tmp_path, damage: str) -> None:
    folder = damaged(outputs, tmp_path, damage)
    completed = subprocess.run([sys.executable, "-m", "idlm.cli", "generate", "--model",
                                str(folder), "hello"], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "rerun `dvc repro base`" in lines[0], completed.stderr


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):  # noqa: ANN201
    from idlm.config import load_profile
    from idlm.stages.prepare import run

    cfg = load_profile("tiny", [
        f"outputs={tmp_path_factory.mktemp('prepared')}", "prepare.synthetic.train_size=500",
        "prepare.synthetic.eval_size=40", "prepare.shard_rows=200",
        "prepare.tokenizer.vocab_size=512"])
    run(cfg)
    return cfg


def test_training_stages_refuse_a_corrupt_prepared_tokenizer(prepared, tmp_path) -> None:
    from idlm.config import load_profile
    from idlm.data.prepare import load_tokenizer

    shutil.copytree(prepared.out(), tmp_path / "outputs")
    cfg = load_profile("tiny", [f"outputs={tmp_path / 'outputs'}"])
    path = cfg.out("prepare", "tokenizer", "tokenizer.json")
    path.write_text(path.read_text()[:200])
    with pytest.raises(StageError) as info:
        load_tokenizer(cfg)
    assert "\n" not in str(info.value) and "rerun `dvc repro prepare`" in str(info.value)


def test_a_flipped_byte_in_a_data_shard_is_refused(prepared, tmp_path) -> None:
    from idlm.config import load_profile
    from idlm.data.prepare import load_split

    shutil.copytree(prepared.out(), tmp_path / "outputs")
    cfg = load_profile("tiny", [f"outputs={tmp_path / 'outputs'}"])
    shard = sorted(cfg.out("prepare", "train").glob("*.arrow"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StageError, match="rerun `dvc repro prepare`"):
        load_split(cfg, "train")
