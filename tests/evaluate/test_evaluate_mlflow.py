"""The evaluation on the local stack: a training checkpoint folder on S3 evaluated as an MLflow run nested
under its training run (tags, metrics, per-class table, figures, suite config, and the zero-shot curve point
in the training run at the checkpoint's step), and the CLI submitted with `ray job submit` writing its
results JSON to S3."""

from __future__ import annotations

import io
import json
import sys
import time

import mlflow
import pytest
import ray
import torch
from mlflow import MlflowClient

import clip_core
from pipelines import storage
from pipelines.demo import scenes
from pipelines.demo.data import write_classification_folder, write_retrieval_shards
from pipelines.demo.stages import submit
from pipelines.evaluate import config, job

MODEL = "ViT-Tiny-16"
EXPERIMENT = "tests-evaluate"


def write_training_checkpoint(output: str, step: int, run) -> str:
    """A checkpoint folder as the training job writes it (contract: model.pt, then checkpoint.json last)."""
    folder = storage.join(output, "checkpoints", f"step_{step:08d}")
    torch.manual_seed(step)
    buffer = io.BytesIO()
    clip_core.save_checkpoint(clip_core.create_model(MODEL), buffer)
    storage.write_bytes(storage.join(folder, "model.pt"), buffer.getvalue())
    info = {
        "step": step, "model": MODEL, "samples_seen": step * 64, "epoch": 0.1,
        "mlflow_run_id": run.info.run_id, "mlflow_experiment_id": run.info.experiment_id,
        "output": output, "created_at": time.time(), "metrics": {"loss": 3.2},
    }  # fmt: skip
    storage.write_bytes(storage.join(folder, "checkpoint.json"), json.dumps(info).encode())
    return folder


@pytest.fixture
def stack_ray(local_stack_env):
    # Ray workers get the stack's S3 credentials through the runtime environment.
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": dict(local_stack_env)},
    )  # fmt: skip
    yield
    ray.shutdown()


def test_evaluation_run_is_nested_under_the_training_run_with_metrics_table_and_figures(
    local_stack_env, stack_ray, s3_prefix
):
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="train", tags={"clip_ray.kind": "train"}) as training_run:
        mlflow.log_metric("loss", 3.0, step=100)
    checkpoint = write_training_checkpoint(storage.join(s3_prefix, "train"), 100, training_run)
    color = storage.join(s3_prefix, "eval", "color")
    write_classification_folder(color, "color", 24, seed=5, size=32)
    suite = config.validate_suite({"datasets": [{"name": "color", "uri": color}], "example_images": 8})

    cfg = config.EvaluateConfig(checkpoint=checkpoint, model=MODEL, suite=suite, experiment=EXPERIMENT)
    metrics = job.run(cfg).metrics
    assert set(metrics) == {f"zeroshot/color/{m}" for m in ("acc1", "acc5", "mean_per_class_recall")}

    client = MlflowClient()
    found = client.search_runs(
        [training_run.info.experiment_id], filter_string=f"tags.checkpoint_uri = '{checkpoint}'"
    )
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["clip_ray.kind"] == "eval"
    assert run.data.tags["training_run_id"] == training_run.info.run_id
    assert run.data.tags["mlflow.parentRunId"] == training_run.info.run_id
    assert run.data.tags["step"] == "100"
    for name, value in metrics.items():
        assert run.data.metrics[name] == pytest.approx(value)
        # The training run shows the zero-shot curve: the same value at the checkpoint's step.
        history = client.get_metric_history(training_run.info.run_id, name)
        assert [(m.step, m.value) for m in history] == [(100, pytest.approx(value))]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "zeroshot/color")
    }
    for path in ("suite.yaml", "zeroshot/color/per_class.json", "zeroshot/color/confusion_matrix.png",
                 "zeroshot/color/examples.png"):  # fmt: skip
        assert path in artifacts, path
    assert (
        config.validate_suite(
            __import__("yaml").safe_load(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/suite.yaml"))
        )
        == suite
    )
    table = mlflow.load_table("zeroshot/color/per_class.json", run_ids=[run.info.run_id])
    assert list(table["class"]) == sorted(scenes.COLORS) and table["support"].sum() == 24
    assert table["recall"].mean() == pytest.approx(metrics["zeroshot/color/mean_per_class_recall"])
    figure = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/zeroshot/color/examples.png")
    from PIL import Image

    assert Image.open(figure).size[0] > 400  # a grid of 8 images, not an empty canvas

    with pytest.raises(job.EvaluationError, match="was trained as ViT-Tiny-16, not ViT-B-32; pass --model"):
        job.run(cfg.model_copy(update={"model": "ViT-B-32"}))


def test_cli_through_ray_job_submit_writes_results_json_to_s3(local_stack, local_stack_env, s3_prefix):
    checkpoint = storage.join(s3_prefix, "model.pt")
    torch.manual_seed(1)
    buffer = io.BytesIO()
    clip_core.save_checkpoint(clip_core.create_model(MODEL), buffer)
    storage.write_bytes(checkpoint, buffer.getvalue())
    shape = storage.join(s3_prefix, "shape")
    write_classification_folder(shape, "shape", 16, seed=6, size=32)
    retrieval = storage.join(s3_prefix, "retrieval")
    write_retrieval_shards(retrieval, 12, seed=7, size=32, captions_per_image=2)
    suite_uri = storage.join(s3_prefix, "suite.yaml")
    suite_yaml = f"datasets:\n  - {{name: shape, uri: '{shape}'}}\n  - {{name: ret, uri: '{retrieval}', tasks: [zeroshot_retrieval]}}\n"
    storage.write_bytes(suite_uri, suite_yaml.encode())
    results_uri = storage.join(s3_prefix, "results.json")

    submit(
        [sys.executable, "-m", "pipelines.evaluate", "--checkpoint", checkpoint, "--model", MODEL,
         "--config", suite_uri, "--experiment", EXPERIMENT, "--results", results_uri],
        local_stack_env,
    )  # fmt: skip
    results = json.loads(storage.read_bytes(results_uri))
    assert results["checkpoint"] == checkpoint and results["step"] is None
    assert set(results["datasets"]) == {"shape", "ret"}
    assert set(results["datasets"]["shape"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert 0.0 <= results["datasets"]["shape"]["acc1"] <= 1.0
    assert set(results["datasets"]["ret"]) == {
        f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)
    }
    recalls = [results["datasets"]["ret"][f"image_retrieval_recall@{k}"] for k in (1, 5, 10)]
    assert recalls == sorted(recalls) and recalls[-1] > 0  # 10 of 12 images: most captions find theirs
    run = MlflowClient().get_run(results["mlflow_run_id"])
    assert run.data.tags["checkpoint_uri"] == checkpoint and "mlflow.parentRunId" not in run.data.tags
    assert run.data.metrics["zeroshot/shape/acc1"] == pytest.approx(results["datasets"]["shape"]["acc1"])
    # MLflow refuses '@' in metric names: recall@k is logged as recall_at_k.
    assert run.data.metrics["zeroshot/ret/image_retrieval_recall_at_10"] == pytest.approx(recalls[-1])
