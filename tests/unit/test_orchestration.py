"""The flow's library: DAG from dvc.yaml, stage selection, params the DVC way, the workspace
lock, streaming `dvc repro`, what MLflow gets, the summary, prefect.yaml, and one name per
stage everywhere."""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

from flows.idlm_full import FLOW_NAME, idlm_full, stage_names
from idlm import config as config_mod
from idlm.orchestration import record, summary
from idlm.orchestration.dvc_runner import (
    RAN,
    SKIPPED,
    StageFailed,
    error_line,
    repro_stage,
    status_of,
    stream,
)
from idlm.orchestration.lock import (
    DVC_LOCK_FILE,
    WorkspaceBusy,
    holder_info,
    workspace_lock,
)
from idlm.orchestration.params import flow_settings, prepare_params, use_workspace
from idlm.orchestration.pipeline import SelectionError, load_pipeline, topological

REPO = Path(__file__).resolve().parents[2]
TINY = config_mod.Config.model_validate({"base": {"train": {}}})

# Listed out of order on purpose: the flow must still run `make` before its users.
TOY_DVC_YAML = """
stages:
  report:
    cmd: python -c "open('report.txt','w').write(open('b.txt').read()+open('c.txt').read())"
    deps: [b.txt, c.txt]
    outs: [report.txt]
  make:
    cmd: python make.py
    deps: [make.py]
    params: [make]
    outs: [a.txt]
    metrics:
      - m.json:
          cache: false
  c:
    cmd: python -c "open('c.txt','w').write(open('a.txt').read()+'c')"
    deps: [a.txt]
    outs: [c.txt]
  b:
    cmd: python -c "open('b.txt','w').write(open('a.txt').read()+'b')"
    deps: [a.txt]
    outs: [b.txt]
  broken:
    cmd: python -c "raise ValueError('bad input 42')"
    outs: [never.txt]
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("toy")
    Repo.init(str(root), no_scm=True).close()
    (root / "dvc.yaml").write_text(TOY_DVC_YAML)
    (root / "params.yaml").write_text("make: {size: 1}\n")
    (root / "make.py").write_text("import json\nprint('making')\nopen('a.txt', 'w').write('a')\n"
                                  "json.dump({'size': 1}, open('m.json', 'w'))\n")
    return root


# ---------------------------------------------------------------- one name per stage
def test_dvc_yaml_flow_config_and_stage_scripts_agree() -> None:
    pipeline = load_pipeline(REPO)
    names = pipeline.names
    assert stage_names(REPO) == names  # the flow's tasks are dvc.yaml's stages, in DAG order
    assert sorted(names) == sorted(config_mod.pipeline_stages(REPO))
    assert sorted(names) == sorted(p.stem for p in (REPO / "stages").glob("*.py")
                                   if not p.name.startswith("_"))
    sections = set(config_mod.Config.model_fields)
    for spec in pipeline.stages:
        assert spec.name in sections, f"stage '{spec.name}' has no config section"
        tracked = spec.params.get("params.yaml", ())
        assert any(k == spec.name or k.startswith(f"{spec.name}.") for k in tracked), \
            f"dvc.yaml stage '{spec.name}' does not track its config section"
        assert all(u in names[:names.index(spec.name)] for u in spec.upstream)


# ---------------------------------------------------------------- DAG and selection
def test_stages_come_in_dag_order_with_dvc_yaml_order_as_tie_break(toy: Path) -> None:
    pipeline = load_pipeline(toy)
    assert pipeline.names == ["make", "c", "b", "report", "broken"]
    assert pipeline["report"].upstream == ("make", "c", "b")
    assert pipeline["make"].files("metric") == ["m.json"]
    assert pipeline["make"].params == {"params.yaml": ("make",)}
    assert pipeline.downstream("make") == ["c", "b", "report"]


def test_selection_all_from_and_only(toy: Path) -> None:
    pipeline = load_pipeline(toy)
    assert pipeline.select() == pipeline.names
    assert pipeline.select(from_stage="c") == ["c", "report"]
    assert pipeline.select(only=["report", "make"]) == ["make", "report"]
    with pytest.raises(SelectionError, match=r"no stage 'nope'.*make, c, b, report, broken"):
        pipeline.select(only=["nope"])
    with pytest.raises(SelectionError, match="either"):
        pipeline.select(only=["b"], from_stage="c")


def test_a_cycle_is_reported() -> None:
    with pytest.raises(SelectionError, match="cycle"):
        topological(["a", "b"], {"a": {"b"}, "b": {"a"}})


# ---------------------------------------------------------------- params, settings
@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    with use_workspace(tmp_path):
        config_mod.write_active(config_mod.load_profile("tiny"), tmp_path / "params.yaml")
        yield tmp_path


def test_overrides_edit_params_yaml_as_dvc_exp_run_does(workspace: Path) -> None:
    path = workspace / "params.yaml"
    before = yaml.safe_load(path.read_text())
    cfg = prepare_params(workspace, None, ["lora.rank=8", "ic.train.lr=0.01",
                                           "lora.targets=[q_proj,v_proj]"])
    after = yaml.safe_load(path.read_text())
    assert (cfg.lora.rank, cfg.ic.train.lr) == (8, 0.01)
    assert after["lora"]["targets"] == ["q_proj", "v_proj"]
    after["lora"].update(rank=before["lora"]["rank"], targets=before["lora"]["targets"])
    after["ic"]["train"]["lr"] = before["ic"]["train"]["lr"]
    assert after == before  # nothing else changed
    assert path.read_text().startswith("# Active config")  # written as `idlm config use` does


def test_profile_then_overrides_equals_idlm_config_use(workspace: Path) -> None:
    prepare_params(workspace, None, ["lora.rank=3"])
    cfg = prepare_params(workspace, "tiny", ["base.train.steps=7"])
    assert cfg == config_mod.load_profile("tiny", ["base.train.steps=7"])


@pytest.mark.parametrize(("override", "message"), [
    ("lora.nope=1", "nope"), ("lora.rank=-1", "lora.rank"), ("lora.rank", "lora.rank")])
def test_a_bad_override_leaves_params_yaml_untouched(workspace: Path, override: str,
                                                      message: str) -> None:
    before = (workspace / "params.yaml").read_bytes()
    with pytest.raises(config_mod.ConfigError, match=message):
        prepare_params(workspace, None, ["lora.rank=5", override])
    assert (workspace / "params.yaml").read_bytes() == before


def test_retries_come_from_the_config_flow_section_or_the_parameter() -> None:
    assert flow_settings(TINY).retries_for("base") == 0
    cfg = config_mod.load_profile("tiny", ["flow.retries=2", "+flow.stage_retries.ic=5",
                                           "flow.retry_delay_seconds=1"])
    settings = flow_settings(cfg, stages=["base", "ic"])
    assert (settings.retries_for("base"), settings.retries_for("ic")) == (2, 5)
    assert flow_settings(cfg, retries=1, stages=["base", "ic"]).retries_for("ic") == 1
    with pytest.raises(config_mod.ConfigError, match="no stage named ic"):
        flow_settings(cfg, stages=["base"])


# ---------------------------------------------------------------- one run per workspace
HOLD_LOCK = """
import sys, time
from pathlib import Path
from idlm.orchestration.lock import holder_info, workspace_lock
with workspace_lock(Path(sys.argv[1]), holder_info("run-123", "brave-otter")):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_run_is_refused_with_who_holds_the_workspace(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkspaceBusy) as refused:
            with workspace_lock(tmp_path, holder_info("run-456", "late")):
                pass
        message = str(refused.value)
        assert "brave-otter" in message and "prefect flow-run cancel run-123" in message
        assert f"pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    with workspace_lock(tmp_path, holder_info("run-456", "late")):  # freed by the kernel
        pass


def test_a_running_dvc_command_also_refuses_the_run(tmp_path: Path) -> None:
    import zc.lockfile

    (tmp_path / DVC_LOCK_FILE).parent.mkdir(parents=True)
    dvc_lock = zc.lockfile.LockFile(str(tmp_path / DVC_LOCK_FILE))
    try:
        with pytest.raises(WorkspaceBusy, match="a DVC command"):
            with workspace_lock(tmp_path, holder_info()):
                pass
    finally:
        dvc_lock.close()
    with workspace_lock(tmp_path, holder_info()):
        pass


def test_the_flow_refuses_a_busy_workspace_before_touching_params(workspace: Path) -> None:
    before = (workspace / "params.yaml").read_bytes()
    with workspace_lock(workspace, holder_info("run-1", "first")):
        with pytest.raises(WorkspaceBusy, match="first"):
            idlm_full.fn(profile="tiny", overrides=["lora.rank=9"], workspace=str(workspace))
    assert (workspace / "params.yaml").read_bytes() == before


# ---------------------------------------------------------------- running a stage
def test_stream_passes_every_line_as_it_comes(tmp_path: Path) -> None:
    script = ("import sys, time\nprint('one', flush=True)\n"
              "sys.stderr.write('10%\\r50%\\r100%\\n'); sys.stderr.flush()\n"
              "time.sleep(0.2)\nprint('two')\nsys.exit(3)\n")
    seen: list[tuple[float, str]] = []
    code, log = stream([sys.executable, "-c", script], tmp_path,
                       lambda line: seen.append((time.perf_counter(), line)))
    assert code == 3 and log == ["one", "10%", "50%", "100%", "two"]
    assert [line for _, line in seen] == log
    assert seen[-1][0] - seen[0][0] > 0.15  # streamed, not collected at the end


def test_interrupting_a_stage_stops_dvc_and_the_stage_it_started(tmp_path: Path) -> None:
    parent = ("import subprocess, sys\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "print(child.pid, flush=True)\nchild.wait()\n")
    pids: list[int] = []

    def interrupt(line: str) -> None:
        pids.append(int(line))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream([sys.executable, "-c", parent], tmp_path, interrupt)
    time.sleep(0.2)
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == "zombie"


def test_dvc_decides_ran_or_skipped_and_failures_carry_the_error(toy: Path) -> None:
    lines: list[str] = []
    first = repro_stage("make", toy, on_line=lines.append)
    assert first.status == RAN and "making" in lines
    assert repro_stage("make", toy, on_line=lambda _: None).status == SKIPPED
    with pytest.raises(StageFailed) as failed:
        repro_stage("broken", toy, on_line=lambda _: None)
    assert failed.value.cause == "ValueError: bad input 42"
    assert "ValueError: bad input 42" in str(failed.value)
    assert "Traceback" in failed.value.details


def test_status_and_error_lines_are_read_from_dvc_output() -> None:
    assert status_of("ic", ["Running stage 'ic':", "> python stages/ic.py"]) == RAN
    assert status_of("ic", ["Stage 'ic' didn't change, skipping"]) == SKIPPED
    assert status_of("ic", ["Stage 'ic' is cached - skipping run, checking out outputs"]) \
        == "restored"
    assert error_line(["[rank0]: Traceback (most recent call last):",
                       "[rank0]: pydantic_core.ValidationError: 1 validation error",
                       "ERROR: failed to reproduce 'base'"]) \
        == "pydantic_core.ValidationError: 1 validation error"
    assert error_line(["error: outputs/base/base.json not found"]) \
        == "error: outputs/base/base.json not found"


# ---------------------------------------------------------------- what MLflow gets
def test_metrics_and_curves_from_stage_files() -> None:
    assert record.numbers({"loss": 1.5, "ok": True, "name": "x", "phases": {"p0": {"ce": 2}},
                           "bad": float("nan")}) == {"loss": 1.5, "ok": 1.0, "phases.p0.ce": 2.0}
    rows = [{"phase": "phase0-N2", "step": 2, "mask_ce": 3.0},
            {"phase": "phase1-N3", "step": 2, "mask_ce": 2.5}]
    assert record.curve_points(rows, "history") == [("history/phase0-N2/mask_ce", 3.0, 2),
                                                    ("history/phase1-N3/mask_ce", 2.5, 2)]


def test_params_are_the_tracked_keys_resolved() -> None:
    spec = SimpleNamespace(params={"params.yaml": ("seed", "lora.train")})
    resolved = TINY.model_dump(mode="json")
    params = record.stage_params(spec, Path("."), resolved)
    assert params["seed"] == 0 and params["lora.train.lr"] == 2e-3
    assert params["lora.train.betas.1"] == 0.98 and "lora.rank" not in params


def test_small_outputs_are_copied_large_ones_referenced(toy: Path) -> None:
    repro_stage("make", toy, on_line=lambda _: None)
    spec = load_pipeline(toy)["make"]
    refs = {r["path"]: r for r in record.output_refs(spec, toy, max_bytes=1)}
    assert refs["a.txt"]["artifact"] and refs["a.txt"]["md5"]  # 1 byte: small
    assert refs["m.json"]["artifact"] and refs["m.json"]["kind"] == "metric"
    refs = {r["path"]: r for r in record.output_refs(spec, toy, max_bytes=0)}
    assert not refs["a.txt"]["artifact"] and refs["a.txt"]["md5"]  # referenced by hash


# ---------------------------------------------------------------- summary
def test_summary_table_shows_key_metrics_and_where_to_look() -> None:
    rows = [summary.StageRow("base", "ran", 75.2, {"heldout_ar_loss": 4.36, "train_loss": 4.5,
                                                  "parameters": 99712.0, "steps": 30.0}),
            summary.StageRow("ic", "failed", 3.0, note="ValueError: boom"),
            summary.StageRow("lora", "not run", note="upstream failed: ic")]
    text = summary.render({"state": "FAILED", "flow_run_name": "x", "seconds": 80},
                          rows, [("MLflow", "mlflow ui --backend-store-uri sqlite:///w/m.db")])
    lines = text.splitlines()
    assert lines[0] == "idlm-full FAILED: flow run 'x' (1 ran, 1 failed, 1 not run) in 1m20s"
    assert lines[3].split() == ["base", "ran", "1m15s", "heldout_ar_loss=4.36",
                                "train_loss=4.5"]
    assert lines[4].split()[:3] == ["ic", "failed", "3.0s"] and "ValueError" in lines[4]
    assert lines[-1].strip() == "MLflow  mlflow ui --backend-store-uri sqlite:///w/m.db"


# ---------------------------------------------------------------- deployments
def test_prefect_yaml_deploys_this_flow_locally_and_on_the_gpu_pool() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"local", "cluster", "cluster-k8s"}
    accepted = set(inspect.signature(idlm_full.fn).parameters)
    for deployment in deployments.values():
        path, function = deployment["entrypoint"].split(":")
        assert (REPO / path).is_file() and function == "idlm_full"
        assert deployment.get("flow_name", FLOW_NAME) == FLOW_NAME == idlm_full.name
        assert set(deployment.get("parameters") or {}) <= accepted
    assert deployments["local"]["work_pool"]["name"] == "idlm-local"
    assert deployments["cluster"]["work_pool"]["name"] == "idlm-gpu"
    (schedule,) = deployments["cluster"]["schedules"]
    assert schedule["cron"] and schedule["active"] is False
    # Scheduled retraining: a fresh clone per run, then the last published run restored.
    clone, restore = deployments["cluster"]["pull"]
    assert clone["prefect.deployments.steps.git_clone"]["id"] == "clone"
    step = restore["prefect.deployments.steps.run_shell_script"]
    assert step["directory"] == "{{ clone.directory }}"
    assert step["script"] == "python -m idlm.orchestration.storage restore"
    assert deployments["cluster"]["parameters"]["profile"] == "qwen3-8b"


def test_the_flow_module_documents_its_command() -> None:
    doc = textwrap.dedent(sys.modules["flows.idlm_full"].__doc__)
    assert "python flows/idlm_full.py --profile tiny" in doc
