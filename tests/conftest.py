"""Shared fixtures: the local stack of real services (S3, MLflow, Ray), started at most once per test session
in the repo's .stack (the one `make demo` uses), reused when it already runs, and stopped at the end only if
this test session started it and no other test session still uses it.
"""

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Ray decides at import time whether 127.0.0.1 may stand for this node; a driver that connects to the
# loopback-only stack needs it before any test module imports ray. Local ray.init() clusters are unaffected.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from infra import local  # noqa: E402
from infra.local.multinode import MultiNodeCluster  # noqa: E402
from pipelines import storage  # noqa: E402


@dataclass(frozen=True)
class LocalStack:
    state_dir: Path
    config: local.StackConfig
    env: dict[str, str]

    @property
    def s3_settings(self) -> storage.S3Settings:
        return storage.S3Settings.from_env(self.env)


@pytest.fixture(scope="session")
def local_stack() -> Iterator[LocalStack]:
    """The shared stack. Several test sessions (several engineers, one machine) may use it at once: each
    holds a lease, and services that tests started are stopped when the last lease goes."""
    state_dir = local.DEFAULT_STATE_DIR
    with local.leased(state_dir) as env:
        yield LocalStack(state_dir, local.load_config(state_dir), env)


@pytest.fixture(scope="session")
def auth_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A stack of its own (a temp state dir, fresh ports: never the shared one) with Ray token authentication
    and MLflow basic-auth on, started by the command line as a user would, and stopped after the session."""
    from tests.deploy.test_local_stack import _cli, _config_on_free_ports, _start_flags

    state_dir = tmp_path_factory.mktemp("auth-stack")
    config = _config_on_free_ports(ray_num_cpus=1, ray_object_store_bytes=100 * 1024 * 1024)
    try:
        started = _cli("start", "--state-dir", str(state_dir), *_start_flags(config), "--ray-auth", "token",
                       "--mlflow-auth")  # fmt: skip
        if started.returncode != 0:
            pytest.fail(f"the stack with authentication did not start:\n{started.stdout}{started.stderr}")
        yield LocalStack(state_dir, local.load_config(state_dir), local.stack_env(state_dir))
    finally:
        _cli("stop", "--state-dir", str(state_dir))


@pytest.fixture
def local_stack_env(local_stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The stack's client environment (AWS_*, MLFLOW_TRACKING_URI, RAY_ADDRESS) for one test."""
    for name in list(os.environ):
        if name.startswith("AWS_"):  # a developer's own profile or session token must not mix in
            monkeypatch.delenv(name)
    for name, value in local_stack.env.items():
        monkeypatch.setenv(name, value)
    return local_stack.env


@pytest.fixture
def s3_prefix(local_stack: LocalStack) -> Iterator[str]:
    """A fresh, empty prefix in the data bucket, deleted afterwards."""
    prefix = f"s3://{local.DATA_BUCKET}/tests/{uuid.uuid4().hex}"
    yield prefix
    storage.delete(prefix, recursive=True, settings=local_stack.s3_settings)


@pytest.fixture
def multinode_ray(
    local_stack: LocalStack, local_stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[MultiNodeCluster]:
    """A Ray cluster of its own with a 0-CPU head on 127.0.0.11 (the shipped cluster's shape); the test adds
    worker nodes (127.0.0.12, ...) and kills them. Every node, and the test, has the stack's S3 settings (the
    shared store), but not its Ray address: Ray's job and state clients prefer RAY_ADDRESS and
    RAY_API_SERVER_ADDRESS to the address they are given."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    s3 = {k: v for k, v in local_stack.env.items() if k.startswith(("AWS_", "MLFLOW_"))}
    with MultiNodeCluster(env=s3) as cluster:
        yield cluster


# ---------------------------------------------------------------------------------------------------------
# Test tiers, by what a test needs (pyproject.toml registers the markers; `make check` deselects all four):
# `stack` the local stack's services, `cluster` a Ray cluster of its own, `browser` Chromium, `slow` minutes
# of work. A test that asks for a stack fixture is marked `stack` here, and one that asks for a fixture named
# `*_ray` (the test modules' own Ray clusters) is marked `cluster`, so no test file can forget them.
STACK_FIXTURES = frozenset({"local_stack", "auth_stack", "local_stack_env", "s3_prefix"})


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if STACK_FIXTURES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.stack)
        if any(name.endswith("_ray") for name in item.fixturenames):
            item.add_marker(pytest.mark.cluster)


# ---------------------------------------------------------------------------------------------------------
# Leaving the interpreter. Ray's, gRPC's and aiohttp's daemon threads can still be inside C code when the
# interpreter finalizes after the last test, and one run of the whole suite segfaulted there (after its
# "N passed" line), turning a green run red. The results are final by then: exit with pytest's status without
# finalizing, after flushing what was printed.
_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _exit_status.append(int(exitstatus))


def pytest_unconfigure(config) -> None:
    if _exit_status and not hasattr(config, "workerinput"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])
