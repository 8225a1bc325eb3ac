"""Elastic training on a cluster of several nodes: a run of 1 to 2 workers, submitted as an operator does,
loses the node of one worker right after a checkpoint, goes on with the one worker left from that checkpoint
(accumulating twice the micro-batches, so the global batch stays the same), and finishes at its last step in
the same MLflow run."""

from __future__ import annotations

import os
import sys
import time
import uuid

import mlflow
import pytest
from ray.job_submission import JobStatus

from pipelines import failpoints, storage
from pipelines.formats.checkpoints import list_complete
from tests.paths import REPO
from tests.train.test_train_job import write_scene_shards

NUM_SHARDS, PER_SHARD = 2, 32
STEPS, BATCH, CHECKPOINT_EVERY, LOG_EVERY = 12, 16, 4, 2
KILLED_AFTER = CHECKPOINT_EVERY  # the checkpoint step at which rank 1's node is lost


def submit_training(cluster, data_uri: str, output: str, pause_dir, extra_env=None) -> str:
    """`ray job submit` of the training job, as an operator would, with the worktree's code on every node."""
    env = {
        "PYTHONPATH": str(REPO),
        failpoints.PAUSE_ENV: f"train.checkpoint_saved:{KILLED_AFTER}",
        failpoints.PAUSE_DIR_ENV: str(pause_dir),
        failpoints.PAUSE_TIMEOUT_ENV: "180",
        **(extra_env or {}),
    }
    entrypoint = [
        sys.executable, "-m", "pipelines.train", "--data", data_uri, "--model", "ViT-Tiny-16",
        "--steps", str(STEPS), "--batch-size", str(BATCH), "--workers", "2", "--min-workers", "1",
        "--output", output, "--experiment", "tests-train-elastic", "--checkpoint-every", str(CHECKPOINT_EVERY),
        "--log-every", str(LOG_EVERY), "--warmup", "2", "--loader-workers", "0", "--shuffle-buffer", "32",
        "--keep-last", "3", "--registered-model", f"tests-elastic-{uuid.uuid4().hex[:8]}",
    ]  # fmt: skip
    return cluster.job_client().submit_job(
        entrypoint=" ".join(entrypoint),
        submission_id=f"tests-elastic-{uuid.uuid4().hex[:12]}",
        runtime_env={"env_vars": env},
    )


def add_worker_node(cluster) -> None:
    try:
        cluster.add_node(num_cpus=1)
    except TimeoutError as error:
        seen = [(n["node_ip"], n["state"]) for n in cluster.ray_nodes()]
        logs = "\n".join(
            f"--- {p}\n{p.read_text()[-1500:]}" for p in sorted(cluster.root.rglob("raylet.out"))
        )
        raise AssertionError(f"{error}; the cluster lists {seen}\n{logs}") from None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_elastic_run_loses_a_node_and_finishes_on_the_worker_left_in_one_mlflow_run(
    multinode_ray, s3_prefix, tmp_path
):
    cluster = multinode_ray
    cluster.env["PYTHONPATH"] = str(REPO)  # worker nodes import this checkout, as the job does
    for _ in range(2):
        add_worker_node(cluster)
    data_uri, output = storage.join(s3_prefix, "shards"), storage.join(s3_prefix, "run")
    write_scene_shards(data_uri, NUM_SHARDS, PER_SHARD)
    client = cluster.job_client()
    job_id = submit_training(cluster, data_uri, output, tmp_path)
    try:
        paused = failpoints.wait_reached(tmp_path, "train.checkpoint_saved", KILLED_AFTER, timeout_s=400)
    except TimeoutError:
        client.stop_job(job_id)
        pytest.fail("rank 1 never reached the checkpoint at step 4:\n" + client.get_job_logs(job_id)[-5000:])
    node = cluster.node_of_pid(paused["pid"])
    assert node is not None and node is not cluster.nodes[0], paused  # a worker node, not the head
    killed_at_ms = int(time.time() * 1000)
    cluster.kill_node(node)
    status, log = cluster.wait_for_job(job_id, timeout_s=420)  # stops the job if it runs on
    assert status == JobStatus.SUCCEEDED, log[-8000:]
    assert f"resuming from {storage.join(output, 'checkpoints')}" in log and "with 1 workers" in log, log[
        -8000:
    ]

    # The checkpoints: 2 workers up to the kill, 1 after it, the last one at the last step, every one holding
    # the same global batch and the same MLflow run.
    complete = {c.step: c for c in list_complete(storage.join(output, "checkpoints"))}
    assert sorted(complete) == list(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
    world_sizes = [complete[step].info["world_size"] for step in sorted(complete)]
    assert world_sizes == [2, 1, 1]
    assert {c.info["global_batch_size"] for c in complete.values()} == {BATCH}
    assert complete[STEPS].info["samples_seen"] == STEPS * BATCH
    run_ids = {c.info["mlflow_run_id"] for c in complete.values()}
    assert len(run_ids) == 1
    (run_id,) = run_ids

    # One MLflow run for the whole curve: steps logged before the node was lost and after it, to the end.
    runs = mlflow.search_runs(
        experiment_names=["tests-train-elastic"], filter_string=f"tags.`clip_ray.output` = '{output}'"
    )
    assert list(runs["run_id"]) == [run_id]
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    before = sorted(m.step for m in history if m.timestamp < killed_at_ms)
    after = sorted(m.step for m in history if m.timestamp > killed_at_ms)
    assert before == list(range(LOG_EVERY, KILLED_AFTER + 1, LOG_EVERY))
    assert after == list(range(KILLED_AFTER + LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert os.path.exists(tmp_path / f"train.checkpoint_saved:{KILLED_AFTER}.reached")
