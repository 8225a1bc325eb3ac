"""Starting a scheduled-evaluation pass without waiting for it, as the trainer does every N steps.

With a Ray cluster at hand (RAY_API_SERVER_ADDRESS / RAY_ADDRESS set, or called inside a Ray worker) the pass
is submitted as a Ray job: it outlives the caller (a Ray task would die with the trainer that owns it) and
shows in the dashboard's Jobs tab. Without Ray it is a detached local process.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from dataclasses import dataclass

from pipelines import storage

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class BackgroundPass:
    """A launched pass: `kind` is "ray_job" (id = submission id) or "process" (id = pid)."""

    kind: str
    id: str
    address: str | None = None
    _process: subprocess.Popen | None = None

    def status(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        if self.kind == "ray_job":
            return str(_job_client(self.address).get_job_status(self.id).value)
        code = self._process.poll() if self._process else None
        return "RUNNING" if code is None else "SUCCEEDED" if code == 0 else "FAILED"

    def wait(self, timeout_s: float = 600.0, poll_s: float = 1.0) -> str:
        """Block until the pass ends (or timeout_s passes) and return its status."""
        import time

        deadline = time.monotonic() + timeout_s
        status = self.status()
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(poll_s)
            status = self.status()
        return status

    def logs(self) -> str:
        return _job_client(self.address).get_job_logs(self.id) if self.kind == "ray_job" else ""


def _job_client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _ray_address() -> str | None:
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(name):
            return os.environ[name]
    import ray

    if ray.is_initialized():
        # Inside a Ray worker: the job API's address is found through the cluster's GCS.
        return ray.get_runtime_context().gcs_address
    return None


def launch_background_pass(config_uri: str) -> BackgroundPass:
    """Submit one pass of `python -m pipelines.scheduled_eval --config config_uri` and return at once."""
    if not storage.is_s3(config_uri) and "://" not in config_uri:
        # The pass may start in another working directory.
        config_uri = os.path.abspath(config_uri)
    command = [sys.executable, "-m", "pipelines.scheduled_eval", "--config", config_uri]
    address = _ray_address()
    if address:
        submission_id = f"scheduled-eval-{uuid.uuid4().hex[:12]}"
        _job_client(address).submit_job(entrypoint=shlex.join(command), submission_id=submission_id)
        print(f"[scheduled-eval] submitted Ray job {submission_id} for {config_uri}", flush=True)
        return BackgroundPass("ray_job", submission_id, address)
    process = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL)
    print(f"[scheduled-eval] started pass as process {process.pid} for {config_uri}", flush=True)
    return BackgroundPass("process", str(process.pid), None, process)
