"""The gate's verdict on recorded measurements, against a real MLflow registry (sqlite in a
temp folder): a pass moves the alias to this export's versions, a fail or a missing arm
leaves it where it was and names what missed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idlm import config, tracking
from idlm.errors import StageError
from idlm.stages.gate import conclude, read_registered

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "gate_tiny_measurements.json"
SCORES = {"ar": {"tiny_arithmetic": 61.0, "tiny_code": 40.0},
          "isd": {"tiny_arithmetic": 58.0, "tiny_code": 41.0},
          "risd": {"tiny_arithmetic": 61.0, "tiny_code": 40.0}}


@pytest.fixture()
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[dict]]:
    """Two registered models; idlm-isd v1 is the current champion, v2 is this export's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    for name in ("idlm-isd", "idlm-isd", "idlm-risd"):
        tracking.register_bundle(name, bundle, workspace=tmp_path, upload=False)
    tracking.set_alias("idlm-isd", "champion", "1", workspace=tmp_path)
    exported = [{"name": "idlm-isd", "version": "2"}, {"name": "idlm-risd", "version": "1"}]
    return tmp_path, exported


def recorded() -> dict:
    """Measurements as a tiny-profile gate run wrote them (report.json, per arm and level)."""
    return json.loads(RECORDED.read_text())["measurements"]


def gate_config(root: Path, *overrides: str) -> config.Config:
    return config.load_profile("tiny", [f"outputs={root / 'outputs'}", *overrides])


def aliases(root: Path) -> tuple[str | None, str | None]:
    return (tracking.get_alias("idlm-isd", "champion", workspace=root),
            tracking.get_alias("idlm-risd", "champion", workspace=root))


def test_pass_moves_the_alias_to_the_exported_versions(registry) -> None:
    root, exported = registry
    cfg = gate_config(root, "~gate.min_speedup", "+gate.min_speedup={isd: {1: 1.0}}")
    metrics = conclude(cfg, recorded(), SCORES, exported, {}, workspace=root)
    assert metrics["passed"] is True and metrics["misses"] == 0
    assert aliases(root) == ("2", "1")
    report = json.loads(cfg.out("gate", "report.json").read_text())
    assert report["promoted"] == [{"name": "idlm-isd", "version": "2", "alias": "champion"},
                                  {"name": "idlm-risd", "version": "1", "alias": "champion"}]
    assert "Promoted: idlm-isd v2 -> 'champion'" in cfg.out("gate", "report.md").read_text()


def test_fail_leaves_the_alias_and_exits_with_the_table(registry) -> None:
    root, exported = registry
    isd_c64 = recorded()["isd"]["64"]["per_request_tok_s"] / \
        recorded()["ar"]["64"]["per_request_tok_s"]
    cfg = gate_config(root, "~gate.min_speedup", "+gate.min_speedup={isd: {1: 1.0, 64: 9.0}}")
    with pytest.raises(StageError) as failure:
        conclude(cfg, recorded(), SCORES, exported, {}, workspace=root)
    assert aliases(root) == ("1", None)
    assert f"| speedup | isd | C=64 | {isd_c64:.2f}x | >= 9.00x |" in str(failure.value)
    assert json.loads(cfg.out("gate", "metrics.json").read_text())["passed"] is False


def test_a_missing_arm_fails_clearly_and_leaves_the_alias(registry) -> None:
    root, exported = registry
    measurements = recorded()
    del measurements["risd"]
    cfg = gate_config(root, "~gate.min_speedup", "+gate.min_speedup={isd: {1: 1.0}}")
    with pytest.raises(StageError, match=r"\| load test \| risd \| - \| no measurements \|"):
        conclude(cfg, measurements, SCORES, exported, {}, workspace=root)
    assert aliases(root) == ("1", None)


def test_a_quality_drop_fails_even_when_fast_enough(registry) -> None:
    root, exported = registry
    cfg = gate_config(root, "~gate.min_speedup", "+gate.min_speedup={isd: {1: 1.0}}",
                     "gate.max_quality_drop=2.0")
    with pytest.raises(StageError, match=r"\| quality \| isd \| tiny_arithmetic \| -3.00 points"):
        conclude(cfg, recorded(), SCORES, exported, {}, workspace=root)
    assert aliases(root) == ("1", None)


def test_registry_file_from_export(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    with pytest.raises(StageError, match="run the export stage first"):
        read_registered(path)
    path.write_text(json.dumps({"registered": [{"name": "idlm-isd", "version": 3}]}))
    assert read_registered(path) == [{"name": "idlm-isd", "version": "3"}]
    path.write_text(json.dumps({"isd": {"registered_model": "idlm-isd", "version": "4"},
                                "risd": {"name": "idlm-risd", "version": 1}}))
    assert read_registered(path) == [{"name": "idlm-isd", "version": "4"},
                                     {"name": "idlm-risd", "version": "1"}]
    path.write_text(json.dumps({"registered": []}))
    with pytest.raises(StageError, match="names no registered model version"):
        read_registered(path)
