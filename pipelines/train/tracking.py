"""MLflow for the training job: one run per training run, created by the driver and reopened -- by the driver
after a rerun and by rank 0 after a worker restart -- so the loss curve of a resumed run continues in the same
run. The run id lives in `{output}/mlflow_run.json` and in every checkpoint.json.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import mlflow

from pipelines import storage
from pipelines.formats.checkpoints import MARKER_FILE, MODEL_FILE
from pipelines.tracking import use_tracking_server

RUN_FILE = "mlflow_run.json"
KIND_TAG = "clip_ray.kind"
OUTPUT_TAG = "clip_ray.output"
REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """The commit of the code being run, or None outside a git checkout (e.g. a packaged runtime env)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def stored_run(output: str) -> dict[str, str] | None:
    """The run this output belongs to, if a driver already created one."""
    uri = storage.join(output, RUN_FILE)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def start_or_resume_run(cfg, shards: list) -> mlflow.ActiveRun:
    """The active run for this output: reopened if one exists, else created with the config as params,
    the git commit, the contract's tags and the shards as a dataset input."""
    previous = stored_run(cfg.output)
    if previous is not None:
        return mlflow.start_run(run_id=previous["run_id"])

    experiment = mlflow.set_experiment(cfg.experiment)
    tags = {KIND_TAG: "train", OUTPUT_TAG: cfg.output, "model": cfg.model}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = mlflow.start_run(experiment_id=experiment.experiment_id, run_name=cfg.run_name, tags=tags)
    mlflow.log_params(cfg.flat_params())
    log_dataset(cfg.data, shards)
    record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}
    storage.write_bytes(storage.join(cfg.output, RUN_FILE), json.dumps(record).encode())
    return run


def log_dataset(data: list[str], shards: list) -> None:
    """The shards trained on, with their sample counts, as an MLflow dataset input of the run."""
    import pandas as pd

    frame = pd.DataFrame({"uri": [s.uri for s in shards], "num_samples": [s.num_samples for s in shards]})
    dataset = mlflow.data.from_pandas(
        frame, source=data[0] if len(data) == 1 else ",".join(data), name="train"
    )
    mlflow.log_input(dataset, context="training")
    mlflow.log_params({"data_shards": len(shards), "data_samples": int(frame["num_samples"].sum())})


def open_from_worker(run_id: str, tracking_uri: str) -> mlflow.ActiveRun:
    """Rank 0's handle on the driver's run, sampling system metrics (CPU, memory, GPU) on its node every
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10). They need psutil, which Ray ships in
    ray/thirdparty_files and puts on sys.path when imported, so a Ray worker has it. `tracking_uri` is the
    driver's, without credentials: the worker's own environment supplies them (pipelines.tracking)."""
    use_tracking_server(tracking_uri)
    return mlflow.start_run(run_id=run_id, log_system_metrics=True)


def log_checkpoint(uri: str, kept: list[str]) -> None:
    # Tags rather than params: params are immutable in MLflow and every checkpoint moves these on.
    mlflow.set_tags({"checkpoint_uri": uri, "checkpoints": ",".join(kept)})


def register_final_model(model_uri: str, step: int, name: str, info: dict[str, Any]) -> str:
    """Log the final model.pt as a run artifact and register it; returns the registered version."""
    import tempfile

    run_id = mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    if tags.get("registered_model") == name and tags.get("registered_model_step") == str(step):
        # A rerun of a finished job: the final model is registered already.
        return tags["registered_model_version"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, MODEL_FILE).write_bytes(storage.read_bytes(model_uri))
        Path(tmp, MARKER_FILE).write_text(json.dumps(info, indent=2))
        mlflow.log_artifacts(tmp, artifact_path="final_model")
    try:
        client.create_registered_model(name, description="CLIP checkpoints trained by pipelines.train")
    except mlflow.exceptions.MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # The version points at the plain artifact folder (model.pt + checkpoint.json), not at an MLmodel:
    # it is loaded with clip_core or open_clip, which need no MLflow flavour.
    version = client.create_model_version(
        name,
        source=mlflow.get_artifact_uri("final_model"),
        run_id=run_id,
        tags={"step": str(step), "checkpoint_uri": model_uri},
    )
    mlflow.set_tags(
        {
            "registered_model": name,
            "registered_model_version": str(version.version),
            "registered_model_step": str(step),
        }
    )
    return str(version.version)
