"""The Kubernetes control plane and a flow-run Job, rendered for real and checked offline.

`kubectl kustomize` renders infra/k8s (Prefect server and worker, the shared workspace, and
the tracking stack of infra/tracking/k8s); prefect-kubernetes' own templating renders the
Job its worker would create for the `cluster-k8s` deployment of prefect.yaml from the work
pool template infra/prefect/k8s-work-pool.json. Every object is validated against the
Kubernetes OpenAPI schema (kubernetes-validate, strict: unknown fields are errors), and the
names that tie them together (pool, claim, Secret, service accounts, paths) are checked
against each other and against the PyTorchJobs idlm.cluster.kubernetes launches. No
cluster, no mocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import uuid
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import WorkPoolCreate
from prefect.settings import PREFECT_API_URL, Settings, temporary_settings
from prefect.utilities.schema_tools import validate as validate_job_variables
from prefect_kubernetes.settings import KubernetesSettings
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration
from sqlalchemy.engine import make_url

from tests.workspace import REPO

# A schema version kubernetes-validate ships; clusters older than this are out of support.
KUBERNETES_VERSION = "1.30"
NAMESPACE = "idlm"
POOL_TEMPLATE = REPO / "infra/prefect/k8s-work-pool.json"
TRAIN_IMAGE = "ghcr.io/example/idlm-train"
SECRET_LOOKING = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
# Replaced by `cpu` and `memory` in our template (one request each, no CPU limit).
REPLACED_VARIABLES = {"cpu_request", "cpu_limit", "memory_request", "memory_limit"}


# ---------------------------------------------------------------- rendering
def kustomize(directory: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is required to render the kustomizations (kubectl kustomize)",
                    pytrace=False)
    done = subprocess.run(["kubectl", "kustomize", str(REPO / directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory}: {done.stderr.strip()}", pytrace=False)
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def validate(obj: dict[str, Any]) -> None:
    metadata = obj.get("metadata", {})
    name = metadata.get("name") or metadata.get("generateName")
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        return
    except kubernetes_validate.ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path)
        problem = f"{obj['kind']}/{name}: {error.message} (at {where})"
    pytest.fail(problem, pytrace=False)     # outside `except`: one line, not the schema


def by_kind(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def has(objects: list[dict[str, Any]], kind: str, name: str) -> bool:
    return any(o["kind"] == kind and o["metadata"]["name"] == name for o in objects)


def granted_to(objects: list[dict[str, Any]], service_account: str) -> set[tuple[str, ...]]:
    """(apiGroup, resource, verb) that the RoleBindings here give a ServiceAccount."""
    grants = set()
    for binding in [o for o in objects if o["kind"] == "RoleBinding"]:
        if {"kind": "ServiceAccount", "name": service_account,
                "namespace": NAMESPACE} not in binding["subjects"]:
            continue
        assert binding["roleRef"]["kind"] == "Role"
        role = by_kind(objects, "Role", binding["roleRef"]["name"])
        grants |= {(group, resource, verb) for rule in role["rules"]
                   for group in rule["apiGroups"] for resource in rule["resources"]
                   for verb in rule["verbs"]}
    assert not [g for g in grants if g[1] in {"secrets", "*"} or g[2] == "*"], grants
    return grants


def pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in objects
            if o["kind"] in {"Deployment", "StatefulSet", "Job"}]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def deployment_spec(name: str) -> dict[str, Any]:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (found,) = [d for d in spec["deployments"] if d["name"] == name]
    return found


@pytest.fixture(scope="module")
def control_plane() -> list[dict[str, Any]]:
    return kustomize("infra/k8s")


@pytest.fixture(scope="module")
def tracking() -> list[dict[str, Any]]:
    return kustomize("infra/tracking/k8s")


@pytest.fixture(scope="module")
def pool_template() -> dict[str, Any]:
    return json.loads(POOL_TEMPLATE.read_text())


def render_flow_run_job(template: dict[str, Any], job_variables: dict[str, Any],
                        api_url: str) -> tuple[dict[str, Any], FlowRun]:
    """What the worker does for a flow run: template + job variables, then the run's env."""
    flow_run = FlowRun(flow_id=uuid.uuid4(), deployment_id=uuid.uuid4(), name="fair-condor")
    # The worker copies its own settings into the Job; PREFECT_API_URL is the one that
    # matters (and with it set, the templating needs no Prefect server).
    with temporary_settings({PREFECT_API_URL: api_url}):
        configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
            template, job_variables))
        configuration.prepare_for_flow_run(flow_run=flow_run)
    return configuration.job_manifest, flow_run


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


# ---------------------------------------------------------------- the kustomizations
@pytest.mark.parametrize("directory", ["infra/k8s", "infra/tracking/k8s"])
def test_every_rendered_object_is_valid_kubernetes(directory: str) -> None:
    objects = kustomize(directory)
    assert objects
    for obj in objects:
        validate(obj)
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == NAMESPACE


def test_the_control_plane_holds_prefect_the_workspace_and_the_tracking_stack(
        control_plane: list[dict[str, Any]], tracking: list[dict[str, Any]]) -> None:
    names = {f"{o['kind']}/{re.sub(r'-[a-z0-9]{10}$', '', o['metadata']['name'])}"
             if o["kind"] == "ConfigMap" else f"{o['kind']}/{o['metadata']['name']}"
             for o in control_plane}
    ours = {"Deployment/prefect-server", "Service/prefect-server", "Deployment/prefect-worker",
            "PersistentVolumeClaim/idlm-workspace", "Job/idlm-workspace-init",
            "ConfigMap/idlm-workspace"}
    ours |= {f"{kind}/{name}" for kind in ("ServiceAccount", "Role", "RoleBinding")
             for name in ("prefect-worker", "idlm-run")}
    from_tracking = {f"{o['kind']}/{o['metadata']['name']}" for o in tracking}
    assert names == ours | from_tracking
    assert {"Deployment/mlflow", "StatefulSet/postgres", "StatefulSet/seaweedfs",
            "Namespace/idlm"} <= from_tracking
    claim = by_kind(control_plane, "PersistentVolumeClaim", "idlm-workspace")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]   # every GPU node mounts it


def test_no_secret_travels_in_the_manifests_only_references_to_them(
        control_plane: list[dict[str, Any]]) -> None:
    assert [o for o in control_plane if o["kind"] == "Secret"] == []
    referenced = set()
    for pod_spec in pod_specs(control_plane):
        for container in containers(pod_spec):
            for variable in container.get("env", []):
                if SECRET_LOOKING.search(variable["name"]):
                    assert "value" not in variable, variable             # never a literal
                    referenced.add(variable["valueFrom"]["secretKeyRef"]["name"])
            for source in container.get("envFrom", []):
                assert set(source) <= {"configMapRef", "secretRef"}, source
            assert "password" not in " ".join(container.get("args", [])).lower()
    assert referenced == {"idlm-storage"}                   # the Secret the README creates


def test_the_prefect_server_keeps_its_database_on_the_tracking_postgres(
        control_plane: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    pod_spec = by_kind(control_plane, "Deployment", "prefect-server")["spec"]["template"]["spec"]
    (create_database,) = pod_spec["initContainers"]
    (server,) = pod_spec["containers"]
    env = container_env(server)
    postgres = by_kind(control_plane, "StatefulSet", "postgres")["spec"]["template"]["spec"]
    postgres_env = container_env(postgres["containers"][0])
    assert env["PREFECT_SERVER_DATABASE_HOST"] == "postgres"
    assert has(control_plane, "Service", "postgres")
    assert env["PREFECT_SERVER_DATABASE_USER"] == postgres_env["POSTGRES_USER"] == "idlm"
    assert env["PREFECT_SERVER_DATABASE_PASSWORD"] == postgres_env["POSTGRES_PASSWORD"]
    # Not MLflow's database: both keep an `alembic_version` table. The init container
    # creates the one the server is told to use.
    assert env["PREFECT_SERVER_DATABASE_NAME"] == "prefect" != postgres_env["POSTGRES_DB"]
    assert "CREATE DATABASE prefect" in create_database["args"][0]
    # The variable names are Prefect's own settings: with a password full of URL syntax
    # planted where the Secret goes, Prefect assembles the URL the server will use.
    for name in [n for n in os.environ if n.startswith("PREFECT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, "p@ss/w:rd" if isinstance(value, dict) else value)
    url = make_url(Settings().server.database.connection_url.get_secret_value())
    assert (url.drivername, url.username, url.password, url.host, url.port, url.database) == (
        "postgresql+asyncpg", "idlm", "p@ss/w:rd", "postgres", 5432, "prefect")


def test_the_worker_polls_the_k8s_pool_and_may_only_run_jobs_here(
        control_plane: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    pod_spec = by_kind(control_plane, "Deployment", "prefect-worker")["spec"]["template"]["spec"]
    (worker,) = pod_spec["containers"]
    args = worker["args"]
    pool = deployment_spec("cluster-k8s")["work_pool"]["name"]
    assert args[:3] == ["prefect", "worker", "start"]
    assert args[args.index("--pool") + 1] == pool == "idlm-k8s"
    assert args[args.index("--type") + 1] == "kubernetes"
    env = container_env(worker)
    (port,) = by_kind(control_plane, "Service", "prefect-server")["spec"]["ports"]
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{port['port']}/api"
    # The observer watches this namespace only, so a namespaced Role is enough.
    monkeypatch.setenv("PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
                       env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"])
    assert KubernetesSettings().observer.namespaces == {NAMESPACE}
    needed = {("batch", "jobs", verb) for verb in ("create", "get", "watch", "delete")}
    needed |= {("", "pods", verb) for verb in ("get", "list", "watch")}
    needed |= {("", "pods/log", "get"), ("", "events", "list"), ("", "events", "watch")}
    assert needed <= granted_to(control_plane, pod_spec["serviceAccountName"])


# ---------------------------------------------------------------- the work pool
def test_the_pool_template_extends_prefect_kubernetes_default(
        pool_template: dict[str, Any]) -> None:
    WorkPoolCreate(name="idlm-k8s", type="kubernetes", base_job_template=pool_template)
    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["job_configuration"]) == set(pool_template["job_configuration"])
    ours = pool_template["variables"]["properties"]
    kept = set(default["variables"]["properties"]) - REPLACED_VARIABLES
    assert kept <= set(ours) and not REPLACED_VARIABLES & set(ours)
    assert {"gpus", "cpu", "memory", "workspace_claim", "hf_cache", "secret_name",
            "node_selector", "tolerations"} <= set(ours)
    readme = (REPO / "infra/k8s/README.md").read_text()
    assert ("prefect work-pool create idlm-k8s --type kubernetes "
            "--base-job-template infra/prefect/k8s-work-pool.json") in readme


def test_the_k8s_deployment_runs_this_flow_with_variables_the_pool_knows(
        pool_template: dict[str, Any]) -> None:
    from flows.idlm_full import idlm_full

    deployment = deployment_spec("cluster-k8s")
    path, function = deployment["entrypoint"].split(":")
    assert (REPO / path).is_file() and function == "idlm_full" == idlm_full.fn.__name__
    job_variables = deployment["work_pool"]["job_variables"]
    schema = pool_template["variables"]
    # Unknown keys pass Prefect's schema (no additionalProperties) and then do nothing.
    assert set(job_variables) <= set(schema["properties"])
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    # As the server checks a flow run's variables before it is scheduled.
    validate_job_variables({**defaults, **job_variables}, schema, raise_on_error=True,
                           preprocess=True, ignore_required=False,
                           allow_none_with_default=True)


def test_a_flow_run_job_carries_the_gpus_the_workspace_and_secrets_by_name(
        pool_template: dict[str, Any], control_plane: list[dict[str, Any]]) -> None:
    job_variables = deployment_spec("cluster-k8s")["work_pool"]["job_variables"]
    worker = by_kind(control_plane, "Deployment", "prefect-worker")
    api_url = container_env(worker["spec"]["template"]["spec"]["containers"][0])[
        "PREFECT_API_URL"]
    job, flow_run = render_flow_run_job(pool_template, job_variables, api_url)
    pod = job["spec"]["template"]["spec"]
    # prefect-kubernetes insists on these two on the pod spec (its manifest check rejects
    # a Job without them); they are Job fields, which the API server drops there.
    assert (pod.pop("completions"), pod.pop("parallelism")) == (1, 1)
    validate(job)
    assert job["metadata"]["namespace"] == NAMESPACE
    assert job["metadata"]["labels"]["prefect.io/flow-run-id"] == str(flow_run.id)
    (container,) = pod["containers"]
    assert container["image"] == job_variables["image"]
    assert container["image"].rsplit(":", 1)[0] == TRAIN_IMAGE
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"] == {
        "requests": {"cpu": job_variables["cpu"], "memory": job_variables["memory"]},
        "limits": {"memory": job_variables["memory"], "nvidia.com/gpu": job_variables["gpus"]}}
    assert job_variables["gpus"] == 8
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"]
    # The shared volume: the claim infra/k8s creates, at /workspace, HF_HOME on it.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim = volumes[mounts["/workspace"]]["persistentVolumeClaim"]["claimName"]
    assert claim == job_variables["workspace_claim"]
    assert has(control_plane, "PersistentVolumeClaim", claim)
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory",
                                                       "sizeLimit": job_variables["shm_size"]}
    env = container_env(container)
    (seeded,) = [o["data"] for o in control_plane if o["kind"] == "ConfigMap"]
    assert env["HF_HOME"] == seeded["HF_HOME"] == "/workspace/.cache/huggingface"
    # The checkout is the volume's root: the image installs idlm editable from /workspace.
    assert deployment_spec("cluster-k8s")["pull"][0][
        "prefect.deployments.steps.set_working_directory"]["directory"] == seeded[
        "IDLM_CHECKOUT"] == "/workspace"
    # Prefect's own variables: which run to execute, and where to report.
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    assert env["PREFECT_API_URL"] == api_url
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert has(control_plane, "Service", "mlflow")
    # Secrets by reference only: one Secret as environment, no secret-looking literal.
    assert container["envFrom"] == [{"secretRef": {"name": job_variables["secret_name"]}}]
    assert job_variables["secret_name"] == "idlm-storage"
    assert not [name for name in env if SECRET_LOOKING.search(name)]
    # The image runs as UID 1000; the seeding Job wrote the volume with the same group.
    seeding = by_kind(control_plane, "Job", "idlm-workspace-init")["spec"]["template"]["spec"]
    assert pod["securityContext"] == seeding["securityContext"]
    assert pod["securityContext"]["fsGroup"] == 1000
    # The flow may start a stage as a PyTorchJob (idlm.cluster.kubernetes) from this pod.
    assert pod["serviceAccountName"] == "idlm-run"
    needed = {("kubeflow.org", "pytorchjobs", verb) for verb in ("create", "get")}
    assert needed | {("", "pods/log", "get")} <= granted_to(control_plane, "idlm-run")


def test_the_flow_run_pod_and_the_stage_jobs_it_launches_share_volume_and_secret(
        pool_template: dict[str, Any]) -> None:
    from idlm.cluster import kubernetes as launcher

    job_variables = deployment_spec("cluster-k8s")["work_pool"]["job_variables"]
    variables = {k: v.get("default") for k, v in pool_template["variables"]["properties"].items()}
    variables |= job_variables
    assert launcher.WORKSPACE == "/workspace"
    assert launcher.WORKSPACE_CLAIM == variables["workspace_claim"]
    assert launcher.SECRET_NAME == variables["secret_name"]
    assert variables["namespace"] == NAMESPACE
    stage_job = launcher.pytorchjob_manifest(launcher.ClusterConfig(), "stages/base.py", [],
                                             "idlm-base-1")
    (stage,) = stage_job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"]
    assert container_env(stage)["HF_HOME"] == variables["hf_cache"]
    assert stage["image"] == variables["image"]                  # one training image


def test_a_cpu_run_of_the_same_template_is_valid_too(pool_template: dict[str, Any]) -> None:
    job, _ = render_flow_run_job(
        pool_template, {"gpus": 0, "node_selector": {}, "tolerations": []},
        "http://prefect-server:4200/api")
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("completions"), pod.pop("parallelism")) == (1, 1)
    validate(job)
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0
    assert pod["containers"][0]["image"] == f"{TRAIN_IMAGE}:latest"   # the pool's default
