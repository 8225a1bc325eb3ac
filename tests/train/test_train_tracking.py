"""Credentials of the training job reach its workers through the environment only: the loop config that Ray
records, the filesystem Ray pickles, the files and MLflow data the driver writes and its log lines hold none,
and rank 0 still authenticates -- on the stack with MLflow basic-auth and Ray token authentication."""

from __future__ import annotations

import json
import pickle
import urllib.request
import uuid
from pathlib import Path

import mlflow
import mlflow.tracking._tracking_service.utils as mlflow_tracking_utils
import pytest
from mlflow.exceptions import MlflowException

from pipelines import storage
from pipelines.train import job, tracking
from pipelines.train.config import TrainConfig
from pipelines.train.data import Shard
from tests.deploy.test_local_stack import _job_submit, _stranger_env
from tests.paths import REPO

SHARDS = [Shard("s3://clip-data/shards/00000.tar", 64), Shard("s3://clip-data/shards/00001.tar", 64)]


def _config(output: str, **fields) -> TrainConfig:
    return TrainConfig(
        data=["s3://clip-data/shards"], model="ViT-Tiny-16", steps=2, batch_size=2, output=output, **fields
    )


@pytest.fixture
def fresh_tracking(monkeypatch):
    # MLflow keeps the tracking URI in a global and in os.environ; the job also sets the credential variables.
    monkeypatch.setattr(mlflow_tracking_utils, "_tracking_uri", None)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    mlflow.end_run()


@pytest.mark.parametrize(
    "tracking_uri",
    [
        "http://user:secret@127.0.0.1:5050",
        "https://user:secret@mlflow.example.com/tracking",
        "http://secret@127.0.0.1:5050",  # a token in the user-name part
        "http://user:secret%21@127.0.0.1:5050",
    ],
)
def test_the_loop_config_handed_to_the_workers_holds_no_credential(tmp_path, tracking_uri):
    cfg = _config(str(tmp_path / "run"))
    given = job.loop_config(cfg, SHARDS, "run-id", "7", tracking_uri)
    assert "secret" not in json.dumps(given) and "secret" not in repr(given)
    assert "@" not in given["mlflow_tracking_uri"]
    assert given["mlflow_tracking_uri"].split("//")[1].split("/")[0] in (
        "127.0.0.1:5050",
        "mlflow.example.com",
    )
    assert given["cfg"] == cfg.model_dump(mode="json") and given["mlflow_run_id"] == "run-id"


def test_the_loop_config_defaults_to_the_drivers_tracking_uri_without_its_password(tmp_path, fresh_tracking):
    fresh_tracking.setenv("MLFLOW_TRACKING_URI", "http://jobs:hunter2@127.0.0.1:5050")
    given = job.loop_config(_config(str(tmp_path / "run")), SHARDS, "run-id", "7")
    assert given["mlflow_tracking_uri"] == "http://127.0.0.1:5050"


def test_the_filesystem_ray_train_pickles_carries_no_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-secret-access-key")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    filesystem, path = job.ray_storage(_config("s3://clip-data/runs/a"))
    assert path == "clip-data/runs/a/ray"
    shipped = pickle.dumps(filesystem)
    assert b"hunter2-secret-access-key" not in shipped and b"AKIAEXAMPLEKEY" not in shipped
    assert b"127.0.0.1:8333" in shipped  # the endpoint still travels
    # The same helper with keys, as pyarrow readers inside tasks use it, would have carried them.
    assert b"hunter2-secret-access-key" in pickle.dumps(storage.pyarrow_filesystem("s3://clip-data/x")[0])


# A Ray job on the stack does what rank 0 does with the loop config: it opens the driver's run from a Ray
# worker process, whose environment is the cluster's, and logs a metric there.
RANK_ZERO = """
import json, sys
import mlflow, ray
from pipelines.train import tracking

config = json.load(open(sys.argv[1]))

@ray.remote(num_cpus=1)
def rank_zero(config):
    with tracking.open_from_worker(config["mlflow_run_id"], config["mlflow_tracking_uri"]):
        mlflow.log_metric("rank_zero_authenticated", 1.0, step=1)
    return mlflow.get_tracking_uri()

ray.init()
print("rank 0 used", ray.get(rank_zero.remote(config)))
"""


@pytest.mark.timeout(600)
def test_a_driver_given_credentials_in_its_uri_records_none_and_rank_zero_authenticates_from_its_environment(
    auth_stack, fresh_tracking, tmp_path, capfd
):
    password = auth_stack.env["MLFLOW_TRACKING_PASSWORD"]
    server = auth_stack.config.mlflow_uri
    fresh_tracking.setenv("MLFLOW_TRACKING_URI", server.replace("://", f"://admin:{password}@"))
    cfg = _config(str(tmp_path / "run"), experiment=f"tests-train-auth-{uuid.uuid4().hex[:8]}")

    with job.tracked_run(cfg, SHARDS) as (run, worker_config):
        mlflow.log_metric("driver_authenticated", 1.0)
    run_id = run.info.run_id
    assert worker_config["mlflow_tracking_uri"] == server and worker_config["mlflow_run_id"] == run_id
    config_file = tmp_path / "loop_config.json"
    config_file.write_text(json.dumps(worker_config))

    # Nothing the driver wrote or printed holds the password: the loop config, the files beside the output,
    # the run's params, tags, inputs and logged config, and MLflow's own "View run" lines.
    written = [config_file, *sorted((tmp_path / "run").iterdir())]
    assert {p.name for p in written} >= {"loop_config.json", job.CONFIG_FILE, tracking.RUN_FILE}
    client = mlflow.MlflowClient()
    logged = client.download_artifacts(run_id, job.CONFIG_FILE, str(tmp_path / "artifacts"))
    recorded = [p.read_text() for p in [*written, Path(logged)]]
    recorded.append(json.dumps(client.get_run(run_id).to_dictionary()))
    printed = capfd.readouterr()
    assert "View run" in printed.out + printed.err
    recorded.append(printed.out + printed.err)
    assert [text for text in recorded if password in text] == []
    assert client.get_run(run_id).data.params["model"] == "ViT-Tiny-16"

    # Rank 0 in a Ray worker of the stack: the bare URI from the loop config, credentials from the cluster's
    # environment (the stack's head has MLFLOW_TRACKING_USERNAME/PASSWORD), the token from the stack's file.
    submitted = _job_submit(
        _stranger_env(tmp_path) | auth_stack.env, auth_stack.config.ray_dashboard_url,
        "python", "-c", RANK_ZERO, str(config_file), runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert f"rank 0 used {server}" in submitted.stdout
    assert password not in submitted.stdout + submitted.stderr  # the job's log, "View run" line included
    assert [m.value for m in client.get_metric_history(run_id, "rank_zero_authenticated")] == [1.0]

    # What Ray recorded about the job (entrypoint, runtime env, metadata) holds no credential either.
    token = Path(auth_stack.env["RAY_AUTH_TOKEN_PATH"]).read_text()
    request = urllib.request.Request(
        f"{auth_stack.config.ray_dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as reply:
        jobs = reply.read().decode()
    assert str(config_file) in jobs and password not in jobs

    # The bare URI alone does not authenticate: without credentials in its environment rank 0 is refused.
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        fresh_tracking.delenv(name)
    fresh_tracking.setenv("MLFLOW_TRACKING_URI", server)
    with pytest.raises(MlflowException, match="401"):
        tracking.open_from_worker(run_id, worker_config["mlflow_tracking_uri"])
