"""The export stage on a tiny workspace built here: bundles, manifests, round trip, registry.

Checks what the issue asks of the export: each bundle loads back with transformers + our
engine and gives the same greedy output as its source; every file's hash matches the
manifest and a corrupted, truncated, missing or unlisted file is refused with a clear
line; ``config.json`` passes the pinned SGLang's dLLM table (from the extracted facts);
the R-ISD bundle references a pretrained base by fingerprint instead of copying it;
both bundles are registered as new versions in MLflow's registry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from idlm import config as config_mod
from idlm import tracking
from idlm.config.downstream import ExportSection
from idlm.decoding.loading import load_engine
from idlm.serving.export import bundle as export
from idlm.serving.export.manifest import MANIFEST, BundleError, verify_bundle
from idlm.serving.sglang import ALGORITHM_NAME, ARCHITECTURE
from idlm.serving.sglang.compat import config_problems, effective_config
from idlm.stages.export import check_prompts, greedy_outputs, run
from tests.conftest import tiny_qwen3

TEXTS = ["What is 12+7? #### 19", "def square(x):\n    return x * x",
         "Name a prime number greater than 10. 11", "Answer in one word: yes or no."] * 40


def _save_model(model: torch.nn.Module, tokenizer, folder: Path) -> None:  # noqa: ANN001
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """outputs/ of a tiny run: tokenizer, base (+pin), IC model, gated adapter."""
    from idlm.data.tokenizer import train_bpe_tokenizer
    from idlm.model.adapter_files import base_fingerprint, save_gated_lora
    from idlm.model.gated_lora import attach_gated_lora

    root = tmp_path_factory.mktemp("ws")
    out = root / "outputs"
    tokenizer = train_bpe_tokenizer(TEXTS, vocab_size=300)
    tokenizer.save_pretrained(out / "prepare" / "tokenizer")
    vocab = len(tokenizer)
    base = tiny_qwen3(seed=11, vocab=vocab)
    _save_model(base, tokenizer, out / "base" / "model")
    (out / "base" / "base.json").write_text(json.dumps(
        {"kind": "tiny", "path": "base/model", "fingerprint": "f00dfeed"}))
    _save_model(tiny_qwen3(seed=12, vocab=vocab), tokenizer, out / "ic" / "model")
    fingerprint = base_fingerprint(base, checkpoint_hash="f00dfeed",
                                   weights_dir=out / "base" / "model")
    adapter = attach_gated_lora(tiny_qwen3(seed=11, vocab=vocab), tokenizer.mask_token_id,
                                rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    save_gated_lora(adapter, out / "lora" / "adapter", fingerprint)
    return root


@pytest.fixture(scope="module")
def exported(workspace: Path) -> tuple[config_mod.Config, dict]:
    cfg = config_mod.load_profile("tiny", [f"outputs={workspace / 'outputs'}",
                                           "export.stride=3", "export.check_prompts=3",
                                           "export.check_new_tokens=10"])
    UPSTREAM_BEFORE.update(_upstream_digests(workspace))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IDLM_WORKSPACE", str(workspace))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        metrics = run(cfg)
    return cfg, metrics


UPSTREAM_BEFORE: dict[str, str] = {}


def _upstream_digests(workspace: Path) -> dict[str, str]:
    out = workspace / "outputs"
    return {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
            for stage in ("prepare", "base", "ic", "lora") for path in (out / stage).rglob("*")
            if path.is_file()}


def test_export_leaves_every_upstream_file_as_it_was(exported, workspace: Path) -> None:  # noqa: ANN001
    # Bundles hard-link big files from upstream outputs; rewriting one (config.json with the
    # SGLang architecture) must replace the link, never write into the IC model's file.
    assert UPSTREAM_BEFORE and _upstream_digests(workspace) == UPSTREAM_BEFORE


def test_metrics_and_registry_record_both_bundles(exported, workspace: Path) -> None:  # noqa: ANN001
    cfg, metrics = exported
    for kind in ("isd", "risd"):
        assert metrics[kind]["round_trip_matched"] == metrics[kind]["round_trip_prompts"] == 3
        assert metrics[kind]["bytes"] > 0 and len(metrics[kind]["manifest_sha256"]) == 64
    assert metrics["registered"] == {"idlm-isd": "1", "idlm-risd": "1"}
    assert metrics["sglang_version"] == "0.5.21" and metrics["stride"] == 3
    saved = json.loads(cfg.out("export", "metrics.json").read_text())
    assert saved["registered"] == metrics["registered"]
    registry = json.loads(cfg.out("export", "registry.json").read_text())["registered"]
    assert [(e["name"], e["version"], e["kind"]) for e in registry] == [
        ("idlm-isd", "1", "isd"), ("idlm-risd", "1", "risd")]
    source = tracking.model_version_source("idlm-isd", "1", workspace=workspace)
    stored = Path(source.removeprefix("file://"))
    assert (stored / MANIFEST).read_bytes() == cfg.out("export", "isd", MANIFEST).read_bytes()


def test_isd_bundle_is_what_sglang_0_5_21_serves(exported) -> None:  # noqa: ANN001
    cfg, _ = exported
    bundle = cfg.out("export", "isd")
    model_config = json.loads((bundle / "config.json").read_text())
    algorithm = yaml.safe_load((bundle / export.ALGORITHM_FILE).read_text())
    assert model_config["architectures"] == [ARCHITECTURE] and model_config["model_type"] == "qwen3"
    assert config_problems(model_config, algorithm) == []
    assert algorithm["stride"] == 3 and algorithm["block_size"] == 5
    assert algorithm["gate"] is False and algorithm["proposal"] == "sample"
    assert algorithm["pad_token_id"] == tokenizer_pad(cfg) != algorithm["mask_token_id"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundle))
    assert tokenizer.convert_tokens_to_ids("<|MASK|>") == algorithm["mask_token_id"] \
        == model_config["mask_token_id"]
    launch = (bundle / export.LAUNCH_FILE).read_text()
    for flag in (f"--dllm-algorithm {ALGORITHM_NAME}", "--max-running-requests 64",
                 "--no-dllm-fdfo", "--disable-radix-cache"):
        assert flag in launch
    manifest = verify_bundle(bundle)
    weights = cfg.out("ic", "model", "model.safetensors")
    from idlm.model.hub import sha256_of_file

    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_of_file(weights)
    assert manifest["launch"][:3] == ["python", "-m", "sglang.launch_server"]


def tokenizer_pad(cfg: config_mod.Config) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(cfg.out("prepare", "tokenizer"))).pad_token_id


def test_risd_bundle_carries_adapter_base_and_gate_on(exported) -> None:  # noqa: ANN001
    cfg, _ = exported
    bundle = cfg.out("export", "risd")
    algorithm = yaml.safe_load((bundle / export.ALGORITHM_FILE).read_text())
    assert algorithm["gate"] is True and algorithm["adapter"] == export.ADAPTER_DIR
    assert (bundle / "adapter" / "adapter_model.safetensors").is_file()
    reference = json.loads((bundle / export.BASE_REFERENCE).read_text())
    assert reference["in_bundle"] == "base" and reference["fingerprint"] == "f00dfeed"
    manifest = verify_bundle(bundle)
    overrides = json.loads(manifest["launch"][manifest["launch"].index(
        "--json-model-override-args") + 1])
    base_config = json.loads((bundle / "base" / "config.json").read_text())
    assert base_config["architectures"] == ["Qwen3ForCausalLM"]     # the base, unmodified
    assert config_problems(effective_config(base_config, overrides), algorithm) == []


def test_bundles_load_back_with_the_same_greedy_output(exported) -> None:  # noqa: ANN001
    cfg, _ = exported
    prompts = check_prompts(cfg.out("prepare", "tokenizer"), 4)
    sources = {"isd": load_engine(cfg.out("ic", "model"), mode="isd"),
               "risd": load_engine(cfg.out("base", "model"), cfg.out("lora", "adapter"),
                                   mode="risd")}
    for kind, source in sources.items():
        loaded = export.load_bundle(cfg.out("export", kind))
        assert loaded.name == kind
        before = greedy_outputs(source, prompts, 3, 12)
        assert greedy_outputs(loaded, prompts, 3, 12) == before
        assert any(len(tokens) > 1 for tokens in before)


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its sha256"), ("truncate", "it is truncated or replaced"),
    ("delete", "is missing config.json"), ("extra", "which manifest.json does not list"),
    ("manifest", "manifest.json is corrupt")])
def test_a_damaged_bundle_is_refused_with_a_clear_line(exported, tmp_path: Path, damage: str,
                                                        message: str) -> None:  # noqa: ANN001
    cfg, _ = exported
    bundle = tmp_path / "isd"
    shutil.copytree(cfg.out("export", "isd"), bundle)
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[:-10]))
    elif damage == "delete":
        (bundle / "config.json").unlink()
    elif damage == "extra":
        (bundle / "notes.txt").write_text("hello")
    else:
        (bundle / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match=message):
        export.load_bundle(bundle)


def test_pretrained_base_is_referenced_by_fingerprint_not_copied(
        exported, tmp_path: Path) -> None:  # noqa: ANN001
    from idlm.model.hub import resolve_checkpoint, to_json

    cfg, _ = exported
    base = tmp_path / "pretrained"
    shutil.copytree(cfg.out("base", "model"), base)
    pin = {"kind": "pretrained", **to_json(resolve_checkpoint(str(base)))}
    mask = yaml.safe_load(cfg.out("export", "risd", export.ALGORITHM_FILE).read_text())[
        "mask_token_id"]
    bundle = tmp_path / "risd"
    export.export_risd(pin, None, cfg.out("lora", "adapter"), cfg.out("prepare", "tokenizer"),
                       bundle, ExportSection(stride=3), (mask, 0), {"test": True})
    assert not (bundle / "base").exists()
    manifest = verify_bundle(bundle)
    assert manifest["launch"][manifest["launch"].index("--model-path") + 1] == str(base)
    assert manifest["base"]["fingerprint"] == pin["fingerprint"]
    assert export.load_bundle(bundle).name == "risd"
    (base / "generation_config.json").write_text("{}")      # the base changed since export
    with pytest.raises(BundleError, match="the bundle was made for"):
        export.load_bundle(bundle)


def test_sglang_table_check_names_what_is_wrong() -> None:
    good = {"architectures": [ARCHITECTURE], "model_type": "qwen3", "vocab_size": 1000}
    algorithm = {"stride": 4, "block_size": 7, "mask_token_id": 5}
    assert config_problems(good, algorithm) == []
    unknown = config_problems({**good, "architectures": ["Qwen3ForCausalLM"]}, algorithm)
    assert "Unknown diffusion LLM" in unknown[0]
    assert "must be the ISD window 2N-1 = 7" in config_problems(good, {**algorithm,
                                                                       "block_size": 4})[0]
    assert "not a row of the 1000-token embedding" in config_problems(
        good, {**algorithm, "mask_token_id": 1000})[0]
    assert "declares no architectures" in config_problems({"model_type": "qwen3"}, algorithm)[0]


def test_export_refuses_missing_inputs_in_one_line(tmp_path: Path) -> None:
    from idlm.errors import StageError

    cfg = config_mod.load_profile("tiny", [f"outputs={tmp_path}"])
    with pytest.raises(StageError, match=r"run `dvc repro ic` first"):
        run(cfg)
