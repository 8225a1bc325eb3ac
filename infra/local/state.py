"""The state directory of a local stack: where its data, logs, pid files and runtime sockets go, and the S3
credentials and secrets generated into it once, each in a private file."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path

# Ray's unix sockets live under <temp dir>/session_<date>_<pid>/sockets/; a socket path must fit in
# 107 bytes, which leaves about 40 characters for the temp dir itself.
MAX_SHORT_DIR_LEN = 40


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() else None


DEFAULT_STATE_DIR = (_repo_root() or Path.cwd()) / ".stack"


class StackError(RuntimeError):
    """A service could not be started or stopped; the message says which and where its log is."""


def paths(state_dir: Path) -> dict[str, Path]:
    return {
        "config": state_dir / "stack.json",
        "credentials": state_dir / "credentials.json",
        "env": state_dir / "env",
        "lock": state_dir / ".lock",
        "leases": state_dir / "leases",
        "leases_lock": state_dir / "leases.lock",
        "leases_started": state_dir / "leases-started",
        "logs": state_dir / "logs",
        "run": state_dir / "run",
        "seaweedfs": state_dir / "seaweedfs",
        "mlflow": state_dir / "mlflow",
        "runtime_dir_record": state_dir / "runtime_dir",
        "secrets": state_dir / "secrets",
    }


def runtime_dir(state_dir: Path) -> Path:
    """Where unix sockets and Ray's temp dir go: the state dir if its path is short enough, else /tmp."""
    if len(str(state_dir / "ray")) <= MAX_SHORT_DIR_LEN:
        return state_dir
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]
    # Plain /tmp, as Ray itself uses: macOS's per-user temp dir is itself too long.
    tmp = Path("/tmp") if Path("/tmp").is_dir() else Path(tempfile.gettempdir())
    return tmp / f"clip-stack-{digest}"


def log_path(state_dir: Path, service: str) -> Path:
    return paths(state_dir)["logs"] / f"{service}.log"


def record_path(state_dir: Path, service: str) -> Path:
    """The pid file of a running service: its leader's pid and start time, and its command."""
    return paths(state_dir)["run"] / f"{service}.json"


def credentials(state_dir: Path, create: bool) -> dict[str, str] | None:
    """The S3 key pair of this stack, generated once per state dir (never a secret in the repo)."""
    path = paths(state_dir)["credentials"]
    if path.exists():
        return json.loads(path.read_text())
    if not create:
        return None
    creds = {"access_key_id": f"clip{secrets.token_hex(6)}", "secret_access_key": secrets.token_urlsafe(30)}
    write_private(path, json.dumps(creds))
    return creds


def write_private(path: Path, text: str) -> None:
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


def secret_path(state_dir: Path, name: str) -> Path:
    return paths(state_dir)["secrets"] / name


def secret(state_dir: Path, name: str, create: bool = False) -> str:
    path = secret_path(state_dir, name)
    if not path.exists():
        if not create:
            raise StackError(f"{path} is missing; run `python -m infra.local start` again to create it")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, SECRETS[name]())
    return path.read_text()
