"""The cluster path's files, checked offline: ray_cluster.yaml with Ray's own config validation, Kubernetes
objects with kubernetes-validate's strict schemas, KubeRay objects with our CRD-derived schema (pod templates
inside them with Kubernetes' PodTemplateSpec), and the job entrypoints with each job's own config loader.
"""

import copy
import json
import re
import shlex

import jsonschema
import kubernetes_validate
import mlflow
import pytest
import ray
import yaml
from kubernetes_validate.utils import schema_contents
from ray.autoscaler._private.util import prepare_config, validate_config
from referencing import Registry, Resource

from tests.paths import REPO

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
    from pipelines.ingest.config import IngestConfig
    from pipelines.scheduled_eval.config import build_arg_parser as scheduled_eval_parser
    from pipelines.train.config import TrainConfig

    modules = {}
    for document in by_kind("RayJob") + by_kind("RayCronJob"):
        module, argv = entrypoint_argv(document)
        modules[module] = argv
    assert sorted(modules) == ["pipelines.ingest", "pipelines.scheduled_eval", "pipelines.train"]

    ingest = IngestConfig.load(modules["pipelines.ingest"])
    assert ingest.output.startswith("s3://") and ingest.samples_per_shard == 10_000

    train = TrainConfig.load(modules["pipelines.train"])
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


# ---------------------------------------------------------------------------------------------------------
# Authentication: Ray token auth everywhere Ray runs or is talked to

RAY_TOKEN_SECRET = {"name": "clip-ray-ray-token", "key": "auth_token"}  # the key KubeRay's authOptions read
# KubeRay binds the head's dashboard to every interface unless told otherwise.
KUBERAY_DEFAULT_DASHBOARD_HOST = "0.0.0.0"


def kuberay_cluster_specs(document: dict) -> list[dict]:
    if document.get("kind") == "RayCluster":
        return [document["spec"]]
    if document.get("kind") == "RayJob" and "rayClusterSpec" in document["spec"]:
        return [document["spec"]["rayClusterSpec"]]
    return []


def ray_auth_env_problems(where: str, env: list[dict]) -> list[str]:
    by_name = {e["name"]: e for e in env}
    problems = []
    if by_name.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not token")
    token = by_name.get("RAY_AUTH_TOKEN", {})
    if token.get("valueFrom", {}).get("secretKeyRef") != RAY_TOKEN_SECRET or "value" in token:
        problems.append(f"{where}: RAY_AUTH_TOKEN does not come from the Secret {RAY_TOKEN_SECRET['name']}")
    return problems


def token_auth_problems(name: str, document: dict) -> list[str]:
    """Why a KubeRay object would serve Ray without token authentication: every container in it (heads,
    workers, job submitters), the in-tree autoscaler and the operator (authOptions) must use the token."""
    if not document["apiVersion"].startswith("ray.io/"):
        return []
    problems = []
    for container in containers(document):
        problems += ray_auth_env_problems(f"{name} {container['name']}", container.get("env", []))
    for spec in kuberay_cluster_specs(document):
        auth = spec.get("authOptions", {})
        if auth.get("mode") != "token" or auth.get("secretName") != RAY_TOKEN_SECRET["name"]:
            problems.append(f"{name}: authOptions is not token with the Secret {RAY_TOKEN_SECRET['name']}")
        if spec.get("enableInTreeAutoscaling"):
            env = spec.get("autoscalerOptions", {}).get("env", [])
            problems += ray_auth_env_problems(f"{name} autoscaler", env)
    return problems


def launcher_token_problems(config: dict) -> list[str]:
    """The same for ray_cluster.yaml: every node's container gets RAY_AUTH_MODE=token and a token file that
    initialization_commands fetch from SSM; a dashboard on 0.0.0.0 needs that."""
    run_options = " ".join(config["docker"].get("run_options", []))
    problems = []
    if "--env RAY_AUTH_MODE=token" not in run_options:
        problems.append("ray_cluster.yaml: the containers do not get RAY_AUTH_MODE=token")
    path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", run_options)
    mount = re.search(r"-v (\S+):(\S+):ro", run_options)
    if not path or not mount or mount.group(2) != path.group(1):
        problems.append("ray_cluster.yaml: RAY_AUTH_TOKEN_PATH is not a read-only mounted file")
    elif not any(
        "ssm get-parameter" in c and c.rstrip(")").endswith(f"> {mount.group(1)}")
        for c in config.get("initialization_commands", [])
    ):
        problems.append(f"ray_cluster.yaml: no initialization command fetches {mount.group(1)} from SSM")
    return problems


def open_dashboards(name: str, document: dict) -> list[str]:
    """KubeRay heads whose dashboard listens on every interface (the default) without token auth."""
    found = []
    for spec in kuberay_cluster_specs(document):
        head = spec["headGroupSpec"]
        host = head.get("rayStartParams", {}).get("dashboard-host", KUBERAY_DEFAULT_DASHBOARD_HOST)
        env = head["template"]["spec"]["containers"][0].get("env", [])
        if host == "0.0.0.0" and (
            ray_auth_env_problems(name, env) or spec.get("authOptions", {}).get("mode") != "token"
        ):
            found.append(f"{name}: the dashboard listens on {host} without token authentication")
    return found


def launcher_open_dashboards(config: dict) -> list[str]:
    commands = " ".join(config.get("head_start_ray_commands", []))
    if "--dashboard-host=0.0.0.0" in commands and launcher_token_problems(config):
        return ["ray_cluster.yaml: the dashboard listens on 0.0.0.0 without token authentication"]
    return []


def test_every_ray_container_autoscaler_and_submitter_uses_the_token_from_the_secret() -> None:
    documents = [(name, d) for name, d in manifests() if d["apiVersion"].startswith("ray.io/")]
    checked = sum(len(containers(d)) for _, d in documents)
    assert checked >= 10  # heads, worker groups and submitters of the four KubeRay objects
    assert [p for name, d in documents for p in token_auth_problems(name, d)] == []
    assert launcher_token_problems(load_cluster_config()) == []


def test_no_dashboard_listens_on_every_interface_without_token_auth() -> None:
    assert [p for name, d in manifests() for p in open_dashboards(name, d)] == []
    assert launcher_open_dashboards(load_cluster_config()) == []


def _train_job() -> dict:
    return copy.deepcopy(next(d for d in by_kind("RayJob") if d["metadata"]["name"] == "vit-b-32-laion400m"))


def _env_of(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"][0]["env"]


def _head_env(job: dict) -> list[dict]:
    return _env_of(job["spec"]["rayClusterSpec"]["headGroupSpec"])


def _worker_env(job: dict) -> list[dict]:
    return _env_of(job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0])


def _drop(env: list[dict], *names: str) -> None:
    env[:] = [e for e in env if e["name"] not in names]


def _inline(env: list[dict], name: str, value: str) -> None:
    _drop(env, name)
    env.append({"name": name, "value": value})


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda d: _drop(_worker_env(d), "RAY_AUTH_MODE"), "ray-worker: RAY_AUTH_MODE is not token"),
        (lambda d: _inline(_head_env(d), "RAY_AUTH_MODE", "disabled"), "ray-head: RAY_AUTH_MODE is not token"),
        (lambda d: _inline(_head_env(d), "RAY_AUTH_TOKEN", "0123456789abcdef"),
         "ray-head: RAY_AUTH_TOKEN does not come from the Secret"),
        (lambda d: _drop(d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"], "RAY_AUTH_TOKEN"),
         "ray-job-submitter: RAY_AUTH_TOKEN does not come from the Secret"),
        (lambda d: d["spec"]["rayClusterSpec"].pop("authOptions"), "authOptions is not token"),
        (lambda d: d["spec"]["rayClusterSpec"].update(authOptions={"mode": "token"}), "authOptions is not token"),
        (lambda d: d["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=True), "autoscaler: RAY_AUTH_MODE"),
    ],
    ids=["worker-without-mode", "head-mode-disabled", "token-inlined", "submitter-without-token",
         "operator-without-auth-options", "operator-with-its-own-secret", "autoscaler-without-token"],
)  # fmt: skip
def test_token_auth_check_catches_a_container_left_open(break_it, expected: str) -> None:
    broken = _train_job()
    break_it(broken)
    assert expected in " | ".join(token_auth_problems("rayjob-train.yaml", broken))


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["spec"]["rayClusterSpec"].pop("authOptions"),
        lambda d: _drop(_head_env(d), "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"),
    ],
    ids=["no-auth-options", "head-without-token"],
)  # fmt: skip
def test_open_dashboard_check_flags_the_default_host_without_token(break_it) -> None:
    broken = _train_job()
    assert "dashboard-host" not in broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    break_it(broken)
    assert open_dashboards("rayjob-train.yaml", broken) == [
        "rayjob-train.yaml: the dashboard listens on 0.0.0.0 without token authentication"
    ]


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["docker"].update(run_options=[o for o in c["docker"]["run_options"] if "AUTH_MODE" not in o]),
        lambda c: c["docker"].update(run_options=[o for o in c["docker"]["run_options"] if not o.startswith("-v ")]),
        lambda c: c.update(initialization_commands=[i for i in c["initialization_commands"] if "ray-auth" not in i]),
    ],
    ids=["no-auth-mode", "token-file-not-mounted", "token-never-fetched"],
)  # fmt: skip
def test_launcher_token_check_catches_an_unauthenticated_cluster(break_it) -> None:
    config = load_cluster_config()
    break_it(config)
    assert launcher_token_problems(config)
    assert launcher_open_dashboards(config) == [
        "ray_cluster.yaml: the dashboard listens on 0.0.0.0 without token authentication"
    ]


# ---------------------------------------------------------------------------------------------------------
# NetworkPolicies: who may reach the Ray dashboard / job API, the GCS, MLflow and PostgreSQL.
# Pods are modelled from the manifests with the labels KubeRay adds; policies are evaluated with Kubernetes'
# semantics (a pod no policy selects is open; a selected one admits only what some rule of them allows).

NAMESPACE = "clip-ray"
KUBERAY_DEFAULT_HEAD_PORTS = {"client": 10001, "gcs-server": 6379, "dashboard": 8265, "serve": 8000}
METRICS_PORT = 8080  # KubeRay adds it to every head Service
RAY_NODE_PORTS = [52365, 8076, 10002]  # dashboard agent, object manager, a worker port: every node listens


def pod(
    name: str, labels: dict, ports: dict[str, int] | None = None, namespace: str | None = NAMESPACE
) -> dict:
    return {"name": name, "namespace": namespace, "labels": labels, "ports": ports or {}}


# Installed by Helm into `default` unless told otherwise (the manifests mark that namespace CHANGE).
OPERATOR = pod("the KubeRay operator", {"app.kubernetes.io/name": "kuberay-operator"}, namespace="default")


def template_labels(template: dict) -> dict:
    return dict(template.get("metadata", {}).get("labels", {}))


def container_ports(template: dict) -> dict[str, int]:
    return {
        p.get("name", str(p["containerPort"])): p["containerPort"]
        for c in template["spec"]["containers"]
        for p in c.get("ports", [])
    }


def ray_clusters(documents: list[dict]) -> list[dict]:
    """Each Ray cluster: its head and worker pods and the pods that submit jobs to it."""
    clusters = []
    for document in documents:
        for spec in kuberay_cluster_specs(document):
            name = document["metadata"]["name"]
            kuberay = {"ray.io/cluster": name} if document["kind"] == "RayCluster" else {}
            head_template = spec["headGroupSpec"]["template"]
            ports = container_ports(head_template) or dict(KUBERAY_DEFAULT_HEAD_PORTS)
            head = pod(f"{name} head", template_labels(head_template) | kuberay | {"ray.io/node-type": "head"},
                       ports | {"metrics": METRICS_PORT})  # fmt: skip
            workers = [
                pod(f"{name} {g['groupName']} worker",
                    template_labels(g["template"]) | kuberay | {"ray.io/node-type": "worker"})
                for g in spec.get("workerGroupSpecs", [])
            ]  # fmt: skip
            clusters.append({"name": name, "head": head, "workers": workers, "submitters": []})
    by_selector = {c["name"]: c for c in clusters}
    for document in documents:
        if document["kind"] not in ("RayJob", "RayCronJob"):
            continue
        spec = document["spec"].get("jobTemplate", document["spec"])
        target = spec.get("clusterSelector", {}).get("ray.io/cluster", document["metadata"]["name"])
        template = spec.get("submitterPodTemplate", {})
        by_selector[target]["submitters"].append(
            pod(f"{document['metadata']['name']} submitter", template_labels(template))
        )
    return clusters


def workload_pods(documents: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["name"]: pod(d["metadata"]["name"], template_labels(d["spec"]["template"]),
                                   container_ports(d["spec"]["template"]))
        for d in documents
        if d["kind"] in ("Deployment", "StatefulSet")
    }  # fmt: skip


def selects(selector: dict, labels: dict) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def peer_matches(peer: dict, source: dict, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return True  # an address range: any pod or outside client may be behind it
    if source["namespace"] is None:
        return False  # outside the cluster: only an ipBlock admits it
    namespace_labels = {"kubernetes.io/metadata.name": source["namespace"]}
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], namespace_labels)
    else:
        in_namespace = source["namespace"] == policy_namespace
    return in_namespace and selects(peer.get("podSelector", {}), source["labels"])


def port_matches(rule_ports: list[dict] | None, port: int, target: dict) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        number = entry.get("port")
        if isinstance(number, str):
            number = target["ports"].get(number)
        if number is None or number <= port <= entry.get("endPort", number):
            return True
    return False


def admitted(policies: list[dict], source: dict, target: dict, port: int) -> bool:
    selecting = [
        p for p in policies
        if p["metadata"]["namespace"] == target["namespace"]
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], target["labels"])
    ]  # fmt: skip
    if not selecting:
        return True
    return any(
        port_matches(rule.get("ports"), port, target)
        and (not rule.get("from") or any(peer_matches(peer, source, p["metadata"]["namespace"])
                                          for peer in rule["from"]))
        for p in selecting
        for rule in p["spec"].get("ingress", [])
    )  # fmt: skip


def network_problems(documents: list[dict]) -> list[str]:
    """What the policies get wrong: a protected port that a stranger (a pod of this namespace without our
    labels, a pod of another namespace, a client outside the cluster) can reach, or a path the system needs
    that they block."""
    policies = [d for d in documents if d["kind"] == "NetworkPolicy"]
    clusters = ray_clusters(documents)
    workloads = workload_pods(documents)
    strangers = [
        pod("a pod without labels", {}),
        pod("a pod of another namespace", {"app": "web"}, namespace="default"),
        pod("a pod labelled like ours in another namespace", {"clip-ray.io/mlflow-client": "true"}, namespace="dev"),
        pod("a client outside the cluster", {}, namespace=None),
    ]  # fmt: skip
    protected: list[tuple[dict, int]] = []  # every Service port of the stateful services and Ray heads
    for service in (d for d in documents if d["kind"] == "Service"):
        target = next(w for w in workloads.values() if selects({"matchLabels": service["spec"]["selector"]},
                                                                   w["labels"]))  # fmt: skip
        for port in service["spec"]["ports"]:
            number = port.get("targetPort", port["port"])
            protected.append((target, target["ports"][number] if isinstance(number, str) else number))
    for cluster in clusters:
        protected += [(cluster["head"], port) for port in cluster["head"]["ports"].values()]
        protected += [(node, port) for node in cluster["workers"] for port in RAY_NODE_PORTS]

    needed: list[tuple[dict, dict, int]] = []  # (source, target, port) that must stay open
    forbidden: list[tuple[dict, dict, int]] = [(s, t, p) for t, p in protected for s in strangers]
    mlflow_server, postgres = workloads["mlflow"], workloads["postgres"]
    for cluster in clusters:
        head, nodes = cluster["head"], [cluster["head"], *cluster["workers"]]
        needed += [(a, b, port) for a in nodes for b in nodes for port in [6379, 8265, *RAY_NODE_PORTS]]
        needed += [(s, head, 8265) for s in cluster["submitters"]] + [(OPERATOR, head, 8265)]
        needed += [(node, mlflow_server, 5000) for node in nodes]
        forbidden += [(s, head, 6379) for s in cluster["submitters"]] + [(OPERATOR, head, 6379)]
        forbidden += [(s, mlflow_server, 5000) for s in cluster["submitters"]]
        for other in clusters:
            if other is not cluster:
                forbidden += [(node, other["head"], port) for node in nodes for port in (6379, 8265)]
                forbidden += [(s, other["head"], 8265) for s in cluster["submitters"]]
    needed.append((mlflow_server, postgres, 5432))
    forbidden += [(node, postgres, 5432) for c in clusters for node in [c["head"], *c["workers"]]]

    problems = [
        f"{s['name']} cannot reach {t['name']}:{p}" for s, t, p in needed if not admitted(policies, s, t, p)
    ]
    problems += [
        f"{s['name']} reaches {t['name']}:{p}" for s, t, p in forbidden if admitted(policies, s, t, p)
    ]
    return sorted(set(problems))


def test_network_policies_admit_only_the_pods_that_need_each_port() -> None:
    documents = [d for _, d in manifests()]
    assert {d["metadata"]["name"] for d in documents if d["kind"] == "NetworkPolicy"} == {
        "default-deny-ingress", "ray-clip-ray", "ray-laion400m-ingest", "ray-vit-b-32-laion400m", "mlflow",
        "postgres",
    }  # fmt: skip
    clusters = ray_clusters(documents)
    assert sorted(c["name"] for c in clusters) == ["clip-ray", "laion400m-ingest", "vit-b-32-laion400m"]
    assert all(c["submitters"] for c in clusters)  # the cron job's submitters target clip-ray
    assert network_problems(documents) == []


def _policy(documents: list[dict], name: str) -> dict:
    return next(d for d in documents if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == name)


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda ds: _policy(ds, "ray-clip-ray")["spec"]["ingress"][1].pop("from"),
         "a client outside the cluster reaches clip-ray head:8265"),
        (lambda ds: _policy(ds, "ray-clip-ray")["spec"]["ingress"][1].pop("ports"),
         "scheduled-eval submitter reaches clip-ray head:6379"),
        (lambda ds: _policy(ds, "ray-clip-ray")["spec"]["ingress"][0]["from"][0].update(podSelector={}),
         "laion400m-ingest head reaches clip-ray head:6379"),
        (lambda ds: ds.remove(_policy(ds, "mlflow")) or ds.remove(_policy(ds, "default-deny-ingress")),
         "a pod without labels reaches mlflow:5000"),
        (lambda ds: _policy(ds, "mlflow")["spec"]["ingress"][0]["from"].append(
            {"ipBlock": {"cidr": "0.0.0.0/0"}}), "a client outside the cluster reaches mlflow:5000"),
        (lambda ds: _policy(ds, "mlflow")["spec"]["ingress"][0]["from"][0].update(
            namespaceSelector={}), "a pod labelled like ours in another namespace reaches mlflow:5000"),
        (lambda ds: _policy(ds, "postgres")["spec"].update(ingress=[{}]), "a pod without labels reaches postgres:5432"),
        (lambda ds: _policy(ds, "ray-vit-b-32-laion400m")["spec"]["podSelector"].update(
            matchLabels={"clip-ray.io/ray-cluster": "typo"}), "vit-b-32-laion400m submitter cannot reach"),
        (lambda ds: _policy(ds, "ray-laion400m-ingest")["spec"]["ingress"][1]["ports"][0].update(port=8266),
         "laion400m-ingest submitter cannot reach laion400m-ingest head:8265"),
    ],
    ids=["dashboard-from-anywhere", "submitter-reaches-gcs", "other-cluster-reaches-gcs", "mlflow-unprotected",
         "mlflow-ip-block", "mlflow-any-namespace", "postgres-open-rule", "policy-selects-nothing", "wrong-port"],
)  # fmt: skip
def test_network_policy_check_catches_open_or_broken_policies(break_it, expected: str) -> None:
    documents = copy.deepcopy([d for _, d in manifests()])
    break_it(documents)
    assert expected in " | ".join(network_problems(documents))


def test_network_policies_are_valid_kubernetes_objects_with_named_ports_resolved() -> None:
    documents = copy.deepcopy([d for _, d in manifests()])
    # A named port resolves through the target's container ports, as Kubernetes does.
    _policy(documents, "mlflow")["spec"]["ingress"][0]["ports"][0]["port"] = "http"
    assert network_problems(documents) == []
    for document in documents:
        if document["kind"] == "NetworkPolicy":
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------------------
# No secret value is written in any manifest: only references to Secrets, SSM parameters or variables

SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|AUTH_KEY|PRIVATE_KEY", re.IGNORECASE)
REFERENCE = re.compile(r"^\$(\(\w+\)|\{\w+\}|\w+)$")  # $(VAR) as Kubernetes expands it, ${VAR}, $VAR
ASSIGNMENT = re.compile(r"(?:^|[\s;'\"])(?:export\s+|--env\s+|-e\s+)?([A-Za-z_][A-Za-z0-9_]*)=(\S*)")
URI_PASSWORD = re.compile(r"://[^/\s:@]+:([^/\s@]+)@")
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
BEARER = re.compile(r"\b(?:Bearer|Basic)\s+[A-Za-z0-9+/=._-]{8,}")
TOKEN_LIKE = re.compile(r"[A-Za-z0-9+=_]{32,}")  # hex or base64 of 24+ random bytes


def string_leaves(node: object, path: str = "") -> list[tuple[str, str, str]]:
    """(path, key, value) for every string in a YAML document; key is the nearest mapping key."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str):
                found.append((f"{path}.{key}", str(key), value))
            else:
                found += string_leaves(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += (
                [(f"{path}[{i}]", "", item)] if isinstance(item, str) else string_leaves(item, f"{path}[{i}]")
            )
    return found


def secret_like(name: str) -> bool:
    # A name that says where a secret is (…_PATH, secretName, secretKeyRef) is not a secret itself.
    return bool(SECRET_KEY.search(name)) and not re.search(r"(_PATH|_FILE|Name|Ref)$", name)


def literal_secrets(name: str, document: dict) -> list[str]:
    found = []
    if document.get("kind") == "Secret":
        found.append(f"{name}: a Secret object with its values")
    for env_list in [c.get("env", []) for c in containers(document)] + [
        spec.get("autoscalerOptions", {}).get("env", []) for spec in kuberay_cluster_specs(document)
    ]:
        for env in env_list:
            if secret_like(env["name"]) and "value" in env:
                found.append(f"{name}: env {env['name']} has a literal value")
    for path, key, value in string_leaves(document):
        if key != "name" and secret_like(key) and value and not REFERENCE.match(value):
            found.append(f"{name}{path}: {key} holds a literal value")
        for variable, assigned in ASSIGNMENT.findall(value):
            if secret_like(variable) and assigned and not REFERENCE.match(assigned.strip("'\"")):
                found.append(f"{name}{path}: {variable} is assigned a literal value")
        for password in URI_PASSWORD.findall(value):
            if not REFERENCE.match(password):
                found.append(f"{name}{path}: a URI embeds a password")
        if AWS_KEY_ID.search(value) or BEARER.search(value) or "PRIVATE KEY-----" in value:
            found.append(f"{name}{path}: holds a credential")
        for word in TOKEN_LIKE.findall(value):
            if re.search(r"[0-9]", word) and re.search(r"[A-Za-z]", word):
                found.append(f"{name}{path}: holds a token-like string")
    return found


def every_manifest() -> list[tuple[str, dict]]:
    return manifests() + [("ray_cluster.yaml", load_cluster_config())]


def test_no_secret_value_appears_literally_in_any_manifest() -> None:
    scanned = {name.split(":")[0] for name, _ in every_manifest()}
    assert scanned == {p.name for p in K8S_DIR.glob("*.yaml")} | {"ray_cluster.yaml"}
    assert [p for name, document in every_manifest() for p in literal_secrets(name, document)] == []


def _cluster(documents: list[tuple[str, dict]]) -> dict:
    return next(d for name, d in documents if name.startswith("raycluster.yaml"))


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda ds: _env_of(_cluster(ds)["spec"]["workerGroupSpecs"][1]).append(
            {"name": "RAY_AUTH_TOKEN", "value": "changeme"}), "env RAY_AUTH_TOKEN has a literal value"),
        (lambda ds: _cluster(ds)["spec"]["autoscalerOptions"]["env"].append(
            {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}), "env AWS_SECRET_ACCESS_KEY has a literal value"),
        (lambda ds: ds.append(("extra.yaml", {"kind": "Secret", "metadata": {"name": "s"},
                                              "stringData": {"auth_token": "abc"}})), "a Secret object"),
        (lambda ds: ds.append(("extra.yaml", {"kind": "ConfigMap", "metadata": {"name": "c"},
                                              "data": {"password": "hunter2"}})), "password holds a literal value"),
        (lambda ds: [e.update(value="postgresql://mlflow:hunter2@postgres.clip-ray.svc:5432/mlflow")
                     for _, d in ds if d.get("kind") == "Deployment"
                     for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
                     if e["name"] == "MLFLOW_BACKEND_STORE_URI"], "a URI embeds a password"),
        (lambda ds: ds[-1][1]["docker"]["run_options"].append("--env RAY_AUTH_TOKEN=3f9a0c"),
         "RAY_AUTH_TOKEN is assigned a literal value"),
        (lambda ds: ds[-1][1]["head_start_ray_commands"].insert(0, "export MLFLOW_TRACKING_PASSWORD='pw'"),
         "MLFLOW_TRACKING_PASSWORD is assigned a literal value"),
        (lambda ds: ds[-1][1]["setup_commands"].append("aws configure set aws_access_key_id AKIAIOSFODNN7EXAMPLE"),
         "holds a credential"),
        (lambda ds: _cluster(ds)["spec"]["headGroupSpec"]["rayStartParams"].update(
            {"metrics-export-port": "8080", "extra": "--token 9c1185a5c5e9fc54612808977ee8f548b2258d31"}),
         "holds a token-like string"),
    ],
    ids=["env-token", "autoscaler-env-key", "secret-object", "configmap-password", "uri-password",
         "run-option-token", "command-password", "aws-key-id", "hex-token"],
)  # fmt: skip
def test_literal_secret_check_catches_each_way_of_inlining_one(break_it, expected: str) -> None:
    documents = copy.deepcopy(every_manifest())
    break_it(documents)
    assert expected in " | ".join(p for name, d in documents for p in literal_secrets(name, d))
