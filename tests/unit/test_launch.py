"""Launch by topology: the commands each launch runs, the Slurm task's torch environment,
the Kubernetes PyTorchJob, and the global batch that keeps a run the same on any world."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from idlm import config as config_mod
from idlm.cluster import kubernetes as k8s
from idlm.cluster import launch
from idlm.config.cluster import ClusterConfig
from idlm.errors import StageError
from idlm.training.common import batch_for_world

PY = "/venv/bin/python"


def test_local_one_rank_is_plain_python() -> None:
    assert launch.local_command(ClusterConfig(), "stages/ic.py", ["--config", "c.yaml"],
                                PY) == [PY, "stages/ic.py", "--config", "c.yaml"]


def test_local_gpus_use_deepspeed_cpu_ranks_use_torchrun() -> None:
    gpus = ClusterConfig(gpus_per_node=8, master_port=29600)
    assert launch.local_command(gpus, "stages/base.py", [], PY) == [
        "deepspeed", "--num_gpus", "8", "--master_port", "29600", "stages/base.py"]
    cpu = ClusterConfig(processes_per_node=2)
    assert launch.local_command(cpu, "stages/base.py", [], PY) == [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "stages/base.py"]


def test_sbatch_wraps_one_srun_task_per_rank(tmp_path: Path) -> None:
    cluster = ClusterConfig(launch="slurm", nodes=4, gpus_per_node=8, slurm={
        "partition": "gpu", "account": "ml", "time": "0-02:00:00", "extra_args": ["--exclusive"]})
    command = launch.sbatch_command(cluster, "stages/ic.py", ["--config", "p.yaml"],
                                    tmp_path / "ic-%j.log", PY)
    options = command[:command.index("--wrap")]
    for expected in ("--wait", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                     "--partition=gpu", "--account=ml", "--time=0-02:00:00", "--exclusive",
                     "--export=ALL", "--job-name=idlm-ic", f"--output={tmp_path}/ic-%j.log"):
        assert expected in options
    assert shlex.split(command[-1]) == [
        "srun", "--nodes", "4", "--ntasks-per-node", "8", "--kill-on-bad-exit=1",
        "--gpus-per-node", "8", PY, "-m", "idlm.cluster.launch", "--slurm-task",
        "stages/ic.py", "--config", "p.yaml"]


def test_slurm_task_becomes_a_torch_rank() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_JOB_ID": "1234", "KEEP": "x"}
    port = launch.job_port(env, 29500)
    torch_env = launch.slurm_task_env(env, "node01", port)
    assert (torch_env["RANK"], torch_env["WORLD_SIZE"], torch_env["LOCAL_RANK"]) == \
        ("5", "16", "1")
    assert torch_env["MASTER_ADDR"] == "node01" and torch_env["MASTER_PORT"] == "29734"
    assert torch_env["KEEP"] == "x"


def test_pytorchjob_has_master_and_workers_on_the_shared_volume() -> None:
    cluster = ClusterConfig(launch="kubernetes", nodes=3, gpus_per_node=8,
                            image="registry.example/idlm-train:1.2")
    job = k8s.pytorchjob_manifest(cluster, "stages/lora.py", [], "idlm-lora-1")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert (specs["Master"]["replicas"], specs["Worker"]["replicas"]) == (1, 2)
    assert job["spec"]["nprocPerNode"] == "8"
    pod = specs["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch" and container["image"].endswith(":1.2")
    assert container["command"] == ["torchrun", "stages/lora.py"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["envFrom"] == [{"secretRef": {"name": k8s.SECRET_NAME}}]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v]
    assert claims == [k8s.WORKSPACE_CLAIM]
    one_node = k8s.pytorchjob_manifest(ClusterConfig(launch="kubernetes"), "s.py", [], "j")
    assert "Worker" not in one_node["spec"]["pytorchReplicaSpecs"]


def test_pytorchjob_pod_is_a_valid_kubernetes_pod() -> None:
    validate = pytest.importorskip("kubernetes_validate")
    cluster = ClusterConfig(launch="kubernetes", nodes=2, gpus_per_node=8)
    job = k8s.pytorchjob_manifest(cluster, "stages/ic.py", [], "idlm-ic-1")
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "idlm-ic-1-pod"},
               "spec": {**spec["template"]["spec"], "restartPolicy": "Never"}}
        validate.validate(pod, "1.30", strict=True)


def test_global_batch_derives_grad_accum_from_the_world() -> None:
    opt = config_mod.TrainSettings(micro_batch_size=2, global_batch_size=32)
    assert batch_for_world(opt, 8).grad_accum == 2
    assert batch_for_world(opt, 16).grad_accum == 1
    plain = config_mod.TrainSettings(micro_batch_size=2, grad_accum=3)
    assert batch_for_world(plain, 4).grad_accum == 3
    with pytest.raises(StageError, match="not a multiple"):
        batch_for_world(opt, 3)


def test_cluster_section_is_checked_before_any_work() -> None:
    with pytest.raises(ValueError, match="grad_accum or global_batch_size"):
        config_mod.TrainSettings(grad_accum=2, global_batch_size=8)
    with pytest.raises(ValueError, match="launch 'local'"):
        ClusterConfig(nodes=2)
    assert ClusterConfig(launch="slurm", nodes=2, gpus_per_node=8).world_size == 16
    assert ClusterConfig(processes_per_node=2).world_size == 2


def test_launch_refuses_a_missing_script(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["stages/nope.py"]) == 2
    assert "stages/nope.py not found" in capsys.readouterr().err


def test_dvc_tracks_no_topology() -> None:
    """The training stages' command and params name no launcher, host or node count."""
    import yaml

    dag = yaml.safe_load((Path(__file__).resolve().parents[2] / "dvc.yaml").read_text())
    for name in ("base", "ic", "lora"):
        stage = dag["stages"][name]
        assert stage["cmd"] == f"python -m idlm.cluster.launch stages/{name}.py"
        assert not any(str(p).startswith("cluster") for p in stage.get("params", []))
