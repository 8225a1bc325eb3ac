"""The services of the local stack, one `Service` record each (ports, address, command, health check,
health timeout), and the settings they run with (`StackConfig`). Adding a service is adding a record to
`SERVICES` and its settings to `StackConfig`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infra.local.state import StackError, credentials, paths, runtime_dir, secret, secret_path

HOST = "127.0.0.1"
DATA_BUCKET = "clip-data"
MLFLOW_BUCKET = "mlflow"
BUCKETS = (DATA_BUCKET, MLFLOW_BUCKET)
MLFLOW_ARTIFACTS_DESTINATION = f"s3://{MLFLOW_BUCKET}/artifacts"
REGION = "us-east-1"
RAY_AUTH_MODES = ("disabled", "token")
MLFLOW_ADMIN = "admin"
# The settings that are not ports or sizes (the command line gives them flags of their own).
AUTH_SETTINGS = ("ray_auth", "mlflow_auth")


@dataclass(frozen=True)
class StackConfig:
    """Ports and sizes of the stack. Recorded in <state-dir>/stack.json by start.

    MLflow listens on 5050 rather than its customary 5000, which macOS's AirPlay Receiver holds.
    SeaweedFS also uses each of its ports + 10000 for gRPC.
    """

    s3_port: int = 8333
    mlflow_port: int = 5050
    ray_port: int = 6379
    ray_dashboard_port: int = 8265
    ray_client_port: int = 10001
    # Not Ray's default 52365: every local ray.init() takes that one for its own dashboard agent, and the
    # stack must run beside such clusters (tests start some while it is up).
    ray_agent_port: int = 52385
    seaweed_master_port: int = 9333
    seaweed_volume_port: int = 9340
    seaweed_filer_port: int = 8888
    seaweed_admin_port: int = 23646
    ray_num_cpus: int | None = None
    ray_object_store_bytes: int | None = None
    mlflow_workers: int = 1
    # "token": the dashboard, job API and GCS require the token in <state-dir>/secrets/ray_auth_token.
    ray_auth: str = "disabled"
    # MLflow's basic-auth app, with the admin password generated into <state-dir>/secrets/.
    mlflow_auth: bool = False

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        return f"{HOST}:{self.ray_port}"

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://{HOST}:{self.ray_dashboard_port}"

    def __post_init__(self) -> None:
        if self.ray_auth not in RAY_AUTH_MODES:
            raise StackError(f"ray_auth must be one of {', '.join(RAY_AUTH_MODES)}, not {self.ray_auth!r}")
        for service in SERVICES:
            bad = [p for p in service.ports(self) if not 0 < p < 65536]
            if bad:
                raise StackError(
                    f"{service.name}: port(s) {bad} are outside 1-65535; SeaweedFS also listens on each of its "
                    "ports + 10000 (gRPC), so its ports must be below 55536"
                )


# A service's command line, its environment and its working directory.
Launch = tuple[list[str], dict[str, str], Path]


@dataclass(frozen=True)
class Service:
    """One service of the stack. `command` prepares the service's folders in the state dir and says how to
    run it; `health` answers (healthy, detail) and never raises; `url` is what status shows."""

    name: str
    ports: Callable[[StackConfig], list[int]]
    url: Callable[[StackConfig], str]
    command: Callable[[Path, StackConfig], Launch]
    health: Callable[[Path, StackConfig], tuple[bool, str]]
    health_timeout_s: float


def client_env(state_dir: Path, config: StackConfig, creds: dict[str, str]) -> dict[str, str]:
    """Environment variables that point S3, MLflow and Ray clients at the services."""
    env = {
        "AWS_ENDPOINT_URL": config.s3_endpoint,
        "AWS_ACCESS_KEY_ID": creds["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,  # boto3 reads only this one
        "MLFLOW_S3_ENDPOINT_URL": config.s3_endpoint,
        "MLFLOW_TRACKING_URI": config.mlflow_uri,
        "RAY_ADDRESS": config.ray_address,
        "RAY_API_SERVER_ADDRESS": config.ray_dashboard_url,
        # Ray turns on token authentication whenever ~/.ray/auth_token exists (any local ray.init() writes
        # one). The stack says which mode it runs in, so its head, its health checks and its clients agree
        # instead of depending on what else ran on this machine before. With "token", Ray reads the token
        # from the file (RAY_AUTH_TOKEN would win over it: the env file unsets it).
        "RAY_AUTH_MODE": config.ray_auth,
        # Without this Ray swaps 127.0.0.1 for the machine's outward address, in the head and in every
        # driver, and then listens beyond loopback. It must be set before `import ray`.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    if config.ray_auth == "token":
        env["RAY_AUTH_TOKEN_PATH"] = str(secret_path(state_dir, "ray_auth_token"))
    if config.mlflow_auth:
        # MLflow's clients send these as HTTP basic auth; the Ray head has them too, so jobs and their
        # workers authenticate from the environment, not from anything in a config or a task's arguments.
        env["MLFLOW_TRACKING_USERNAME"] = MLFLOW_ADMIN
        env["MLFLOW_TRACKING_PASSWORD"] = secret(state_dir, "mlflow_admin_password")
    return env


# ---------------------------------------------------------------------------------------------------------
# What the commands and health checks share


def port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


# Loopback services must not be reached through a proxy from the user's environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout_s: float = 3.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        with _NO_PROXY_OPENER.open(
            urllib.request.Request(url, headers=headers or {}), timeout=timeout_s
        ) as reply:
            return reply.status, reply.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, f"answered HTTP {e.code}"
    except urllib.error.URLError as e:
        return 0, f"not reachable ({e.reason})"
    except (OSError, ValueError) as e:
        return 0, f"not reachable ({e})"


def _secret_or_none(state_dir: Path, name: str) -> str | None:
    # Not there yet: a health check's request then goes without it, and fails if the service wants one.
    try:
        return secret(state_dir, name)
    except StackError:
        return None


def _tool(name: str) -> str:
    # Prefer the tool next to this interpreter, so an unactivated venv still finds its own `weed`.
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH; install the project first")
    return found


_RAY_ADDRESSES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def _inherited_env() -> dict[str, str]:
    # The user's own AWS/MLflow/Ray settings (a real profile, a remote tracking server, another cluster's
    # token) must not leak in.
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "MLFLOW_", "RAY_AUTH_")) and k not in _RAY_ADDRESSES
    }


# ---------------------------------------------------------------------------------------------------------
# SeaweedFS: the S3 store


def _seaweedfs_ports(config: StackConfig) -> list[int]:
    http = [config.s3_port, config.seaweed_master_port, config.seaweed_volume_port, config.seaweed_filer_port]
    http.append(config.seaweed_admin_port)
    return http + [p + 10000 for p in http]


def _seaweedfs_command(state_dir: Path, config: StackConfig) -> Launch:
    root = paths(state_dir)["seaweedfs"]
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    sockets = runtime_dir(state_dir) / "sockets"
    sockets.mkdir(parents=True, exist_ok=True)
    command = [
        _tool("weed"),
        "mini",
        f"-dir={root / 'data'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-s3.port={config.s3_port}",
        f"-master.port={config.seaweed_master_port}",
        f"-volume.port={config.seaweed_volume_port}",
        f"-filer.port={config.seaweed_filer_port}",
        f"-admin.port={config.seaweed_admin_port}",
        f"-filer.localSocket={sockets / 'seaweedfs-filer.sock'}",
        f"-s3.localSocket={sockets / 'seaweedfs-s3.sock'}",
        f"-bucket={','.join(BUCKETS)}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    creds = credentials(state_dir, create=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(root)),
        # SeaweedFS writes its glog files to TMPDIR; keep them in the state dir.
        "TMPDIR": str(root / "tmp"),
        # `weed mini` turns these into its admin identity on first start; from then on S3 needs them.
        "AWS_ACCESS_KEY_ID": creds["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": creds["secret_access_key"],
    }
    return command, env, root


def _s3_health(state_dir: Path, config: StackConfig) -> tuple[bool, str]:
    """A signed request with this stack's credentials, so a foreign S3 on the same port does not pass."""
    from botocore.exceptions import BotoCoreError, ClientError

    from pipelines import storage

    creds = credentials(state_dir, create=False)
    if creds is None:
        return False, "no credentials yet"
    if not port_taken(config.s3_port):
        return False, f"nothing listens on port {config.s3_port}"
    settings = storage.S3Settings.from_env(client_env(state_dir, config, creds))
    client = storage.boto3_client(settings, timeout_s=3.0)
    try:
        names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    except (BotoCoreError, ClientError) as e:
        return False, f"S3 request failed: {e}"
    missing = [b for b in BUCKETS if b not in names]
    return (not missing), (f"missing buckets {missing}" if missing else f"buckets {', '.join(BUCKETS)}")


SEAWEEDFS = Service(
    name="seaweedfs",
    ports=_seaweedfs_ports,
    url=lambda config: f"s3 {config.s3_endpoint}",
    command=_seaweedfs_command,
    health=_s3_health,
    health_timeout_s=90.0,
)


# ---------------------------------------------------------------------------------------------------------
# MLflow: the tracking server, its artifacts proxied into the S3 store


def _mlflow_command(state_dir: Path, config: StackConfig) -> Launch:
    root = paths(state_dir)["mlflow"]
    root.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        # Clients send artifacts to the server, which writes them to the bucket: they need no S3 access.
        "--serve-artifacts",
        "--artifacts-destination",
        MLFLOW_ARTIFACTS_DESTINATION,
        "--host",
        HOST,
        "--port",
        str(config.mlflow_port),
        "--workers",
        str(config.mlflow_workers),
    ]
    stack = client_env(state_dir, config, credentials(state_dir, create=True))
    env = _inherited_env() | {k: v for k, v in stack.items() if k.startswith(("AWS_", "MLFLOW_S3"))}
    # The job executor runs GenAI jobs (scorers, prompt optimisation) in seven extra ~100 MB processes
    # that experiment tracking does not use.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    if config.mlflow_auth:
        command += ["--app-name", "basic-auth"]
        env |= _mlflow_auth_env(state_dir)
    return command, env, root


def _mlflow_auth_env(state_dir: Path) -> dict[str, str]:
    """The basic-auth app's settings: an ini file for the user store (no secret in it), the admin account
    it creates on its first start, and the static key that signs its UI's CSRF tokens."""
    root = paths(state_dir)["mlflow"]
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        # Users other than the admin see nothing until the admin grants it.
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": secret(state_dir, "mlflow_admin_password"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(state_dir, "mlflow_flask_secret_key"),
    }


def _mlflow_auth_headers(state_dir: Path, config: StackConfig) -> dict[str, str] | None:
    """The basic auth this stack's clients send, or None when MLflow needs none."""
    password = _secret_or_none(state_dir, "mlflow_admin_password") if config.mlflow_auth else None
    if password is None:
        return None
    pair = f"{MLFLOW_ADMIN}:{password}".encode()
    return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}


def _mlflow_health(state_dir: Path, config: StackConfig) -> tuple[bool, str]:
    code, body = http_get(f"{config.mlflow_uri}/health")
    if code != 200:
        return False, f"/health {body}"
    # Also a query that reads the backend store, which /health does not touch (nor, with basic-auth on, the
    # user store: this one does).
    code, body = http_get(
        f"{config.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1",
        headers=_mlflow_auth_headers(state_dir, config),
    )
    return code == 200, ("tracking API up" if code == 200 else f"experiments/search {body}")


MLFLOW = Service(
    name="mlflow",
    ports=lambda config: [config.mlflow_port],
    url=lambda config: config.mlflow_uri,
    command=_mlflow_command,
    health=_mlflow_health,
    health_timeout_s=180.0,
)


# ---------------------------------------------------------------------------------------------------------
# Ray: a head node, whose environment every job and task inherits


def _ray_command(state_dir: Path, config: StackConfig) -> Launch:
    temp_dir = runtime_dir(state_dir) / "ray"
    temp_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        # Stay in the foreground: one long-lived process whose session holds all of Ray's.
        "--block",
        f"--node-ip-address={HOST}",
        f"--port={config.ray_port}",
        "--include-dashboard=true",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={config.ray_dashboard_port}",
        f"--dashboard-agent-listen-port={config.ray_agent_port}",
        f"--ray-client-server-port={config.ray_client_port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if config.ray_num_cpus is not None:
        command.append(f"--num-cpus={config.ray_num_cpus}")
    if config.ray_object_store_bytes is not None:
        command.append(f"--object-store-memory={config.ray_object_store_bytes}")
    # Jobs and tasks inherit the head's environment: S3 and MLflow settings reach them from here, and
    # `python` in a job entrypoint means this interpreter.
    stack = client_env(state_dir, config, credentials(state_dir, create=True))
    stack = {k: v for k, v in stack.items() if k not in _RAY_ADDRESSES}
    env = _inherited_env() | stack | {"RAY_USAGE_STATS_ENABLED": "0"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return command, env, state_dir


def _ray_health(state_dir: Path, config: StackConfig) -> tuple[bool, str]:
    checks = {
        "gcs": f"{config.ray_dashboard_url}/api/gcs_healthz",
        "raylet": f"http://{HOST}:{config.ray_agent_port}/api/healthz",
        # Not public under token authentication, unlike the two health endpoints.
        "jobs api": f"{config.ray_dashboard_url}/api/jobs/",
    }
    token = _secret_or_none(state_dir, "ray_auth_token") if config.ray_auth == "token" else None
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    for name, url in checks.items():
        code, body = http_get(url, headers=headers)
        if code != 200:
            return False, f"{name} {body}"
    # A head that answers but authenticates otherwise than configured is not this stack's.
    code, body = http_get(f"{config.ray_dashboard_url}/api/authentication_mode")
    try:
        mode = json.loads(body).get("authentication_mode") if code == 200 else body
    except (ValueError, AttributeError):
        mode = f"unreadable ({body[:80]!r})"
    if mode != config.ray_auth:
        return False, f"the dashboard's authentication mode is {mode}, not {config.ray_auth}"
    return True, "gcs, raylet and jobs API up" + (" (token authentication)" if headers else "")


RAY = Service(
    name="ray",
    ports=lambda config: [
        config.ray_port,
        config.ray_dashboard_port,
        config.ray_client_port,
        config.ray_agent_port,
    ],
    url=lambda config: f"gcs {config.ray_address}, dashboard {config.ray_dashboard_url}",
    command=_ray_command,
    health=_ray_health,
    health_timeout_s=180.0,
)

SERVICES = (SEAWEEDFS, MLFLOW, RAY)  # start order; stop goes the other way
