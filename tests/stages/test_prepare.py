"""The prepare stage end to end: exact outputs, readers, corrupt shards, the real path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from idlm.config import Config, load_profile
from idlm.data.prepare import load_eval_items, load_split, load_tokenizer
from idlm.data.qwen_vocab import build_qwen3_tokenizer
from idlm.errors import StageError
from idlm.stages.prepare import run

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = ["eval", "eval_items.jsonl", "metrics.json", "tokenizer", "train"]


def tiny_config(outputs: Path, *overrides: str) -> Config:
    return load_profile("tiny", [
        f"outputs={outputs}", "prepare.synthetic.train_size=500",
        "prepare.synthetic.eval_size=40", "prepare.shard_rows=200",
        "prepare.tokenizer.vocab_size=512", *overrides])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, dict]:
    cfg = tiny_config(tmp_path_factory.mktemp("outputs"))
    return cfg, run(cfg)


def test_tiny_run_writes_exactly_the_declared_outputs(prepared: tuple[Config, dict]) -> None:
    cfg, result = prepared
    out = cfg.out("prepare")
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "data-00000-of-00003.arrow", "data-00001-of-00003.arrow", "data-00002-of-00003.arrow",
        "dataset_info.json", "manifest.json", "state.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["rows"] == 500 and metrics["eval"]["rows"] == 40
    assert (metrics["train"]["shards"], metrics["eval"]["shards"]) == (3, 1)
    assert metrics["rejected"] == {} and metrics["rejected_total"] == 0
    assert metrics["rows_read"] == 540 and metrics["eval_items"] == 40
    assert metrics["mask_token_id"] == 5 and metrics["eos_token_id"] == 2
    assert metrics["train"]["max_tokens"] < 256
    assert 20 < metrics["train"]["mean_response_tokens"] < 100
    assert result["outputs"]["train"] == str(out / "train")


def test_readers_return_typed_columns_and_responses_end_with_eos(
        prepared: tuple[Config, dict]) -> None:
    cfg, _ = prepared
    tokenizer = load_tokenizer(cfg)
    train = load_split(cfg, "train")
    assert train.column_names == ["input_ids", "prompt_length", "kind"]
    assert str(train.features["input_ids"].feature) == "Value('int32')"
    assert str(train.features["prompt_length"]) == "Value('int32')"
    assert set(train["kind"]) == {"arithmetic", "multiple_choice", "code", "instruction"}
    for row in train.select(range(50)):
        ids, prompt_length = row["input_ids"], row["prompt_length"]
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:prompt_length]).endswith("<|im_start|>assistant\n")
    items = load_eval_items(cfg)
    assert len(items) == 40 == len(load_split(cfg, "eval"))
    assert set(items[0]) == {"id", "kind", "prompt", "messages", "reference", "meta"}
    assert items[0]["messages"] == [{"role": "user", "content": items[0]["prompt"]}]


def test_same_seed_gives_identical_shards(prepared: tuple[Config, dict], tmp_path: Path) -> None:
    cfg, _ = prepared
    again = tiny_config(tmp_path)
    run(again)
    for name in ("data-00000-of-00003.arrow", "data-00002-of-00003.arrow"):
        assert (cfg.out("prepare", "train", name).read_bytes()
                == again.out("prepare", "train", name).read_bytes())
    assert (cfg.out("prepare", "eval_items.jsonl").read_text()
            == again.out("prepare", "eval_items.jsonl").read_text())


def test_truncated_shard_is_named_in_one_clear_error(prepared: tuple[Config, dict],
                                                     tmp_path: Path) -> None:
    cfg, _ = prepared
    copy = tiny_config(tmp_path)
    run(copy)
    shard = copy.out("prepare", "train", "data-00001-of-00003.arrow")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StageError, match=r"data-00001-of-00003\.arrow: corrupt or truncated.*"
                                         r"rerun `dvc repro prepare`"):
        load_split(copy, "train")
    assert len(load_split(copy, "eval")) == 40  # the other split is untouched


def test_missing_outputs_say_run_prepare_first(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    for reader in (lambda: load_split(cfg, "train"), lambda: load_tokenizer(cfg),
                   lambda: load_eval_items(cfg)):
        with pytest.raises(StageError, match="run `dvc repro prepare` first"):
            reader()


def test_real_path_on_local_jsonl_with_qwen3_vocabulary(tmp_path: Path) -> None:
    qwen_dir = tmp_path / "qwen3"
    build_qwen3_tokenizer().save_pretrained(qwen_dir)  # as a hub snapshot: no MASK yet
    rows = [{"conversations": [{"from": "human", "value": f"Double {n}."},
                               {"from": "gpt", "value": f"<think>\n{n}*2\n</think>\n\n{2 * n}"}]}
            for n in range(30)]
    rows += [{"conversations": [{"from": "human", "value": "Unanswered"}]},
             {"conversations": [{"from": "human", "value": "Long"},
                                {"from": "gpt", "value": "word " * 300}]}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_profile("tiny", [
        f"outputs={tmp_path / 'out'}", "prepare.source=hub", f"prepare.dataset.name_or_path={data}",
        "prepare.dataset.messages_field=conversations", "prepare.dataset.eval_fraction=0.1",
        "prepare.tokenizer.kind=pretrained", f"prepare.tokenizer.name_or_path={qwen_dir}",
        "prepare.max_length=128"])
    metrics = run(cfg)
    assert metrics["rejected"] == {"no_final_assistant_turn": 1, "too_long": 1}
    assert (metrics["train"]["rows"], metrics["eval"]["rows"], metrics["eval_items"]) == (27, 3, 3)
    assert (metrics["mask_token_id"], metrics["vocab_size"]) == (151669, 151670)
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.mask_token_id == 151669
    item = load_eval_items(cfg)[0]
    n = int(item["prompt"].split()[1].rstrip("."))
    assert item["reference"] == f"<think>\n{n}*2\n</think>\n\n{2 * n}"


def test_stage_script_runs_and_reports_config_errors(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("prepare_stage", REPO / "stages/prepare.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    config = str(REPO / "configs/tiny.yaml")
    argv = ["--config", config, f"outputs={tmp_path}", "prepare.synthetic.train_size=60",
            "prepare.synthetic.eval_size=5", "prepare.tokenizer.vocab_size=300"]
    code = stage.stage_main("prepare", stage.__doc__, argv)
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    # A 300-token vocabulary can make a row longer than max_length: counted, not lost.
    assert report["rows_read"] == 65
    assert report["train"]["rows"] + report["eval"]["rows"] + report["rejected_total"] == 65
    assert stage.stage_main("prepare", stage.__doc__,
                            ["--config", config, "prepare.shard_rowz=5"]) == 2
    assert "unknown key 'prepare.shard_rowz'" in capsys.readouterr().err


def test_mask_id_disagreeing_with_the_model_config_fails_before_writing(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "model.mask_token_id=151669")
    with pytest.raises(StageError, match="id 5 but model.mask_token_id is 151669"):
        run(cfg)
    assert not cfg.out("prepare").exists()
