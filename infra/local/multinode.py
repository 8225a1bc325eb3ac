"""A Ray cluster of several nodes on this one machine, for the scale tests and benchmarks: a head and worker
nodes, each its own `ray start` on its own loopback address (127.0.0.11, .12, ...) with its own ports and
temp dir, so that nodes can be added, killed (SIGKILL to every process of the node, as a lost machine) and
counted while a job runs. The head has no CPUs by default, like the shipped ray_cluster.yaml: work goes to the
worker nodes only.

    with MultiNodeCluster(env=s3_env) as cluster:
        cluster.add_node(num_cpus=1)
        client = cluster.job_client()
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infra.local.processes import process_table

HEAD_ADDRESS = "127.0.0.11"
START_TIMEOUT_S = 90.0


def free_port(host: str) -> int:
    """A port free on `host` now; ephemeral ports (32768 and up on Linux) lie above Ray's worker-port range."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Node:
    address: str
    process: subprocess.Popen
    log: Path
    node_id: str | None = None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


@dataclass
class MultiNodeCluster:
    """env: extra environment for every node (S3 settings: tasks inherit their node's environment).
    head_cpus: CPUs the head offers to tasks (0: the driver's node only)."""

    env: dict[str, str] = field(default_factory=dict)
    head_cpus: int = 0
    object_store_bytes: int = 150 * 1024 * 1024
    root: Path | None = None
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    _tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> MultiNodeCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -----------------------------------------------------------------------------------------------------

    @property
    def gcs_address(self) -> str:
        return f"{HEAD_ADDRESS}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HEAD_ADDRESS}:{self.dashboard_port}"

    def node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | self.env
        env |= {
            # Explicit, so that a token file in ~/.ray from another cluster does not switch it on here.
            "RAY_AUTH_MODE": "disabled",
            # Ray reads this as "multi-node clusters allowed" (the local stack sets it to 0: one node only).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            # A lost node is declared dead after about 10 s rather than the default ~30 s; not sooner, as a
            # loaded 2-core machine can miss a few checks of a live node.
            "RAY_health_check_period_ms": "2000",
            "RAY_health_check_failure_threshold": "5",
        }
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def driver_env(self) -> dict[str, str]:
        """What a driver process (or `ray job submit`) needs to reach this cluster."""
        return self.node_env() | {
            "RAY_ADDRESS": self.gcs_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
        }

    def start(self) -> None:
        if self.root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ray-nodes-", dir="/tmp")
            self.root = Path(self._tmp.name)
        self.gcs_port = free_port(HEAD_ADDRESS)
        self.dashboard_port = free_port(HEAD_ADDRESS)
        head = [
            "--head",
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            f"--dashboard-host={HEAD_ADDRESS}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port(HEAD_ADDRESS)}",
            f"--num-cpus={self.head_cpus}",
            "--num-gpus=0",
        ]
        self._start_node(HEAD_ADDRESS, head)
        self.wait_for_nodes(1)

    def add_node(self, num_cpus: int = 1, num_gpus: int = 0, resources: str | None = None) -> Node:
        """Start a worker node on the next loopback address and wait until the cluster counts it."""
        address = f"127.0.0.{11 + len(self.nodes)}"
        flags = [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}"]
        if resources:
            flags.append(f"--resources={resources}")
        node = self._start_node(address, flags)
        self.wait_for_nodes(len(self.alive_nodes()))
        return node

    def _start_node(self, address: str, flags: list[str]) -> Node:
        assert self.root is not None
        index = len(self.nodes)
        temp_dir = self.root / f"n{index}"  # short: Ray's socket paths must stay under 108 bytes
        temp_dir.mkdir(parents=True, exist_ok=True)
        names = (
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "dashboard-agent-grpc-port",
            "dashboard-agent-listen-port",
            "runtime-env-agent-port",
        )
        # Each port is free when drawn but not held, so the kernel may hand the same one out twice; Ray refuses
        # a node whose components share a port.
        drawn: set[int] = set()
        while len(drawn) < len(names):
            drawn.add(free_port(address))
        ports = dict(zip(names, sorted(drawn)))
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *flags]
        command += [f"--node-ip-address={address}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        command += [f"--object-store-memory={self.object_store_bytes}"]
        command += [f"--{name}={port}" for name, port in ports.items()]
        log = self.root / f"node{index}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command, env=self.node_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = Node(address, process, log)
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray's state API of this cluster's dashboard (`nodes`, `tasks`, `actors`...), filtered by equality.
        Asked over HTTP, because ray.util.state prefers RAY_API_SERVER_ADDRESS (another cluster's, say) to
        the address it is given."""
        query = [("limit", "10000"), ("detail", "1")]
        for key, value in filters.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        url = f"{self.dashboard_url}/api/v0/{resource}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())["data"]["result"]["result"]

    def ray_nodes(self) -> list[dict]:
        """Every node the GCS knows, alive or dead."""
        return self.state("nodes")

    def wait_for_nodes(self, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until `count` nodes are alive in the GCS's view (and record each node's id by its address)."""
        deadline = time.monotonic() + timeout_s
        last_error = ""
        while time.monotonic() < deadline:
            for node in self.nodes:
                if not node.alive and node.node_id is None:
                    raise RuntimeError(
                        f"the Ray node on {node.address} exited:\n{node.log.read_text()[-3000:]}"
                    )
            try:
                listed_nodes = self.ray_nodes()
                last_error = ", ".join(f"{n['node_ip']} {n['state']}" for n in listed_nodes)
                alive = [n for n in listed_nodes if n["state"] == "ALIVE"]
            except Exception as error:  # the dashboard is not up yet
                last_error = str(error)
                time.sleep(1.0)
                continue
            for node in self.nodes:
                for listed in alive:
                    if listed["node_ip"] == node.address:
                        node.node_id = listed["node_id"]
            if len(alive) >= count:
                return
            time.sleep(0.5)
        logs = "\n".join(
            f"--- {n.address}:\n{n.log.read_text()[-1500:]}" for n in self.nodes if n.log.exists()
        )
        raise TimeoutError(f"{count} Ray nodes were not up within {timeout_s:.0f} s ({last_error})\n{logs}")

    def kill_node(self, node: Node) -> None:
        """SIGKILL every process of the node (raylet, object store, workers): a lost machine, nothing cleaned."""
        for pid in self._processes_of(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait(timeout=30)

    def node_of_pid(self, pid: int) -> Node | None:
        """The node whose `ray start` session a process (a task's worker, say) belongs to."""
        for node in self.nodes:
            if pid in self._processes_of(node):
                return node
        return None

    def _processes_of(self, node: Node) -> list[int]:
        table = process_table()
        sessions = {node.process.pid}
        members = {p.pid for p in table.values() if p.sid in sessions}
        # Descendants that started sessions of their own (Ray's workers do not, but be thorough).
        changed = True
        while changed:
            changed = False
            for p in table.values():
                if p.pid not in members and p.ppid in members:
                    members.add(p.pid)
                    changed = True
        return sorted(members)

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url)

    def wait_for_job(self, job_id: str, timeout_s: float = 600):
        """Until a submitted job ends: its final JobStatus and its logs. A job still running after timeout_s
        is stopped and TimeoutError raised with its log's tail."""
        client = self.job_client()
        deadline = time.monotonic() + timeout_s
        while not (status := client.get_job_status(job_id)).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise TimeoutError(
                    f"job {job_id} still running after {timeout_s:.0f} s:\n{client.get_job_logs(job_id)[-5000:]}"
                )
            time.sleep(1.0)
        return status, client.get_job_logs(job_id)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for node in self.nodes:
            for pid in self._processes_of(node):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._tmp is not None:
            self._tmp.cleanup()
