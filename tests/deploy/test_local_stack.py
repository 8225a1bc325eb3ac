"""The local stack against its real services: a fresh stack from nothing (own state dir, own ports), then the
shared stack used through boto3, pyarrow, fsspec, the MLflow client, a Ray driver and `ray job submit`, and a
stack with Ray token authentication and MLflow basic-auth that turns away clients without its secrets."""

import base64
import contextlib
import json
import os
import random
import shlex
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from infra.local import processes, services, stack, state
from pipelines import storage
from tests.paths import REPO

# Every test here runs the stack's services: the shared stack, or stacks of its own on free ports.
pytestmark = pytest.mark.stack


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _free_ports(count: int, with_grpc_twin: bool = False) -> list[int]:
    """Ports free now (and, for SeaweedFS, free at +10000 too), distinct from the stack's defaults."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(20000, 45000)
        twins = [port, port + 10000] if with_grpc_twin else [port]
        if all(_port_free(p) for p in twins) and not set(twins) & set(chosen):
            chosen.append(port)
    return chosen


def _config_on_free_ports(**settings) -> services.StackConfig:
    """A stack config whose every port is free now and differs from the shared stack's."""
    s3, master, volume, filer, admin = _free_ports(5, with_grpc_twin=True)
    mlflow_port, ray_port, dashboard, client, agent = _free_ports(5)
    return services.StackConfig(
        s3_port=s3,
        seaweed_master_port=master,
        seaweed_volume_port=volume,
        seaweed_filer_port=filer,
        seaweed_admin_port=admin,
        mlflow_port=mlflow_port,
        ray_port=ray_port,
        ray_dashboard_port=dashboard,
        ray_client_port=client,
        ray_agent_port=agent,
        **settings,
    )


def _start_flags(config: services.StackConfig) -> list[str]:
    """`start` flags for the ports and sizes of a config (authentication has flags of its own)."""
    return [
        f"--{name.replace('_', '-')}={value}"
        for name, value in vars(config).items()
        if value is not None and name not in services.AUTH_SETTINGS
    ]


def _cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infra.local", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_fresh_stack_starts_from_nothing_restarts_as_noop_and_stops_without_orphans(tmp_path):
    # A long state dir path on purpose: Ray's sockets must then move to a short directory under /tmp.
    state_dir = tmp_path / "a-fresh-state-directory-with-a-long-name"
    config = _config_on_free_ports(ray_num_cpus=1, ray_object_store_bytes=100 * 1024 * 1024)
    s3, mlflow_port, ray_port, dashboard = (
        config.s3_port,
        config.mlflow_port,
        config.ray_port,
        config.ray_dashboard_port,
    )
    flags = _start_flags(config)
    try:
        first = _cli("start", "--state-dir", str(state_dir), *flags)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "started seaweedfs, mlflow, ray" in first.stdout

        # The recorded ports are reused without flags; everything is healthy, so nothing is started.
        second = _cli("start", "--state-dir", str(state_dir))
        assert second.returncode == 0, second.stdout + second.stderr
        assert second.stdout.count("already running and healthy") == 3
        assert "nothing to do" in second.stdout

        report = _cli("status", "--state-dir", str(state_dir))
        assert report.returncode == 0, report.stdout
        lines = report.stdout.splitlines()
        assert [line.split()[:2] for line in lines] == [[s.name, "healthy"] for s in services.SERVICES]
        assert (
            f"http://127.0.0.1:{s3}" in report.stdout and f"http://127.0.0.1:{mlflow_port}" in report.stdout
        )

        exported = dict(
            shlex.split(line.removeprefix("export "))[0].split("=", 1)
            for line in (state_dir / "env").read_text().splitlines()
            if line.startswith("export ")
        )
        assert exported["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{s3}"
        assert exported["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"
        assert exported["RAY_ADDRESS"] == f"127.0.0.1:{ray_port}"
        assert exported == stack.stack_env(state_dir)

        runtime_dir = Path((state_dir / "runtime_dir").read_text().strip())
        assert runtime_dir != state_dir and len(str(runtime_dir / "ray")) <= state.MAX_SHORT_DIR_LEN
        assert any(runtime_dir.glob("ray/session_*/sockets/raylet"))

        records = [json.loads(p.read_text()) for p in sorted((state_dir / "run").glob("*.json"))]
        assert len(records) == 3
        pids = [pid for r in records for pid in processes.session_processes(r, processes.process_table())]
        assert len(pids) > 3  # Ray and MLflow each run several
    finally:
        stopped = _cli("stop", "--state-dir", str(state_dir))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    table = processes.process_table()
    assert [pid for pid in pids if pid in table and not table[pid].zombie] == []
    assert [
        p for p in services.SEAWEEDFS.ports(config) + [mlflow_port, ray_port, dashboard] if _listening(p)
    ] == []
    assert not runtime_dir.exists()
    down = _cli("status", "--state-dir", str(state_dir))
    assert down.returncode == 1 and down.stdout.count("DOWN") == 3
    again = _cli("stop", "--state-dir", str(state_dir))
    assert again.returncode == 0 and again.stdout.count("not running") == 3


def test_status_reports_every_service_of_the_shared_stack_healthy(local_stack):
    report = stack.status(local_stack.state_dir)
    assert [(s.name, s.healthy) for s in report] == [(s.name, True) for s in services.SERVICES], report


def test_s3_objects_written_by_one_client_library_are_read_by_the_others(local_stack, s3_prefix):
    settings = local_stack.s3_settings
    bucket, prefix = storage.split_s3(s3_prefix)

    client = storage.boto3_client(settings)
    client.put_object(Bucket=bucket, Key=f"{prefix}/from-boto3.bin", Body=b"written by boto3")
    arrow_fs, arrow_path = storage.pyarrow_filesystem(f"{s3_prefix}/from-boto3.bin", settings)
    with arrow_fs.open_input_stream(arrow_path) as f:
        assert f.read() == b"written by boto3"
    fs, path = storage.fsspec_filesystem(f"{s3_prefix}/from-boto3.bin", settings)
    assert fs.cat(path) == b"written by boto3"

    arrow_fs, arrow_path = storage.pyarrow_filesystem(f"{s3_prefix}/from-pyarrow.bin", settings)
    with arrow_fs.open_output_stream(arrow_path) as f:
        f.write(b"written by pyarrow")
    fs, path = storage.fsspec_filesystem(f"{s3_prefix}/from-fsspec.bin", settings)
    fs.pipe(path, b"written by fsspec")

    for name in ("from-pyarrow", "from-fsspec"):
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{name}.bin")["Body"].read()
        assert body == f"written by {name.removeprefix('from-')}".encode()


def test_mlflow_run_is_logged_and_its_artifact_proxied_into_the_bucket(local_stack, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=local_stack.config.mlflow_uri)
    experiment_id = client.create_experiment(f"test-local-stack-{uuid.uuid4().hex[:12]}")
    try:
        run_id = client.create_run(experiment_id).info.run_id
        client.log_param(run_id, "model", "ViT-B-32")
        client.log_metric(run_id, "loss", 2.5, step=1)
        client.log_metric(run_id, "loss", 1.25, step=2)
        note = tmp_path / "note.txt"
        note.write_text("zero-shot top-1 goes here")
        client.log_artifact(run_id, str(note), artifact_path="eval")
        client.set_terminated(run_id)

        run = client.get_run(run_id)
        assert run.data.params == {"model": "ViT-B-32"}
        assert [m.value for m in client.get_metric_history(run_id, "loss")] == [2.5, 1.25]
        assert run.info.status == "FINISHED"
        # Proxied: the client only ever talks to the server, which owns the bucket.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/note.txt"]
        downloaded = client.download_artifacts(run_id, "eval/note.txt", str(tmp_path / "back"))
        assert Path(downloaded).read_text() == "zero-shot top-1 goes here"

        in_bucket = [
            e
            for e in storage.list_files(
                services.MLFLOW_ARTIFACTS_DESTINATION, settings=local_stack.s3_settings
            )
            if run_id in e.uri
        ]
        assert [e.uri.rsplit(f"{run_id}/", 1)[1] for e in in_bucket] == ["artifacts/eval/note.txt"]
        assert storage.read_bytes(in_bucket[0].uri, settings=local_stack.s3_settings) == note.read_bytes()
    finally:
        client.delete_experiment(experiment_id)


def test_ray_task_runs_on_the_head_node_with_the_stack_environment(local_stack):
    import ray

    ray.init(address=local_stack.config.ray_address, logging_level="ERROR", log_to_driver=False)
    try:

        @ray.remote
        def where_am_i(x: int) -> dict:
            import os
            import sys

            return {
                "double": 2 * x,
                "node_ip": ray.util.get_node_ip_address(),
                "s3": os.environ.get("AWS_ENDPOINT_URL"),
                "python": sys.executable,
            }

        seen = ray.get(where_am_i.remote(21), timeout=120)
        assert ray.get_runtime_context().gcs_address == local_stack.config.ray_address
    finally:
        ray.shutdown()
    assert seen["double"] == 42
    assert seen["node_ip"] == "127.0.0.1"
    assert seen["s3"] == local_stack.config.s3_endpoint
    assert Path(seen["python"]).parent == Path(sys.executable).parent


def test_ray_job_submit_runs_an_entrypoint_and_returns_its_output(local_stack):
    marker = f"clip-job-{uuid.uuid4().hex[:8]}"
    entrypoint = f"import os; print('{marker}', os.environ['MLFLOW_TRACKING_URI'])"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    env |= local_stack.env
    job = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "job",
            "submit",
            "--address",
            local_stack.config.ray_dashboard_url,
            "--",
            "python",
            "-c",
            entrypoint,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert job.returncode == 0, job.stdout + job.stderr
    assert f"{marker} {local_stack.config.mlflow_uri}" in job.stdout.splitlines()
    assert "succeeded" in job.stdout


def test_start_fails_clearly_when_a_foreign_program_holds_the_s3_port(tmp_path):
    # The squatter accepts connections and never answers: the health probe must give up, not hang.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", _free_ports(1, with_grpc_twin=True)[0]))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(state.StackError, match=rf"seaweedfs: port\(s\) \[{port}\b.*\] are in use"):
            stack.start(tmp_path / "stack", services.StackConfig(s3_port=port))
    assert not (tmp_path / "stack" / "run" / "seaweedfs.json").exists()


@pytest.mark.parametrize(
    ("service", "field"),
    [(services.MLFLOW, "mlflow_port"), (services.RAY, "ray_dashboard_port")],
    ids=["mlflow", "ray"],
)
def test_a_service_refuses_to_start_on_a_port_held_by_another_program(tmp_path, service, field):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", _free_ports(1)[0]))
        squatter.listen()
        port = squatter.getsockname()[1]
        config = services.StackConfig(**{field: port})
        with pytest.raises(
            state.StackError, match=rf"{service.name}: port\(s\) \[.*\b{port}\b.*\] are in use"
        ):
            stack._start_service(tmp_path / "stack", service, config, timeout_s=5)
    assert not (tmp_path / "stack" / "run" / f"{service.name}.json").exists()


def test_a_failed_start_stops_the_services_it_had_already_started(tmp_path):
    config = _config_on_free_ports()
    s3 = config.s3_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", config.mlflow_port))
        squatter.listen()
        with pytest.raises(state.StackError, match="mlflow: port"):
            stack.start(tmp_path / "stack", config)
    # SeaweedFS came up first; the failed start took it down again.
    assert not _listening(s3)
    assert not (tmp_path / "stack" / "run" / "seaweedfs.json").exists()


# ---------------------------------------------------------------------------------------------------------
# Authentication (`start --ray-auth token --mlflow-auth`): one stack of its own, the `auth_stack` fixture


def _exported(env_file: Path) -> dict[str, str]:
    return dict(
        shlex.split(line.removeprefix("export "))[0].split("=", 1)
        for line in env_file.read_text().splitlines()
        if line.startswith("export ")
    )


def _stranger_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A client's environment without this stack's settings: its own HOME, so no ~/.ray/auth_token of this
    machine is found either."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    return env | {"HOME": str(tmp_path), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} | settings


def _job_submit(env: dict[str, str], address: str, *entrypoint: str, runtime_env: dict | None = None):
    extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    command = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address, *extra]
    return subprocess.run([*command, "--", *entrypoint], capture_output=True, text=True, env=env, timeout=300)


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_auth_stack_keeps_its_secrets_in_private_files_and_off_every_command_line(auth_stack):
    state_dir = auth_stack.state_dir
    token_file = state_dir / "secrets" / "ray_auth_token"
    token, password = token_file.read_text(), auth_stack.env["MLFLOW_TRACKING_PASSWORD"]
    assert len(token) == 64 and len(password) >= 24
    assert stat.S_IMODE((state_dir / "secrets").stat().st_mode) == 0o700
    for path in [*(state_dir / "secrets").iterdir(), state_dir / "env"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    lines = (state_dir / "env").read_text().splitlines()
    assert any(line.startswith("unset RAY_AUTH_TOKEN ") for line in lines)  # it would beat the file
    report = {s.name: s for s in stack.status(state_dir)}
    assert all(s.healthy for s in report.values()) and "(token authentication)" in report["ray"].detail
    exported = _exported(state_dir / "env")
    assert exported == auth_stack.env
    assert exported["RAY_AUTH_MODE"] == "token" and exported["RAY_AUTH_TOKEN_PATH"] == str(token_file)
    assert exported["MLFLOW_TRACKING_USERNAME"] == "admin" and "RAY_AUTH_TOKEN" not in exported

    # Neither secret is in the recorded settings, the recorded commands, the logs, or any command line.
    runtime_dir = Path((state_dir / "runtime_dir").read_text().strip())
    recorded = [
        state_dir / "stack.json",
        state_dir / "mlflow" / "basic_auth.ini",
        *(state_dir / "run").glob("*"),
    ]
    recorded += [p for p in (state_dir / "logs").rglob("*") if p.is_file()]
    recorded += [p for p in (runtime_dir / "ray").rglob("*.log") if p.is_file()]
    assert len(recorded) > 10
    for path in recorded:
        text = path.read_text(errors="replace")
        assert token not in text and password not in text, path
    records = [json.loads(p.read_text()) for p in (state_dir / "run").glob("*.json")]
    pids = [pid for r in records for pid in processes.session_processes(r, processes.process_table())]
    assert len(pids) > 3
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            assert token not in cmdline and password not in cmdline, pid


def test_ray_dashboard_job_api_and_gcs_refuse_clients_without_the_token(auth_stack, tmp_path):
    dashboard = auth_stack.config.ray_dashboard_url
    token = Path(auth_stack.env["RAY_AUTH_TOKEN_PATH"]).read_text()
    assert services.http_get(f"{dashboard}/api/jobs/")[0] == 401
    assert (
        services.http_get(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {'0' * 64}"})[0] == 403
    )
    assert services.http_get(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})[0] == 200

    # `ray job submit` as a stranger: Ray's defaults (no mode set, no token file), then a wrong token.
    marker = f"clip-job-{uuid.uuid4().hex[:8]}"
    entrypoint = ("python", "-c", f"print('{marker}')")
    anonymous = _job_submit(_stranger_env(tmp_path), dashboard, *entrypoint)
    assert anonymous.returncode != 0 and "Authentication required" in anonymous.stderr, anonymous.stderr
    wrong = _job_submit(_stranger_env(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64), dashboard,
                        *entrypoint)  # fmt: skip
    assert wrong.returncode != 0 and "Authentication failed" in wrong.stderr, wrong.stderr
    assert marker not in anonymous.stdout + wrong.stdout

    # A driver that connects to the GCS without the token is turned away too.
    driver = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address='{auth_stack.config.ray_address}')"],
        capture_output=True, text=True, env=_stranger_env(tmp_path, RAY_AUTH_MODE="disabled"), timeout=300,
    )  # fmt: skip
    assert driver.returncode != 0 and "InvalidAuthToken" in driver.stdout + driver.stderr

    # With the stack's environment (its token file), the same submission runs.
    job = _job_submit(_stranger_env(tmp_path) | auth_stack.env, dashboard, *entrypoint)
    assert job.returncode == 0, job.stdout + job.stderr
    assert marker in job.stdout.splitlines() and "succeeded" in job.stdout


def test_mlflow_refuses_requests_without_valid_credentials(auth_stack, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, password = auth_stack.config.mlflow_uri, auth_stack.env["MLFLOW_TRACKING_PASSWORD"]
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert services.http_get(f"{uri}/health")[0] == 200  # health checks stay public
    assert services.http_get(search)[0] == 401
    assert services.http_get(search, headers=_basic("admin", password + "x"))[0] == 401
    assert services.http_get(search, headers=_basic("nobody", password))[0] == 401
    assert services.http_get(search, headers=_basic("admin", password))[0] == 200

    # The Python client authenticates from the two variables that the env file exports, and only so.
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    client = MlflowClient(tracking_uri=uri)
    with pytest.raises(MlflowException, match="401"):
        client.search_experiments(max_results=1)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    experiment_id = client.create_experiment(f"test-auth-stack-{uuid.uuid4().hex[:12]}")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "model", "ViT-B-32")
    assert client.get_run(run_id).data.params == {"model": "ViT-B-32"}
