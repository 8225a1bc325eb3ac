"""The local stack: an S3 store (SeaweedFS), an MLflow tracking server and a Ray head node, all on loopback.
Started, checked and stopped from here by `python -m infra.local` and by the tests, with every piece of
state (data, logs, pids, credentials, env file) under one directory that can be deleted. Ray token
authentication and MLflow basic-auth are off by default (loopback only) and on with `ray_auth="token"` and
`mlflow_auth=True`, their secrets generated into the state directory.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines.locks import file_lock

HOST = "127.0.0.1"
DATA_BUCKET = "clip-data"
MLFLOW_BUCKET = "mlflow"
BUCKETS = (DATA_BUCKET, MLFLOW_BUCKET)
MLFLOW_ARTIFACTS_DESTINATION = f"s3://{MLFLOW_BUCKET}/artifacts"
REGION = "us-east-1"
SERVICES = ("seaweedfs", "mlflow", "ray")  # start order; stop goes the other way
HEALTH_TIMEOUT_S = {"seaweedfs": 90.0, "mlflow": 180.0, "ray": 180.0}
STOP_GRACE_S = 15.0
RAY_AUTH_MODES = ("disabled", "token")
MLFLOW_ADMIN = "admin"
# The settings that are not ports or sizes (the command line gives them flags of their own).
AUTH_SETTINGS = ("ray_auth", "mlflow_auth")
# Ray's unix sockets live under <temp dir>/session_<date>_<pid>/sockets/; a socket path must fit in
# 107 bytes, which leaves about 40 characters for the temp dir itself.
MAX_SHORT_DIR_LEN = 40


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() else None


DEFAULT_STATE_DIR = (_repo_root() or Path.cwd()) / ".stack"


class StackError(RuntimeError):
    """A service could not be started or stopped; the message says which and where its log is."""


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
            bad = [p for p in self.service_ports(service) if not 0 < p < 65536]
            if bad:
                raise StackError(
                    f"{service}: port(s) {bad} are outside 1-65535; SeaweedFS also listens on each of its "
                    "ports + 10000 (gRPC), so its ports must be below 55536"
                )

    def service_ports(self, service: str) -> list[int]:
        if service == "seaweedfs":
            http = [self.s3_port, self.seaweed_master_port, self.seaweed_volume_port, self.seaweed_filer_port]
            http.append(self.seaweed_admin_port)
            return http + [p + 10000 for p in http]
        if service == "mlflow":
            return [self.mlflow_port]
        return [self.ray_port, self.ray_dashboard_port, self.ray_client_port, self.ray_agent_port]


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    healthy: bool
    pid: int | None
    url: str
    detail: str


# ---------------------------------------------------------------------------------------------------------
# State directory layout


def _paths(state_dir: Path) -> dict[str, Path]:
    return {
        "config": state_dir / "stack.json",
        "credentials": state_dir / "credentials.json",
        "env": state_dir / "env",
        "lock": state_dir / ".lock",
        "logs": state_dir / "logs",
        "run": state_dir / "run",
        "seaweedfs": state_dir / "seaweedfs",
        "mlflow": state_dir / "mlflow",
        "runtime_dir_record": state_dir / "runtime_dir",
        "secrets": state_dir / "secrets",
    }


def _runtime_dir(state_dir: Path) -> Path:
    """Where unix sockets and Ray's temp dir go: the state dir if its path is short enough, else /tmp."""
    if len(str(state_dir / "ray")) <= MAX_SHORT_DIR_LEN:
        return state_dir
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
    # Plain /tmp, as Ray itself uses: macOS's per-user temp dir is itself too long.
    tmp = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    return tmp / f"clip-stack-{digest}"


def _log_path(state_dir: Path, service: str) -> Path:
    return _paths(state_dir)["logs"] / f"{service}.log"


def load_config(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> StackConfig:
    """The config recorded by the last start in this state dir, or the defaults."""
    path = _paths(Path(state_dir))["config"]
    if not path.exists():
        return StackConfig()
    return StackConfig(**json.loads(path.read_text()))


def _credentials(state_dir: Path, create: bool) -> dict[str, str] | None:
    """The S3 key pair of this stack, generated once per state dir (never a secret in the repo)."""
    path = _paths(state_dir)["credentials"]
    if path.exists():
        return json.loads(path.read_text())
    if not create:
        return None
    creds = {"access_key_id": f"clip{secrets.token_hex(6)}", "secret_access_key": secrets.token_urlsafe(30)}
    _write_private(path, json.dumps(creds))
    return creds


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# The secrets of the optional authentication, one 0600 file each, generated once per state dir. Only files
# and environment variables carry them: never a command line, which `ps`, the logs and run/*.json show.
SECRETS = {
    "ray_auth_token": lambda: secrets.token_hex(32),  # the format of `ray get-auth-token --generate`
    "mlflow_admin_password": lambda: secrets.token_urlsafe(24),
    "mlflow_flask_secret_key": lambda: secrets.token_hex(32),  # signs the MLflow UI's CSRF tokens
}


def _secret_path(state_dir: Path, name: str) -> Path:
    return _paths(state_dir)["secrets"] / name


def _secret(state_dir: Path, name: str, create: bool = False) -> str:
    path = _secret_path(state_dir, name)
    if not path.exists():
        if not create:
            raise StackError(f"{path} is missing; run `python -m infra.local start` again to create it")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(path, SECRETS[name]())
    return path.read_text()


def _needed_secrets(config: StackConfig) -> list[str]:
    needed = ["ray_auth_token"] if config.ray_auth == "token" else []
    return needed + (["mlflow_admin_password", "mlflow_flask_secret_key"] if config.mlflow_auth else [])


def stack_env(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> dict[str, str]:
    """Environment variables that point S3, MLflow and Ray clients at this stack."""
    state_dir = Path(state_dir).absolute()
    creds = _credentials(state_dir, create=False)
    if creds is None:
        raise StackError(f"no local stack in {state_dir}; run `python -m infra.local start` first")
    return _client_env(state_dir, load_config(state_dir), creds)


def _client_env(state_dir: Path, config: StackConfig, creds: dict[str, str]) -> dict[str, str]:
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
        env["RAY_AUTH_TOKEN_PATH"] = str(_secret_path(state_dir, "ray_auth_token"))
    if config.mlflow_auth:
        # MLflow's clients send these as HTTP basic auth; the Ray head has them too, so jobs and their
        # workers authenticate from the environment, not from anything in a config or a task's arguments.
        env["MLFLOW_TRACKING_USERNAME"] = MLFLOW_ADMIN
        env["MLFLOW_TRACKING_PASSWORD"] = _secret(state_dir, "mlflow_admin_password")
    return env


def _write_env_file(state_dir: Path) -> Path:
    path = _paths(state_dir)["env"]
    lines = [f"# Local stack in {state_dir}. Use it from a shell with: source {path}"]
    env = stack_env(state_dir)
    if env["RAY_AUTH_MODE"] == "token":
        lines.append("unset RAY_AUTH_TOKEN  # a token for another cluster would win over RAY_AUTH_TOKEN_PATH")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    _write_private(path, "\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# Processes. Each service runs in its own session (setsid), so stopping it can find every process it
# spawned, including ones re-parented to init, without touching anyone else's (unlike `ray stop`).


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    sid: int
    zombie: bool
    start: str


def _process_table() -> dict[int, _Proc]:
    table = {}
    if Path("/proc/self/stat").exists():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses; the fields after its last ')' do not.
            fields = stat[stat.rfind(")") + 2 :].split()
            pid = int(entry)
            table[pid] = _Proc(pid, int(fields[1]), int(fields[3]), fields[0] == "Z", fields[19])
        return table
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "stat=", "-o", "lstart="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        pid, ppid, stat, *start = line.split()
        with contextlib.suppress(OSError):
            table[int(pid)] = _Proc(int(pid), int(ppid), os.getsid(int(pid)), "Z" in stat, " ".join(start))
    return table


def _session_processes(record: dict, table: dict[int, _Proc]) -> list[int]:
    """Live processes of a recorded service: its session, plus descendants that made sessions of their own."""
    sid = record["pid"]
    leader = table.get(sid)
    if leader is not None and leader.start != record["start"] and leader.sid == sid:
        return []  # the pid now leads somebody else's session: the record is stale
    members = {p.pid for p in table.values() if p.sid == sid and not p.zombie}
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    frontier = list(members)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in members and not table[child].zombie:
                members.add(child)
                frontier.append(child)
    members.discard(os.getpid())
    return sorted(members)


def _read_record(state_dir: Path, service: str) -> dict | None:
    path = _paths(state_dir)["run"] / f"{service}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _leader_alive(record: dict | None) -> bool:
    if record is None:
        return False
    proc = _process_table().get(record["pid"])
    return proc is not None and not proc.zombie and proc.start == record["start"]


def _spawn(state_dir: Path, service: str, command: list[str], env: dict[str, str], cwd: Path) -> int:
    log_path = _log_path(state_dir, service)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    record = {"pid": proc.pid, "start": _process_table()[proc.pid].start, "command": command}
    run_dir = _paths(state_dir)["run"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{service}.json").write_text(json.dumps(record, indent=1))
    return proc.pid


def _kill_service(state_dir: Path, service: str) -> list[int]:
    """Ask the service's leader to shut down, then SIGTERM and finally SIGKILL whatever is left.

    The leader goes first because it shuts its children down in order (`ray start --block` drains the
    node in ~2 s), whereas a SIGTERM to all of Ray's processes at once leaves some hanging for long.
    """
    record = _read_record(state_dir, service)
    if record is None:
        return []
    pids = killed = _session_processes(record, _process_table())
    leader = [record["pid"]] if record["pid"] in pids else pids
    for targets, sig, wait_s in (
        (leader, signal.SIGTERM, STOP_GRACE_S),
        (None, signal.SIGTERM, 3.0),
        (None, signal.SIGKILL, 5.0),
    ):
        if not pids:
            break
        for pid in targets or pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            # Recomputed each time: processes forked meanwhile belong to the session too.
            pids = _session_processes(record, _process_table())
    for pid in killed:  # reap those that were our own children, so no zombie lingers
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    if pids:
        raise StackError(f"{service}: processes {pids} survived SIGKILL")
    (_paths(state_dir)["run"] / f"{service}.json").unlink(missing_ok=True)
    return killed


# ---------------------------------------------------------------------------------------------------------
# Health checks: each answers (healthy, detail) and never raises.


# Loopback services must not be reached through a proxy from the user's environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get(url: str, timeout_s: float = 3.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
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


def _s3_health(state_dir: Path, config: StackConfig) -> tuple[bool, str]:
    """A signed request with this stack's credentials, so a foreign S3 on the same port does not pass."""
    from botocore.exceptions import BotoCoreError, ClientError

    from pipelines import storage

    creds = _credentials(state_dir, create=False)
    if creds is None:
        return False, "no credentials yet"
    if not _port_taken(config.s3_port):
        return False, f"nothing listens on port {config.s3_port}"
    settings = storage.S3Settings.from_env(_client_env(state_dir, config, creds))
    client = storage.boto3_client(settings, timeout_s=3.0)
    try:
        names = {b["Name"] for b in client.list_buckets()["Buckets"]}
    except (BotoCoreError, ClientError) as e:
        return False, f"S3 request failed: {e}"
    missing = [b for b in BUCKETS if b not in names]
    return (not missing), (f"missing buckets {missing}" if missing else f"buckets {', '.join(BUCKETS)}")


def _auth_headers(state_dir: Path, config: StackConfig, service: str) -> dict[str, str] | None:
    """The Authorization header this stack's clients send to `service`, or None when it needs none (or
    its secret is not there yet: the request then goes without, and fails if the service wants one)."""
    try:
        if service == "ray" and config.ray_auth == "token":
            return {"Authorization": f"Bearer {_secret(state_dir, 'ray_auth_token')}"}
        if service == "mlflow" and config.mlflow_auth:
            pair = f"{MLFLOW_ADMIN}:{_secret(state_dir, 'mlflow_admin_password')}".encode()
            return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}
    except StackError:
        return None
    return None


def _mlflow_health(state_dir: Path, config: StackConfig) -> tuple[bool, str]:
    code, body = _http_get(f"{config.mlflow_uri}/health")
    if code != 200:
        return False, f"/health {body}"
    # Also a query that reads the backend store, which /health does not touch (nor, with basic-auth on, the
    # user store: this one does).
    code, body = _http_get(
        f"{config.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1",
        headers=_auth_headers(state_dir, config, "mlflow"),
    )
    return code == 200, ("tracking API up" if code == 200 else f"experiments/search {body}")


def _ray_health(state_dir: Path, config: StackConfig) -> tuple[bool, str]:
    checks = {
        "gcs": f"{config.ray_dashboard_url}/api/gcs_healthz",
        "raylet": f"http://{HOST}:{config.ray_agent_port}/api/healthz",
        # Not public under token authentication, unlike the two health endpoints.
        "jobs api": f"{config.ray_dashboard_url}/api/jobs/",
    }
    headers = _auth_headers(state_dir, config, "ray")
    for name, url in checks.items():
        code, body = _http_get(url, headers=headers)
        if code != 200:
            return False, f"{name} {body}"
    # A head that answers but authenticates otherwise than configured is not this stack's.
    code, body = _http_get(f"{config.ray_dashboard_url}/api/authentication_mode")
    try:
        mode = json.loads(body).get("authentication_mode") if code == 200 else body
    except (ValueError, AttributeError):
        mode = f"unreadable ({body[:80]!r})"
    if mode != config.ray_auth:
        return False, f"the dashboard's authentication mode is {mode}, not {config.ray_auth}"
    return True, "gcs, raylet and jobs API up" + (" (token authentication)" if headers else "")


HEALTH_CHECKS: dict[str, Callable[[Path, StackConfig], tuple[bool, str]]] = {
    "seaweedfs": _s3_health,
    "mlflow": _mlflow_health,
    "ray": _ray_health,
}


def _service_url(service: str, config: StackConfig) -> str:
    if service == "seaweedfs":
        return f"s3 {config.s3_endpoint}"
    if service == "mlflow":
        return config.mlflow_uri
    return f"gcs {config.ray_address}, dashboard {config.ray_dashboard_url}"


# ---------------------------------------------------------------------------------------------------------
# Commands and environments of the three services


def _tool(name: str) -> str:
    # Prefer the tool next to this interpreter, so an unactivated venv still finds its own `weed`.
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH; install the project first")
    return found


def _inherited_env() -> dict[str, str]:
    # The user's own AWS/MLflow/Ray settings (a real profile, a remote tracking server, another cluster's
    # token) must not leak in.
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "MLFLOW_", "RAY_AUTH_")) and k not in _RAY_ADDRESSES
    }


_RAY_ADDRESSES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")


def _seaweedfs_command(state_dir: Path, config: StackConfig) -> tuple[list[str], dict[str, str], Path]:
    root = _paths(state_dir)["seaweedfs"]
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    sockets = _runtime_dir(state_dir) / "sockets"
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
    creds = _credentials(state_dir, create=True)
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


def _mlflow_command(state_dir: Path, config: StackConfig) -> tuple[list[str], dict[str, str], Path]:
    root = _paths(state_dir)["mlflow"]
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
    stack = stack_env(state_dir)
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
    root = _paths(state_dir)["mlflow"]
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
        "MLFLOW_AUTH_ADMIN_PASSWORD": _secret(state_dir, "mlflow_admin_password"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": _secret(state_dir, "mlflow_flask_secret_key"),
    }


def _ray_command(state_dir: Path, config: StackConfig) -> tuple[list[str], dict[str, str], Path]:
    temp_dir = _runtime_dir(state_dir) / "ray"
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
    stack = {k: v for k, v in stack_env(state_dir).items() if k not in _RAY_ADDRESSES}
    env = _inherited_env() | stack | {"RAY_USAGE_STATS_ENABLED": "0"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return command, env, state_dir


COMMANDS = {"seaweedfs": _seaweedfs_command, "mlflow": _mlflow_command, "ray": _ray_command}


# ---------------------------------------------------------------------------------------------------------
# start / status / stop


def _say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _log_tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in tail)


def _start_service(state_dir: Path, service: str, config: StackConfig, timeout_s: float) -> None:
    log_path = _log_path(state_dir, service)
    taken = [p for p in config.service_ports(service) if _port_taken(p)]
    if taken:
        raise StackError(
            f"{service}: port(s) {taken} are in use by another program, so {service} cannot start. "
            f"Stop that program or choose other ports (see `python -m infra.local start --help`)."
        )
    command, env, cwd = COMMANDS[service](state_dir, config)
    pid = _spawn(state_dir, service, command, env, cwd)
    _say(f"{service}: started pid {pid}, waiting for it to be healthy (log: {log_path})")
    began = time.monotonic()
    while True:
        healthy, detail = HEALTH_CHECKS[service](state_dir, config)
        if healthy:
            _say(f"{service}: healthy after {time.monotonic() - began:.1f}s ({detail})")
            return
        exited = not _leader_alive(_read_record(state_dir, service))
        if exited or time.monotonic() - began > timeout_s:
            why = "exited" if exited else f"was not healthy after {timeout_s:g}s"
            _kill_service(state_dir, service)
            raise StackError(f"{service} {why} ({detail}). See its log: {log_path}\n{_log_tail(log_path)}")
        time.sleep(0.5)


def start(
    state_dir: str | os.PathLike = DEFAULT_STATE_DIR,
    config: StackConfig | None = None,
    timeout_s: float | None = None,
) -> list[str]:
    """Start every service that is not already healthy; returns the names of those it started.

    config=None reuses the ports recorded in the state dir (or the defaults on a first start).
    """
    state_dir = Path(state_dir).absolute()
    # Two starts at once (a test session and the demo) must not both spawn the same service.
    with file_lock(_paths(state_dir)["lock"]):
        recorded = load_config(state_dir)
        config = recorded if config is None else config
        if config != recorded and any(_leader_alive(_read_record(state_dir, s)) for s in SERVICES):
            raise StackError(
                f"the stack in {state_dir} runs with other settings ({recorded}); stop it before changing them"
            )
        _paths(state_dir)["config"].write_text(json.dumps(dataclasses.asdict(config), indent=1))
        _credentials(state_dir, create=True)
        for name in _needed_secrets(config):
            _secret(state_dir, name, create=True)
        runtime_dir = _runtime_dir(state_dir)
        _paths(state_dir)["runtime_dir_record"].write_text(f"{runtime_dir}\n")
        if runtime_dir != state_dir:
            _say(
                f"state dir path is too long for unix sockets; Ray's temp dir and sockets go to {runtime_dir}"
            )
        env_file = _write_env_file(state_dir)
        started = []
        for service in SERVICES:
            healthy, detail = HEALTH_CHECKS[service](state_dir, config)
            if healthy:
                _say(f"{service}: already running and healthy at {_service_url(service, config)}")
                continue
            if _leader_alive(_read_record(state_dir, service)):
                # Ours but unhealthy (hung, or half-started by a killed start): replace it.
                _say(f"{service}: running but unhealthy ({detail}); restarting it")
                _kill_service(state_dir, service)
            try:
                _start_service(state_dir, service, config, timeout_s or HEALTH_TIMEOUT_S[service])
            except StackError:
                # Leave nothing half-started: what this call started goes down with the one that failed.
                for done in reversed(started):
                    _kill_service(state_dir, done)
                raise
            started.append(service)
        _say(
            ("started " + ", ".join(started)) if started else "everything was already running; nothing to do"
        )
        _say(f"environment for clients: source {env_file}")
        return started


def status(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> list[ServiceStatus]:
    state_dir = Path(state_dir).absolute()
    config = load_config(state_dir)
    report = []
    for service in SERVICES:
        record = _read_record(state_dir, service)
        pid = record["pid"] if _leader_alive(record) else None
        healthy, detail = HEALTH_CHECKS[service](state_dir, config)
        if healthy and pid is None:
            detail += " (not started from this state dir)"
        report.append(ServiceStatus(service, healthy, pid, _service_url(service, config), detail))
    return report


def stop(state_dir: str | os.PathLike = DEFAULT_STATE_DIR, services: list[str] | None = None) -> None:
    """Stop the services (all by default), newest first. Safe to run when nothing runs."""
    state_dir = Path(state_dir).absolute()
    with file_lock(_paths(state_dir)["lock"]):
        for service in reversed(SERVICES):
            if services is not None and service not in services:
                continue
            if _read_record(state_dir, service) is None:
                _say(f"{service}: not running")
                continue
            killed = _kill_service(state_dir, service)
            _say(f"{service}: stopped" + (f" ({len(killed)} processes)" if killed else " (was not running)"))
        runtime_dir = _runtime_dir(state_dir)
        nothing_left = not any(_read_record(state_dir, s) for s in SERVICES)
        if nothing_left and runtime_dir != state_dir and runtime_dir.exists():
            # Outside the state dir: it would otherwise outlive `rm -rf <state-dir>`.
            shutil.rmtree(runtime_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Leases: one stack shared by several client processes on one machine (test sessions, benchmarks).


@contextlib.contextmanager
def leased(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> Iterator[dict[str, str]]:
    """Start what is not running and hold a lease on the stack while inside; yields the client environment.
    On the way out, the services that lease holders started are stopped once no other holder is alive, so a
    finishing test session never stops the stack under another one, and a stack started by `make demo` or
    `python -m infra.local start` stays up."""
    state_dir = Path(state_dir).absolute()
    leases, started_file = state_dir / "leases", state_dir / "leases-started"
    leases_lock = state_dir / "leases.lock"
    # Not the stack's own lock: start() and stop() take that one themselves.
    with file_lock(leases_lock):
        leases.mkdir(exist_ok=True)
        started = start(state_dir)
        if started:
            before = set(started_file.read_text().split()) if started_file.exists() else set()
            started_file.write_text(" ".join(sorted(before | set(started))))
        lease = leases / str(os.getpid())
        lease.touch()
    try:
        yield stack_env(state_dir)
    finally:
        with file_lock(leases_lock):
            lease.unlink(missing_ok=True)
            others = [p for p in leases.iterdir() if p.name.isdigit() and _pid_alive(int(p.name))]
            if started_file.exists() and not others:
                stop(state_dir, services=started_file.read_text().split())
                started_file.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
