"""The training job end to end on the local stack: a 2-worker CPU run of ViT-Tiny-16 on scene shards in the S3
store, submitted with `ray job submit`, has one worker SIGKILLed after its first checkpoint, resumes from that
checkpoint, finishes, learns colour zero-shot, and leaves complete, OpenCLIP-loadable checkpoints and one MLflow
run (params, dataset, metrics continuing through the restart, system metrics, registered model)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import mlflow
import open_clip
import torch

import clip_core
from pipelines import storage
from pipelines.demo import scenes
from pipelines.formats.checkpoints import list_complete, step_uri
from pipelines.ingest import writer
from pipelines.train import checkpoints
from pipelines.train.config import TrainConfig

NUM_SHARDS, PER_SHARD, IMAGE_SIZE = 4, 128, 64
STEPS, BATCH, CHECKPOINT_EVERY, LOG_EVERY = 48, 64, 16, 4


def write_scene_shards(output_uri: str, num_shards: int, per_shard: int, seed: int = 0) -> None:
    """Ingest-format shards of drawn scenes whose captions say what is drawn."""
    for shard_id in range(num_shards):
        rows = []
        for i in range(per_shard):
            index = shard_id * per_shard + i
            scene = scenes.make_scene(index, seed=seed, size=(IMAGE_SIZE, IMAGE_SIZE))
            jpeg = io.BytesIO()
            scene.image.save(jpeg, format="JPEG", quality=90)
            rows.append(
                {
                    "row_index": index, "shard_id": shard_id, "key": f"{shard_id:05d}{i:04d}",
                    "url": f"https://scenes.example/{index}.jpg", "caption": scene.caption, "status": "success",
                    "error_message": None, "width": IMAGE_SIZE, "height": IMAGE_SIZE,
                    "original_width": IMAGE_SIZE, "original_height": IMAGE_SIZE, "sha256": None,
                    "image": jpeg.getvalue(), "image_ext": "jpg",
                }
            )  # fmt: skip
        writer.write_shard(output_uri, shard_id, rows)
    writer.write_manifest(output_uri, expected_shards=num_shards)


def _wait_for(condition, process: subprocess.Popen, timeout_s: float, log_path) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert process.poll() is None, (
            "the job ended before the worker could be killed:\n" + log_path.read_text()
        )
        assert time.time() < deadline, "no checkpoint appeared in time:\n" + log_path.read_text()
        time.sleep(0.5)


def test_two_worker_job_survives_a_killed_worker_and_learns(
    local_stack, local_stack_env, s3_prefix, tmp_path
):
    data_uri, output = storage.join(s3_prefix, "shards"), storage.join(s3_prefix, "run")
    write_scene_shards(data_uri, NUM_SHARDS, PER_SHARD)
    registered = f"tests-clip-ray-tiny-{uuid.uuid4().hex[:8]}"
    ray_jobs = [sys.executable, "-m", "ray.scripts.scripts", "job"]
    address = ["--address", local_stack.config.ray_dashboard_url]
    submission_id = f"tests-train-{uuid.uuid4().hex[:12]}"
    command = [
        *ray_jobs, "submit", *address, "--submission-id", submission_id,
        "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "2"}}),
        "--", sys.executable, "-m", "pipelines.train",
        "--data", data_uri, "--model", "ViT-Tiny-16", "--steps", str(STEPS), "--batch-size", str(BATCH),
        "--workers", "2", "--output", output, "--experiment", "tests-train", "--checkpoint-every",
        str(CHECKPOINT_EVERY), "--log-every", str(LOG_EVERY), "--lr", "2e-3", "--weight-decay", "0.1",
        "--warmup", "5", "--loader-workers", "1", "--shuffle-buffer", "256", "--keep-last", "2",
        "--registered-model", registered,
    ]  # fmt: skip
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **local_stack_env}
        )
    try:
        first = step_uri(storage.join(output, "checkpoints"), CHECKPOINT_EVERY)
        _wait_for(lambda: storage.exists(storage.join(first, "checkpoint.json")), job, 400, log_path)
        victim = json.loads(storage.read_bytes(storage.join(output, "workers", "rank_1.json")))["pid"]
        killed_at_ms = int(time.time() * 1000)
        os.kill(victim, signal.SIGKILL)
        job.wait(timeout=600)
    finally:
        if job.poll() is None:  # the test failed while the job ran: stop it on the cluster too
            job.kill()
            subprocess.run(
                [*ray_jobs, "stop", *address, submission_id], env={**os.environ, **local_stack_env}
            )
    log = log_path.read_text()
    assert job.returncode == 0, log
    assert json.loads(storage.read_bytes(storage.join(output, "workers", "rank_1.json")))["pid"] != victim
    resumed_steps = {
        int(line.split(" at step ")[1].split()[0]) for line in log.splitlines() if "resuming from" in line
    }
    assert resumed_steps and resumed_steps <= {CHECKPOINT_EVERY, 2 * CHECKPOINT_EVERY}, log
    resumed = min(resumed_steps)

    # Checkpoints: complete, pruned to the newest two and the best, the final one at the last step.
    cfg = TrainConfig.from_yaml(storage.read_bytes(storage.join(output, "train_config.yaml")).decode())
    assert cfg.steps == STEPS and cfg.workers == 2 and cfg.data == [data_uri]
    complete = list_complete(cfg.checkpoints_uri)
    final = complete[-1]
    assert final.step == STEPS and 2 <= len(complete) <= 3
    assert final.info["samples_seen"] == STEPS * BATCH
    assert final.info["epoch"] == STEPS * BATCH / (NUM_SHARDS * PER_SHARD)
    assert final.info["output"] == output and final.info["model"] == "ViT-Tiny-16"
    assert final.info["metrics"]["corrupt_samples"] == 0
    run_id = final.info["mlflow_run_id"]

    model_path = tmp_path / "model.pt"
    model_path.write_bytes(storage.read_bytes(final.model_uri))
    open_clip.add_model_config(clip_core.MODEL_CONFIG_DIR)
    theirs = open_clip.create_model("ViT-Tiny-16", pretrained=str(model_path))
    ours = clip_core.create_model("ViT-Tiny-16", pretrained=str(model_path))
    torch.testing.assert_close(theirs.visual.proj, ours.visual.proj)

    # Learning: held-out scenes (another seed) are classified by colour far above the 1-in-8 chance.
    torch.set_num_threads(2)
    accuracy = colour_accuracy(ours, count=256, seed=1000)
    assert accuracy >= 3 / len(scenes.COLORS), accuracy

    # MLflow: one run for the whole training run, continued through the restart.
    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(
        experiment_names=["tests-train"], filter_string=f"tags.`clip_ray.output` = '{output}'"
    )
    assert list(runs["run_id"]) == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["clip_ray.kind"] == "train" and run.data.tags["mlflow.source.git.commit"]
    assert run.data.tags["checkpoint_uri"] == final.uri
    params = run.data.params
    assert (
        params["model"] == "ViT-Tiny-16" and params["batch_size"] == str(BATCH) and params["workers"] == "2"
    )
    assert params["data_samples"] == str(NUM_SHARDS * PER_SHARD) and params["data_shards"] == str(NUM_SHARDS)
    assert not any(
        "SECRET" in value or local_stack_env["AWS_SECRET_ACCESS_KEY"] in value for value in params.values()
    )
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["train"]
    for name in ("loss", "lr", "logit_scale", "samples_per_s", "step_time_s", "data_wait_fraction"):
        assert name in run.data.metrics, name
    assert any(name.startswith("system/") for name in run.data.metrics)

    history = client.get_metric_history(run_id, "loss")
    before = [m.step for m in history if m.timestamp < killed_at_ms]
    after = sorted(m.step for m in history if m.timestamp > killed_at_ms)
    assert before and min(before) == LOG_EVERY
    # After the restart the curve picks up at the checkpoint it resumed from and runs to the last step.
    assert after[0] == resumed + LOG_EVERY and after[-1] == STEPS
    assert set(range(resumed + LOG_EVERY, STEPS + 1, LOG_EVERY)) <= set(after)
    assert history[-1].value < history[0].value

    versions = client.search_model_versions(f"name = '{registered}'")
    assert [(v.run_id, v.tags["step"]) for v in versions] == [(run_id, str(STEPS))]
    artifacts = {a.path for a in client.list_artifacts(run_id, "final_model")}
    assert artifacts == {"final_model/model.pt", "final_model/checkpoint.json"}


def test_restarts_take_the_newest_checkpoint_of_the_output_before_resume(tmp_path):
    from pipelines.train.job import _start_checkpoint

    elsewhere = str(tmp_path / "other-run" / "checkpoints")
    checkpoints.save(elsewhere, 30, {"w": torch.zeros(1)}, {"step": 30}, {"metrics": {}})
    args = ["--data", "/d", "--model", "ViT-Tiny-16", "--steps", "100", "--batch-size", "8"]
    args += ["--output", str(tmp_path / "run")]
    assert _start_checkpoint(TrainConfig.load(args)) is None
    cfg = TrainConfig.load(args + ["--resume", step_uri(elsewhere, 30)])
    assert _start_checkpoint(cfg).step == 30  # --resume starts a new output from any checkpoint
    checkpoints.save(cfg.checkpoints_uri, 40, {"w": torch.zeros(1)}, {"step": 40}, {"metrics": {}})
    assert _start_checkpoint(cfg).step == 40  # after a crash, the run's own newest checkpoint wins


def test_a_rerun_of_the_same_output_continues_the_same_mlflow_run(local_stack, local_stack_env, tmp_path):
    from pipelines.train import data, tracking

    cfg = TrainConfig.load(
        ["--data", "/d", "--model", "ViT-Tiny-16", "--steps", "10", "--batch-size", "8"]
        + ["--output", str(tmp_path / "run"), "--experiment", "tests-train"]
    )
    shards = [data.Shard("/d/00000.tar", 5), data.Shard("/d/00001.tar", 7)]
    with tracking.start_or_resume_run(cfg, shards) as first:
        mlflow.log_metric("loss", 3.0, step=1)
    with tracking.start_or_resume_run(cfg, shards) as second:
        mlflow.log_metric("loss", 2.0, step=2)
    assert second.info.run_id == first.info.run_id
    run = mlflow.MlflowClient().get_run(first.info.run_id)
    assert run.data.params["data_samples"] == "12" and run.data.tags["clip_ray.output"] == cfg.output
    history = mlflow.MlflowClient().get_metric_history(first.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0)]


@torch.no_grad()
def colour_accuracy(model, count: int, seed: int) -> float:
    """Zero-shot colour accuracy of `model` on `count` held-out scenes of stream `seed`."""
    model.eval()
    transform = clip_core.image_transform(IMAGE_SIZE, False)
    drawn = [scenes.make_scene(i, seed=seed) for i in range(count)]
    images = torch.stack([transform(scene.image) for scene in drawn])
    classnames = list(scenes.COLORS)
    classifier = clip_core.build_zero_shot_classifier(
        model, clip_core.tokenize, classnames, scenes.COLOR_PROMPTS
    )
    predicted = (model.encode_image(images, normalize=True) @ classifier).argmax(dim=1)
    truth = torch.tensor([classnames.index(scene.color) for scene in drawn])
    return float((predicted == truth).float().mean())
