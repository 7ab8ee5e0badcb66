"""The ``cluster`` section: where the training stages run (read by ``idlm.cluster``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from idlm.config.sections import Section


class SlurmSettings(Section):
    """``sbatch`` options of a training stage's job (``cluster.launch: slurm``)."""

    partition: str | None = None
    account: str | None = None
    # Slurm's D-HH:MM:SS. Quote an HH:MM:SS value: YAML reads 24:00:00 as a number.
    time: Annotated[str, Field(min_length=1)] = "1-00:00:00"
    # Any further sbatch options, e.g. ["--exclusive", "--qos=high"].
    extra_args: list[str] = []


class ClusterConfig(Section):
    """Where the training stages run and how they start (``idlm.cluster.launch``).

    No stage tracks these keys: moving a run from one node to two, or from DeepSpeed's
    launcher to Slurm, reruns nothing. What changes results is tracked in ``*.train``
    (``global_batch_size``, ``micro_batch_size``).
    """

    # local: this machine (one process, or torchrun / deepspeed when it has several);
    # slurm: sbatch --wait, one task per rank; kubernetes: a Kubeflow PyTorchJob.
    launch: Literal["local", "slurm", "kubernetes"] = "local"
    nodes: Annotated[int, Field(ge=1)] = 1
    gpus_per_node: Annotated[int, Field(ge=0)] = 0   # 0: CPU ranks over gloo
    # Ranks per node; null: one per GPU (one on a CPU node).
    processes_per_node: Annotated[int, Field(ge=1)] | None = None
    gpu_memory_gib: Annotated[float, Field(gt=0)] = 80.0
    master_port: Annotated[int, Field(ge=1024, le=65535)] = 29500
    slurm: SlurmSettings = SlurmSettings()
    # The training image of a Kubernetes PyTorchJob (infra/docker/train.Dockerfile).
    image: Annotated[str, Field(min_length=1)] = "ghcr.io/example/idlm-train:latest"

    @model_validator(mode="after")
    def _local_is_one_node(self) -> ClusterConfig:
        if self.launch == "local" and self.nodes > 1:
            raise ValueError(f"cluster.nodes {self.nodes} with launch 'local': a local launch "
                             "is this node only; use launch 'slurm' or 'kubernetes'")
        return self

    @property
    def ranks_per_node(self) -> int:
        if self.processes_per_node is not None:
            return self.processes_per_node
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node
