"""A training stage as a Kubeflow ``PyTorchJob`` (training-operator v1), run with kubectl.

The flow itself runs in a pod of the ``idlm-k8s`` work pool (infra/prefect) on the shared
workspace volume; a training stage with ``cluster.launch: kubernetes`` becomes one
PyTorchJob on that same volume: one Master and ``nodes - 1`` Workers, each a pod with
``gpus_per_node`` GPUs running ``torchrun`` over them. The operator sets the rendezvous
(``PET_*`` variables torchrun reads), so nothing here names a host. Secrets come by
reference (``envFrom: secretRef``), never as values.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from idlm.config.cluster import ClusterConfig

WORKSPACE = "/workspace"
WORKSPACE_CLAIM = "idlm-workspace"     # the PVC of infra/k8s
SECRET_NAME = "idlm-storage"           # S3 / database credentials, by reference
POLL_SECONDS = 15.0


def job_name(script: str, stamp: int) -> str:
    stage = re.sub(r"[^a-z0-9-]", "-", os.path.splitext(os.path.basename(script))[0].lower())
    return f"idlm-{stage}-{stamp}"


def _replica(cluster: ClusterConfig, replicas: int, script: str, args: Sequence[str]
             ) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if cluster.gpus_per_node:
        resources = {"limits": {"nvidia.com/gpu": cluster.gpus_per_node}}
    container = {
        "name": "pytorch",   # the operator finds the training container by this name
        "image": cluster.image,
        "command": ["torchrun", script, *args],
        "workingDir": WORKSPACE,
        "envFrom": [{"secretRef": {"name": SECRET_NAME}}],
        "env": [{"name": "HF_HOME", "value": f"{WORKSPACE}/.cache/huggingface"}],
        "resources": resources,
        "volumeMounts": [{"name": "workspace", "mountPath": WORKSPACE},
                         {"name": "shm", "mountPath": "/dev/shm"}],
    }
    return {"replicas": replicas, "restartPolicy": "OnFailure", "template": {"spec": {
        "containers": [container],
        "volumes": [{"name": "workspace",
                     "persistentVolumeClaim": {"claimName": WORKSPACE_CLAIM}},
                    {"name": "shm", "emptyDir": {"medium": "Memory"}}]}}}


def pytorchjob_manifest(cluster: ClusterConfig, script: str, args: Sequence[str], name: str,
                        namespace: str = "idlm") -> dict[str, Any]:
    """The PyTorchJob of one stage run: Master + ``nodes - 1`` Workers, torchrun per pod."""
    specs = {"Master": _replica(cluster, 1, script, args)}
    if cluster.nodes > 1:
        specs["Worker"] = _replica(cluster, cluster.nodes - 1, script, args)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "idlm"}},
            "spec": {"nprocPerNode": str(cluster.ranks_per_node),
                     "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None"},
                     "pytorchReplicaSpecs": specs}}


def job_state(name: str, namespace: str) -> str | None:
    """The newest condition of the job (Created, Running, Succeeded, Failed)."""
    out = subprocess.run(["kubectl", "get", "pytorchjob", name, "-n", namespace, "-o",
                          "jsonpath={.status.conditions[-1].type}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return out or None


def run_pytorchjob(cluster: ClusterConfig, script: str, args: Sequence[str],
                   namespace: str | None = None) -> int:
    """Create the job, wait for Succeeded or Failed, print the master's log at the end."""
    namespace = namespace or os.environ.get("IDLM_K8S_NAMESPACE", "idlm")
    name = job_name(script, int(time.time()))
    manifest = pytorchjob_manifest(cluster, script, args, name, namespace)
    subprocess.run(["kubectl", "create", "-f", "-"], input=json.dumps(manifest), text=True,
                   check=True)
    print(f"launch: PyTorchJob {namespace}/{name} created", flush=True)
    state = None
    while state not in ("Succeeded", "Failed"):
        time.sleep(POLL_SECONDS)
        state = job_state(name, namespace)
    subprocess.run(["kubectl", "logs", "-n", namespace, f"{name}-master-0"], check=False)
    if state == "Failed":
        print(f"launch: PyTorchJob {namespace}/{name} failed (kubectl describe pytorchjob "
              f"{name} -n {namespace})", file=sys.stderr)
        return 1
    return 0
