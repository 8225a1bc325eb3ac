"""The demo's quickstart job, submitted to the local stack's Ray head: it trains, logs to MLflow, writes an
OpenCLIP-loadable checkpoint to the S3 store and beats chance at zero-shot colour classification."""

from __future__ import annotations

import io
import json
import sys

import mlflow
import open_clip
import torch

import clip_core
from pipelines import demo, storage


def test_quickstart_job_trains_logs_and_writes_a_loadable_checkpoint(local_stack, local_stack_env, s3_prefix):
    demo.submit(
        [sys.executable, "-m", "pipelines.quickstart", "--output", s3_prefix, "--steps", "80"]
        + ["--train-scenes", "1024", "--eval-scenes", "256", "--experiment", "tests-quickstart"],
        local_stack_env,
    )
    result = json.loads(storage.read_bytes(storage.join(s3_prefix, "result.json")))

    # Colour is learned first; after 80 steps it is far above the 1-in-8 chance.
    assert result["zeroshot/scenes-color/acc1"] >= 3 * result["chance/scenes-color"]

    run = mlflow.MlflowClient().get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "ViT-Tiny-16"
    assert run.data.metrics["zeroshot/scenes-color/acc1"] == result["zeroshot/scenes-color/acc1"]
    losses = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")]
    assert len(losses) >= 8 and losses[-1] < losses[0]

    state_dict = torch.load(io.BytesIO(storage.read_bytes(result["checkpoint"])), weights_only=True)
    open_clip.add_model_config(clip_core.MODEL_CONFIG_DIR)
    theirs = open_clip.create_model("ViT-Tiny-16")
    theirs.load_state_dict(state_dict, strict=True)
