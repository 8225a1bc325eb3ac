"""The local stack: an S3 store (SeaweedFS), an MLflow tracking server and a Ray head node, all on loopback.
Started, checked and stopped from here by `python -m infra.local` and by the tests, with every piece of
state (data, logs, pids, credentials, env file) under one directory that can be deleted. Ray token
authentication and MLflow basic-auth are off by default (loopback only) and on with `ray_auth="token"` and
`mlflow_auth=True`, their secrets generated into the state directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.local import processes
from infra.local.services import SERVICES, Service, StackConfig, client_env, port_taken
from infra.local.state import (
    DEFAULT_STATE_DIR,
    StackError,
    credentials,
    log_path,
    paths,
    runtime_dir,
    secret,
    write_private,
)
from pipelines.locks import file_lock


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    healthy: bool
    pid: int | None
    url: str
    detail: str


def load_config(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> StackConfig:
    """The config recorded by the last start in this state dir, or the defaults."""
    path = paths(Path(state_dir))["config"]
    if not path.exists():
        return StackConfig()
    return StackConfig(**json.loads(path.read_text()))


def stack_env(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> dict[str, str]:
    """Environment variables that point S3, MLflow and Ray clients at this stack."""
    state_dir = Path(state_dir).absolute()
    creds = credentials(state_dir, create=False)
    if creds is None:
        raise StackError(f"no local stack in {state_dir}; run `python -m infra.local start` first")
    return client_env(state_dir, load_config(state_dir), creds)


def _write_env_file(state_dir: Path) -> Path:
    path = paths(state_dir)["env"]
    lines = [f"# Local stack in {state_dir}. Use it from a shell with: source {path}"]
    env = stack_env(state_dir)
    if env["RAY_AUTH_MODE"] == "token":
        lines.append("unset RAY_AUTH_TOKEN  # a token for another cluster would win over RAY_AUTH_TOKEN_PATH")
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    write_private(path, "\n".join(lines) + "\n")
    return path


def _needed_secrets(config: StackConfig) -> list[str]:
    needed = ["ray_auth_token"] if config.ray_auth == "token" else []
    return needed + (["mlflow_admin_password", "mlflow_flask_secret_key"] if config.mlflow_auth else [])


# ---------------------------------------------------------------------------------------------------------
# start / status / stop


def _say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def _log_tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in tail)


def _start_service(state_dir: Path, service: Service, config: StackConfig, timeout_s: float) -> None:
    name, log = service.name, log_path(state_dir, service.name)
    taken = [p for p in service.ports(config) if port_taken(p)]
    if taken:
        raise StackError(
            f"{name}: port(s) {taken} are in use by another program, so {name} cannot start. "
            f"Stop that program or choose other ports (see `python -m infra.local start --help`)."
        )
    command, env, cwd = service.command(state_dir, config)
    pid = processes.spawn(state_dir, name, command, env, cwd)
    _say(f"{name}: started pid {pid}, waiting for it to be healthy (log: {log})")
    began = time.monotonic()
    while True:
        healthy, detail = service.health(state_dir, config)
        if healthy:
            _say(f"{name}: healthy after {time.monotonic() - began:.1f}s ({detail})")
            return
        exited = not processes.leader_alive(processes.read_record(state_dir, name))
        if exited or time.monotonic() - began > timeout_s:
            why = "exited" if exited else f"was not healthy after {timeout_s:g}s"
            processes.kill(state_dir, name)
            raise StackError(f"{name} {why} ({detail}). See its log: {log}\n{_log_tail(log)}")
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
    with file_lock(paths(state_dir)["lock"]):
        recorded = load_config(state_dir)
        config = recorded if config is None else config
        if config != recorded and any(
            processes.leader_alive(processes.read_record(state_dir, s.name)) for s in SERVICES
        ):
            raise StackError(
                f"the stack in {state_dir} runs with other settings ({recorded}); stop it before changing them"
            )
        paths(state_dir)["config"].write_text(json.dumps(dataclasses.asdict(config), indent=1))
        credentials(state_dir, create=True)
        for name in _needed_secrets(config):
            secret(state_dir, name, create=True)
        runtime = runtime_dir(state_dir)
        paths(state_dir)["runtime_dir_record"].write_text(f"{runtime}\n")
        if runtime != state_dir:
            _say(f"state dir path is too long for unix sockets; Ray's temp dir and sockets go to {runtime}")
        env_file = _write_env_file(state_dir)
        started: list[str] = []
        for service in SERVICES:
            healthy, detail = service.health(state_dir, config)
            if healthy:
                _say(f"{service.name}: already running and healthy at {service.url(config)}")
                continue
            if processes.leader_alive(processes.read_record(state_dir, service.name)):
                # Ours but unhealthy (hung, or half-started by a killed start): replace it.
                _say(f"{service.name}: running but unhealthy ({detail}); restarting it")
                processes.kill(state_dir, service.name)
            try:
                _start_service(state_dir, service, config, timeout_s or service.health_timeout_s)
            except StackError:
                # Leave nothing half-started: what this call started goes down with the one that failed.
                for done in reversed(started):
                    processes.kill(state_dir, done)
                raise
            started.append(service.name)
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
        record = processes.read_record(state_dir, service.name)
        pid = record["pid"] if processes.leader_alive(record) else None
        healthy, detail = service.health(state_dir, config)
        if healthy and pid is None:
            detail += " (not started from this state dir)"
        report.append(ServiceStatus(service.name, healthy, pid, service.url(config), detail))
    return report


def stop(state_dir: str | os.PathLike = DEFAULT_STATE_DIR, services: list[str] | None = None) -> None:
    """Stop the services (all by default), newest first. Safe to run when nothing runs."""
    state_dir = Path(state_dir).absolute()
    with file_lock(paths(state_dir)["lock"]):
        for service in reversed(SERVICES):
            if services is not None and service.name not in services:
                continue
            if processes.read_record(state_dir, service.name) is None:
                _say(f"{service.name}: not running")
                continue
            killed = processes.kill(state_dir, service.name)
            _say(
                f"{service.name}: stopped"
                + (f" ({len(killed)} processes)" if killed else " (was not running)")
            )
        runtime = runtime_dir(state_dir)
        nothing_left = not any(processes.read_record(state_dir, s.name) for s in SERVICES)
        if nothing_left and runtime != state_dir and runtime.exists():
            # Outside the state dir: it would otherwise outlive `rm -rf <state-dir>`.
            shutil.rmtree(runtime, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Leases: one stack shared by several client processes on one machine (test sessions, benchmarks).


@contextlib.contextmanager
def leased(state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> Iterator[dict[str, str]]:
    """Start what is not running and hold a lease on the stack while inside; yields the client environment.
    On the way out, the services that lease holders started are stopped once no other holder is alive, so a
    finishing test session never stops the stack under another one, and a stack started by `make demo` or
    `python -m infra.local start` stays up."""
    state_dir = Path(state_dir).absolute()
    where = paths(state_dir)
    leases, started_file = where["leases"], where["leases_started"]
    # Not the stack's own lock: start() and stop() take that one themselves.
    with file_lock(where["leases_lock"]):
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
        with file_lock(where["leases_lock"]):
            lease.unlink(missing_ok=True)
            others = [p for p in leases.iterdir() if p.name.isdigit() and processes.pid_alive(int(p.name))]
            if started_file.exists() and not others:
                stop(state_dir, services=started_file.read_text().split())
                started_file.unlink()
