"""What the SGLang glue can be checked for on CPU, without sglang installed.

* the shim that puts our algorithm into ``sglang/srt/dllm/algorithm/`` is written,
  checked and removed reproducibly;
* the ``sglang.srt.plugins`` entry point is declared, installed and importable;
* every hook target, overridden method and batch field the glue uses exists, with the
  arguments the glue expects, in sglang 0.5.21's source (``sglang_facts.json``);
* the gated LoRA fused for SGLang's merged projections equals PEFT's per-projection
  deltas, on gated rows only, and leaves every other row bit-identical;
* the plugin modules import without sglang, transformers or peft.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from torch import nn

from idlm.serving.sglang import ALGORITHM_NAME, PLUGIN_GROUP, PLUGIN_NAME, SGLANG_VERSION
from idlm.serving.sglang import install as shim
from idlm.serving.sglang.compat import load_facts
from idlm.serving.sglang.hooks import TARGETS, rope_settings
from idlm.serving.sglang.lora import (
    AdapterError,
    GateBuffer,
    GatedLoraLinear,
    fuse_layer,
    projection_sizes,
    read_adapter,
)
from tests.conftest import MASK_ID, tiny_qwen3

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the shim
@pytest.fixture()
def sglang_root(tmp_path: Path) -> Path:
    """A folder laid out as an installed sglang's dLLM algorithm package."""
    package = tmp_path / "sglang" / "srt" / "dllm" / "algorithm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    return tmp_path


def test_install_writes_the_shim_once_and_replaces_a_stale_one(sglang_root: Path) -> None:
    path = sglang_root / "sglang/srt/dllm/algorithm/idlm_isd.py"
    assert shim.status(sglang_root) == "missing"
    assert shim.install(sglang_root) == path
    assert path.read_text() == shim.SHIM and shim.status(sglang_root) == "installed"
    mtime = path.stat().st_mtime_ns
    shim.install(sglang_root)                      # idempotent: untouched
    assert path.stat().st_mtime_ns == mtime
    path.write_text("Algorithm = None\n")
    assert shim.status(sglang_root) == "stale"
    shim.install(sglang_root)
    assert path.read_text() == shim.SHIM
    assert not list(path.parent.glob(".*.tmp"))   # atomic: no temp file left behind
    assert shim.uninstall(sglang_root) and shim.status(sglang_root) == "missing"


def test_the_shim_exposes_algorithm_as_sglang_discovers_it() -> None:
    code = compile(shim.SHIM, "idlm_isd.py", "exec")
    assert "Algorithm" in code.co_names and "algorithm_class" in code.co_names
    module = importlib.import_module("idlm.serving.sglang.algorithm")
    assert callable(module.algorithm_class)


def test_install_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(shim.InstallError, match=f"sglang {SGLANG_VERSION} is required"):
        shim.install(tmp_path)
    assert shim.main(["status", "--root", str(tmp_path)]) == 1


def test_install_command_line(sglang_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert shim.main(["--root", str(sglang_root)]) == 0
    assert shim.main(["status", "--root", str(sglang_root)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("installed: ")


# ---------------------------------------------------------------- entry point
def test_plugin_entry_point_is_declared_installed_and_callable() -> None:
    facts = load_facts()
    assert facts["plugin_groups"]["GENERAL_PLUGINS_GROUP"] == PLUGIN_GROUP
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    value = declared[PLUGIN_GROUP][PLUGIN_NAME]
    installed = {ep.name: ep.value for ep in entry_points(group=PLUGIN_GROUP)}
    assert installed.get(PLUGIN_NAME) == value, "reinstall: pip install --no-deps -e ."
    module, function = value.split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_serve_extra_pins_the_sglang_the_facts_describe() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert f"sglang=={SGLANG_VERSION}" in extras["serve"]
    torch_pin = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())[
        "project"]["dependencies"] if d.startswith("torch=="))
    assert torch_pin == f"torch=={load_facts()['pins']['torch']}"


# ---------------------------------------------------------------- the pinned source
def _method_args(target: str) -> list[str]:
    module, cls, method = target.rsplit(".", 2)
    methods = load_facts()["methods"][module]
    assert cls in methods, f"{cls} not in {module} of sglang {SGLANG_VERSION}"
    assert method in methods[cls], f"{cls}.{method} not in sglang {SGLANG_VERSION}"
    return methods[cls][method]


def test_hook_targets_exist_with_the_arguments_the_hooks_take() -> None:
    assert _method_args(TARGETS["attention"])[:3] == ["self", "config", "layer_id"]
    assert _method_args(TARGETS["weights"]) == ["self", "weights"]
    assert _method_args(TARGETS["fill"]) == ["self"]
    assert _method_args(TARGETS["result"]) == ["self", "batch", "result"]
    assert _method_args(TARGETS["stash"]) == ["self", "req"]
    registry = load_facts()["methods"]["sglang.srt.plugins.hook_registry"]
    assert registry["HookRegistry"]["register"] == ["cls", "target", "hook", "hook_type",
                                                    "source"]


def test_the_algorithm_overrides_base_methods_that_exist() -> None:
    base = load_facts()["methods"]["sglang.srt.dllm.algorithm.base"]["DllmAlgorithm"]
    assert base["run"] == ["self", "model_runner", "forward_batch", "algo_states"]
    assert base["configure_server_args"] == ["cls", "server_args"]
    assert base["__init__"] == ["self", "config"]


def test_batch_fields_the_algorithm_reads_exist() -> None:
    fields = load_facts()["fields"]
    prefix = "sglang.srt."
    assert {"rids", "positions", "input_ids", "sampling_info", "forward_mode",
            "batch_size"} <= set(fields[prefix + "model_executor.forward_batch_info.ForwardBatch"])
    assert {"temperatures", "top_ks", "top_ps", "sampling_seed"} <= set(
        fields[prefix + "sampling.sampling_batch_info.SamplingBatchInfo"])
    assert {"next_token_ids", "dllm_algo_state"} <= set(
        fields[prefix + "managers.utils.GenerationBatchResult"])


def test_plugin_modules_import_with_torch_alone() -> None:
    """The server installs idlm without dependencies: the plugin must need only torch."""
    code = ("import sys\nimport idlm.serving.sglang.plugin, idlm.serving.sglang.algorithm, "
            "idlm.serving.sglang.hooks, idlm.serving.sglang.window, idlm.serving.sglang.lora\n"
            "print(sorted(m for m in ('sglang', 'transformers', 'peft', 'mlflow', 'pydantic', "
            "'yaml') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_rope_theta_comes_from_rope_parameters_as_qwen3_reads_it() -> None:
    from transformers import Qwen3Config

    theta, scaling = rope_settings(Qwen3Config(rope_parameters={"rope_type": "default",
                                                                "rope_theta": 1_000_000.0}))
    assert theta == 1_000_000.0 and scaling["rope_type"] == "default"


# ---------------------------------------------------------------- gated LoRA, fused
@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    from idlm.model.adapter_files import base_fingerprint, save_gated_lora
    from idlm.model.gated_lora import attach_gated_lora

    base = tiny_qwen3(seed=5)
    fingerprint = base_fingerprint(base)
    peft_model = attach_gated_lora(base, MASK_ID, rank=4, alpha=8, dropout=0.0,
                                   targets=["q_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"])   # k_proj left out
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("adapter")
    save_gated_lora(peft_model, folder, fingerprint)
    return peft_model, folder


def _peft_delta(peft_model: nn.Module, layer: int, part: str, x: torch.Tensor) -> torch.Tensor:
    module = peft_model.get_base_model().model.layers[layer].get_submodule(part)
    return module.lora_B["default"](module.lora_A["default"](x)) * module.scaling["default"]


def test_fused_projections_equal_pefts_deltas(adapter: tuple[nn.Module, Path]) -> None:
    peft_model, folder = adapter
    tensors, scaling, mask = read_adapter(folder)
    config = peft_model.get_base_model().config
    assert (scaling, mask) == (2.0, MASK_ID)
    fused = fuse_layer(tensors, scaling, 1, projection_sizes(config))
    assert set(fused) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                          "mlp.down_proj"}
    x = torch.randn(6, config.hidden_size)
    with torch.no_grad():
        lora_a, lora_b = fused["self_attn.qkv_proj"]
        k_rows = torch.zeros(6, projection_sizes(config)["self_attn.k_proj"])
        expected = torch.cat([_peft_delta(peft_model, 1, "self_attn.q_proj", x), k_rows,
                              _peft_delta(peft_model, 1, "self_attn.v_proj", x)], dim=1)
        torch.testing.assert_close((x @ lora_a.T) @ lora_b.T, expected)
        lora_a, lora_b = fused["mlp.gate_up_proj"]
        expected = torch.cat([_peft_delta(peft_model, 1, "mlp.gate_proj", x),
                              _peft_delta(peft_model, 1, "mlp.up_proj", x)], dim=1)
        torch.testing.assert_close((x @ lora_a.T) @ lora_b.T, expected)


def test_gated_linear_changes_gated_rows_only(adapter: tuple[nn.Module, Path]) -> None:
    peft_model, folder = adapter
    config = peft_model.get_base_model().config
    tensors, scaling, _ = read_adapter(folder)
    lora_a, lora_b = fuse_layer(tensors, scaling, 0, projection_sizes(config))["mlp.down_proj"]
    base = nn.Linear(config.intermediate_size, config.hidden_size)
    gate = GateBuffer(64, "cpu")
    wrapped = GatedLoraLinear(base, lora_a, lora_b, gate)
    x = torch.randn(2, 4, config.intermediate_size)
    on = torch.tensor([False, True, True, False, False, False, False, True])
    gate.write(on)
    with torch.no_grad():
        out, plain = wrapped(x), base(x)
        delta = _peft_delta(peft_model, 0, "mlp.down_proj", x)
    flat_out, flat_plain = out.reshape(8, -1), plain.reshape(8, -1)
    assert torch.equal(flat_out[~on], flat_plain[~on])          # bit-identical base rows
    torch.testing.assert_close(flat_out[on], (plain + delta).reshape(8, -1)[on])
    assert wrapped.weight is base.weight                          # inspectors see the layer
    gate.clear()
    with torch.no_grad():
        assert torch.equal(wrapped(x), plain)                     # context pass: gate closed
    with pytest.raises(AdapterError, match="exceed the gate buffer"):
        gate.write(torch.ones(65, dtype=torch.bool))


def test_unreadable_adapter_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="re-export the R-ISD bundle"):
        read_adapter(tmp_path)


def test_algorithm_name_is_what_the_export_launches_with() -> None:
    from idlm.config.downstream import ExportSection
    from idlm.serving.export.bundle import launch_argv

    argv = launch_argv(ExportSection(), "{bundle}", "{bundle}")
    assert argv[argv.index("--dllm-algorithm") + 1] == ALGORITHM_NAME
    assert "--no-dllm-fdfo" in argv and "--max-running-requests" in argv
