"""Config: profiles validate; bad input fails fast with one line naming file and key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from idlm import config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("profile", ["tiny", "qwen3-8b", "qwen3-32b", "test"])
def test_profiles_validate(profile: str) -> None:
    cfg = config.load_profile(profile)
    assert cfg.profile == profile
    assert [p.stride for p in cfg.ic.phases][:2] == [2, 3]


def test_a_profile_extends_another(tmp_path: Path) -> None:
    tiny = config.load_profile("tiny")
    test = config.load_profile("test")
    # A mapping merges key by key: what the test profile does not name stays tiny's.
    assert test.model.tiny.hidden_size == 64
    assert test.model.tiny.num_attention_heads == tiny.model.tiny.num_attention_heads
    assert test.base.train.lr == tiny.base.train.lr and test.base.train.steps == 6
    # A list or an empty mapping replaces.
    assert [p.steps for p in test.ic.phases] == [2, 2, 2] and test.verify.strides == [2, 4]
    assert tiny.evaluate.overrides and test.evaluate.overrides == {}
    assert tiny.gate.min_speedup and test.gate.min_speedup == {}


@pytest.mark.parametrize(("text", "expected"), [
    ("extends: [tiny]\n", "'extends' names a profile"),
    ("extends: nope\n", "'extends: nope' but .*nope.yaml does not exist"),
    ("extends: loop\n", "'extends: loop' loops back to itself"),
])
def test_bad_extends_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=expected):
        config.load(path)


def test_paper_settings_in_the_8b_profile() -> None:
    cfg = config.load_profile("qwen3-8b")
    assert cfg.model.mask_token_id == 151669 and cfg.model.dtype == "bfloat16"
    assert [p.alpha for p in cfg.ic.phases] == [0.2, "auto"]
    assert cfg.ic.train.lr == 1e-5 and cfg.ic.phases[0].epochs == 1.0
    assert cfg.lora.rank == 128 and cfg.lora.targets == "all-linear"
    # The paper's 15 benchmarks: the schema's default, which is the registry's real suite.
    from idlm.benchmarks.registry import suite_names

    assert tuple(cfg.evaluate.benchmarks) == suite_names("real")


def test_params_yaml_is_the_resolved_tiny_profile() -> None:
    assert config.load(REPO / "params.yaml") == config.load_profile("tiny")


@pytest.mark.parametrize(("override", "expected"), [
    ("ic.train.lrr=1", "unknown key 'ic.train.lrr'"),
    ("ic.phases.0.train={}", "unknown key 'ic.phases.0.train'"),
    ("ic.phases.0.stride=x", "key 'ic.phases.0.stride'"),
    ("ic.phases.0.stride=17", "key 'ic.phases.0.stride'"),
    ("lora.train.deepspeed=configs/deepspeed/nope.json", "'configs/deepspeed/nope.json' not found"),
    ("prepare.dataset.name_or_path=./no/such/data", "'./no/such/data' not found"),
])
def test_bad_values_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(config.ConfigError, match="params.yaml: ") as info:
        config.load(REPO / "params.yaml", [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_steps_or_epochs_exactly_one() -> None:
    with pytest.raises(config.ConfigError, match="exactly one of 'steps' or 'epochs'"):
        config.load(REPO / "params.yaml", ["base.train.epochs=1"])


def test_phases_give_steps_or_epochs_alike() -> None:
    with pytest.raises(config.ConfigError, match="every phase 'steps' or every phase 'epochs'"):
        config.load(REPO / "params.yaml", ["ic.phases.0.steps=null", "ic.phases.0.epochs=1"])


def test_overrides_reach_nested_lists() -> None:
    cfg = config.load(REPO / "params.yaml", ["ic.phases.1.steps=7", "seed=3"])
    assert cfg.ic.phases[1].steps == 7 and cfg.seed == 3


def test_missing_or_broken_files(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("ic: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML at line"):
        config.load(broken)
    with pytest.raises(config.ConfigError, match="no such profile 'nope'"):
        config.load_profile("nope")


def test_stage_script_fails_fast_and_writes_nothing(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "stages/ic.py", f"outputs={tmp_path / 'out'}", "ic.phases.0.alpah=1"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "unknown key 'ic.phases.0.alpah'" in result.stderr
    assert not (tmp_path / "out").exists()
    assert elapsed < 2.0


def test_stage_help_is_fast() -> None:
    result = subprocess.run([sys.executable, "stages/ic.py", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "curriculum phase" in result.stdout


@pytest.mark.parametrize("overrides", [
    ["ic.train.lr=2e-5", "lora.rank=32"],
    ["prepare.synthetic.mix={arithmetic: 3}"],
    ["~gate.min_speedup", "+gate.min_speedup={isd: {1: 2.0}}"],
    ["+evaluate.endpoints.ar.url=http://localhost:1", "ic.phases.1.steps=7"],
    ["++flow.new_key=[1, 2]", "~verify.strides"],
])
def test_overrides_apply_as_dvc_exp_run_applies_them(tmp_path: Path,
                                                     overrides: list[str]) -> None:
    """In-memory overrides give what DVC's own function writes into a params file (read
    as DVC reads it, YAML 1.2: PyYAML would read the 2e-05 it writes as a string)."""
    import yaml
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides
    from dvc.utils.serialize import load_yaml

    from idlm.config.files import apply_overrides, read_config

    data = read_config(config.config_dir() / "tiny.yaml")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    for text in overrides:
        dvc_apply_overrides(str(path), [text])
    ours = apply_overrides(data, overrides)
    assert ours == load_yaml(path)
    assert ours != data and read_config(config.config_dir() / "tiny.yaml") == data
