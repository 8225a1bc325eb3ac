"""The cluster path's files, checked offline: ray_cluster.yaml with Ray's own config validation, Kubernetes
objects with kubernetes-validate's strict schemas, KubeRay objects with our CRD-derived schema (pod templates
inside them with Kubernetes' PodTemplateSpec), and the job entrypoints with each job's own config loader.
"""

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import mlflow
import pytest
import ray
import yaml
from kubernetes_validate.utils import schema_contents
from ray.autoscaler._private.util import prepare_config, validate_config
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parent.parent
K8S_DIR = REPO / "infra" / "k8s"
# Validated against the oldest minor version EKS still supports in standard support at the time of writing.
KUBERNETES_VERSION = "1.33"
IMAGE_REPO_ROOT = "/home/ray/clip-ray"  # where infra/docker/Dockerfile puts the repository
MLFLOW_CLIENT_ENV = {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
SECRET_LIKE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((f"{path.name}:{document['kind']}/{document['metadata']['name']}", document))
    return found


def by_kind(kind: str) -> list[dict]:
    return [document for _, document in manifests() if document["kind"] == kind]


def kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    """A validator for one KubeRay kind: its $defs entry, so errors point at the field rather than at the
    schema's top-level oneOf over the three kinds."""
    schema = json.loads((K8S_DIR / "schema" / "kuberay-v1.json").read_text())
    definitions = schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict/_definitions.json", KUBERNETES_VERSION
    )
    registry = Registry().with_resources(
        [
            ("https://kubernetes.io/api/_definitions.json", Resource.from_contents(definitions)),
            (schema["$id"], Resource.from_contents(schema)),
        ]
    )
    if kind not in schema["$defs"]:
        raise AssertionError(f"kind {kind} is not in the KubeRay schema")
    return jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry)


def schema_errors(document: dict) -> list[str]:
    errors = kuberay_validator(document["kind"]).iter_errors(document)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors]


# ---------------------------------------------------------------------------------------------------------
# ray_cluster.yaml


def load_cluster_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_ray_cluster_config_passes_rays_own_validation() -> None:
    config = prepare_config(load_cluster_config())  # Ray's defaults for AWS merged in, as `ray up` does
    validate_config(config)

    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # drivers only on the head
    gpu_types = [n for n in node_types.values() if n["resources"].get("GPU")]
    cpu_types = [
        n for n in node_types.values() if n["resources"].get("CPU") and not n["resources"].get("GPU")
    ]
    assert [n["node_config"]["InstanceType"] for n in gpu_types] == ["p4d.24xlarge"]
    assert gpu_types[0]["resources"]["GPU"] == 8
    assert cpu_types, "a CPU worker type for ingest and evaluation preprocessing"
    assert config["docker"]["image"].endswith(":0.1.0")
    # The project is installed from the synced working copy on every node.
    assert config["file_mounts"] == {IMAGE_REPO_ROOT: "."}
    assert any(
        IMAGE_REPO_ROOT in command and "pip install" in command for command in config["setup_commands"]
    )


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["available_node_types"]["gpu_worker"].update(node_confg={"InstanceType": "p5.48xlarge"}),
        lambda c: c["docker"].update(imagee="rayproject/ray:2.60.0-py311-gpu"),
        lambda c: c.update(head_node_type="no_such_type"),
    ],
    ids=["misspelt-node-config", "misspelt-docker-key", "unknown-head-type"],
)
def test_ray_cluster_validation_rejects_broken_configs(break_it) -> None:
    config = load_cluster_config()
    break_it(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(copy.deepcopy(config)))


# ---------------------------------------------------------------------------------------------------------
# Kubernetes manifests


def test_core_kubernetes_objects_validate_strictly() -> None:
    core = [(name, doc) for name, doc in manifests() if not doc["apiVersion"].startswith("ray.io/")]
    expected = {"Namespace", "ServiceAccount", "Deployment", "StatefulSet", "Service"}
    assert {doc["kind"] for _, doc in core} >= expected
    for name, document in core:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")


def test_kuberay_objects_validate_against_the_crd_schema() -> None:
    kuberay = [(name, doc) for name, doc in manifests() if doc["apiVersion"].startswith("ray.io/")]
    assert sorted(doc["kind"] for _, doc in kuberay) == ["RayCluster", "RayCronJob", "RayJob", "RayJob"]
    for name, document in kuberay:
        assert schema_errors(document) == [], name


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplica=8), "maxReplica"),
        (lambda d: d["spec"].update(submissionMode="BatchMode"), "BatchMode"),
        (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            imagee="x"), "imagee"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
            "resources"]["limits"].update({"cpu": {"cores": 90}}), "cores"),
    ],
    ids=["kuberay-field-typo", "kuberay-enum", "pod-template-typo", "pod-template-type"],
)  # fmt: skip
def test_kuberay_schema_rejects_broken_manifests(break_it, expected: str) -> None:
    train_job = next(d for d in by_kind("RayJob") if d["metadata"]["name"] == "vit-b-32-laion400m")
    broken = copy.deepcopy(train_job)
    break_it(broken)
    errors = schema_errors(broken)
    assert errors and expected in " ".join(errors)


def test_ray_versions_and_images_match_the_pinned_ray() -> None:
    dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", dockerfile, re.MULTILINE).group(1)
    assert base == f"{ray.__version__}-py311-gpu"
    mlflow_image = (REPO / "infra" / "docker" / "mlflow.Dockerfile").read_text()
    assert f"ghcr.io/mlflow/mlflow:v{mlflow.__version__}" in mlflow_image
    for spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray.__version__


def ray_cluster_specs() -> list[dict]:
    specs = [d["spec"] for d in by_kind("RayCluster")]
    specs += [d["spec"]["rayClusterSpec"] for d in by_kind("RayJob")]
    return specs


def containers(document: dict) -> list[dict]:
    """Every container spec anywhere in the document (pod templates nest differently per kind)."""
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(document)
    return found


def test_secrets_are_referenced_never_inlined() -> None:
    assert not by_kind("Secret"), "Secrets are created with kubectl (docs/runbook.md), never committed"
    for name, document in manifests():
        for container in containers(document):
            for env in container.get("env", []):
                if SECRET_LIKE.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} is inlined"
                # A URI may carry a password only through a $(VAR) that itself comes from a Secret.
                if "value" in env and "@" in env["value"]:
                    assert re.search(r":\$\([A-Z_]+\)@", env["value"]), (
                        f"{name}: {env['name']} embeds a password"
                    )


def test_mlflow_server_has_postgres_s3_and_basic_auth() -> None:
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in server["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert "--app-name basic-auth" in " ".join(server["args"])
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "clip-ray-mlflow"
    # Every Ray pod talks to this server, with credentials from a Secret.
    for spec in ray_cluster_specs():
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                names = {e["name"] for e in container["env"]}
                assert names >= MLFLOW_CLIENT_ENV


# ---------------------------------------------------------------------------------------------------------
# Entrypoints: each one parses and validates with the job's own config loader


def entrypoint_argv(document: dict) -> tuple[str, list[str]]:
    spec = document["spec"].get("jobTemplate", document["spec"])
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["python", "-m"], spec["entrypoint"]
    argv = [w.replace(IMAGE_REPO_ROOT, str(REPO)) for w in words[3:]]
    return words[2], argv


def test_job_entrypoints_validate_with_the_jobs_config_loaders() -> None:
    from pipelines.ingest.config import load_config as load_ingest_config
    from pipelines.scheduled_eval.config import build_arg_parser as scheduled_eval_parser
    from pipelines.train.config import load_config as load_train_config

    modules = {}
    for document in by_kind("RayJob") + by_kind("RayCronJob"):
        module, argv = entrypoint_argv(document)
        modules[module] = argv
    assert sorted(modules) == ["pipelines.ingest", "pipelines.scheduled_eval", "pipelines.train"]

    ingest = load_ingest_config(modules["pipelines.ingest"])
    assert ingest.output.startswith("s3://") and ingest.samples_per_shard == 10_000

    train = load_train_config(modules["pipelines.train"])
    assert (train.model, train.batch_size, train.use_gpu) == ("ViT-B-32", 32768, True)
    gpus = sum(
        group["replicas"]
        * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for document in by_kind("RayJob")
        if document["metadata"]["name"] == "vit-b-32-laion400m"
        for group in document["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert gpus == train.workers  # one Ray Train worker per GPU the job's cluster has
    assert train.batch_size // (train.workers * train.accum_steps) == 256  # OpenCLIP's per-GPU batch
    cpus = sum(
        group["replicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        for document in by_kind("RayJob")
        if document["metadata"]["name"] == "vit-b-32-laion400m"
        for group in document["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert train.workers * train.cpus_per_worker <= cpus  # the workers' CPU reservations fit the pods
    assert train.steps * train.batch_size >= 32 * 400_000_000  # 32 epochs of LAION-400M

    scheduled = scheduled_eval_parser().parse_args(modules["pipelines.scheduled_eval"])
    assert scheduled.config.startswith("s3://")
