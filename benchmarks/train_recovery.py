"""Training recovery time after a lost node: seconds from the kill to the next logged step, for an elastic run
of 1 to 2 workers on a cluster with and without a spare node.

A cluster of its own on loopback addresses (infra/local/multinode.py: a 0-CPU head and 1-CPU worker nodes,
the local stack's S3 and MLflow), a tiny ViT-Tiny-16 run submitted with `ray job submit`, rank 1 paused right
after the checkpoint at step --kill-after (the train.checkpoint_saved failpoint) and its node SIGKILLed.
Recovery is from the kill to the MLflow timestamp of the first loss logged after it (--log-every 1: the first
step after the restart). It spans Ray noticing the dead node, tearing the worker group down, deciding its new
size, starting the workers, and each worker's start: imports, model, checkpoint read from S3, loader start and
one step. With a spare node the group comes back at 2 workers; without one at 1 (accumulating twice).

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/train_recovery.py --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import mlflow  # noqa: E402

from infra import local  # noqa: E402
from infra.local.multinode import MultiNodeCluster  # noqa: E402
from pipelines import failpoints, storage  # noqa: E402
from pipelines.formats.checkpoints import list_complete  # noqa: E402
from tests.train.test_train_job import write_scene_shards  # noqa: E402

# How long Ray Train waits for a worker group to start before it decides again (default 60 s).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def run_once(env: dict[str, str], data_uri: str, spare: bool, args) -> dict:
    output = f"s3://{local.DATA_BUCKET}/benchmarks/train-recovery/{uuid.uuid4().hex}"
    node_env = {k: v for k, v in env.items() if k.startswith(("AWS_", "MLFLOW_"))} | {"PYTHONPATH": str(REPO)}
    with MultiNodeCluster(env=node_env) as cluster, tempfile.TemporaryDirectory() as pause_dir:
        for _ in range(3 if spare else 2):
            cluster.add_node(num_cpus=1)
        point = "train.checkpoint_saved"
        entrypoint = [
            sys.executable, "-m", "pipelines.train", "--data", data_uri, "--model", "ViT-Tiny-16",
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--workers", "2",
            "--min-workers", "1", "--output", output, "--experiment", "benchmarks-train-recovery",
            "--checkpoint-every", str(args.kill_after), "--log-every", "1", "--warmup", "2",
            "--loader-workers", "0", "--shuffle-buffer", "32", "--keep-last", "10",
            "--registered-model", f"benchmarks-recovery-{uuid.uuid4().hex[:8]}",
        ]  # fmt: skip
        client = cluster.job_client()
        job_id = client.submit_job(
            entrypoint=" ".join(entrypoint),
            runtime_env={
                "env_vars": {
                    "PYTHONPATH": str(REPO),
                    failpoints.PAUSE_ENV: f"{point}:{args.kill_after}",
                    failpoints.PAUSE_DIR_ENV: pause_dir,
                    failpoints.PAUSE_TIMEOUT_ENV: "300",
                }
                | ({START_TIMEOUT_ENV: str(args.start_timeout_s)} if args.start_timeout_s else {})
            },
        )
        paused = failpoints.wait_reached(pause_dir, point, args.kill_after, timeout_s=400)
        node = cluster.node_of_pid(paused["pid"])
        killed_at = time.time()
        cluster.kill_node(node)
        status, logs = cluster.wait_for_job(job_id, timeout_s=600)
        out = REPO / "benchmarks" / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"train_recovery_{'spare' if spare else 'no_spare'}.log").write_text(logs)
        if status.value != "SUCCEEDED":
            raise RuntimeError(f"the job {status.value}:\n{logs[-5000:]}")
    checkpoints = list_complete(storage.join(output, "checkpoints"))
    # When the restarted group's rank 0 entered the training loop (its workers/rank_0.json).
    restarted = json.loads(storage.read_bytes(storage.join(output, "workers", "rank_0.json")))["started_at"]
    run_id = checkpoints[-1].info["mlflow_run_id"]
    history = sorted(mlflow.MlflowClient().get_metric_history(run_id, "loss"), key=lambda m: m.step)
    after = [m for m in history if m.timestamp / 1000 > killed_at]
    step_times = mlflow.MlflowClient().get_metric_history(run_id, "step_time_s")
    before_s = [m.value for m in step_times if m.step <= args.kill_after and m.step > 1]
    after_s = [m.value for m in step_times if m.step > after[0].step]
    storage.delete(output, recursive=True)
    return {
        "spare_node": spare,
        "start_timeout_s": args.start_timeout_s or 60.0,
        "recovery_s": round(after[0].timestamp / 1000 - killed_at, 1),
        "kill_to_loop_start_s": round(restarted - killed_at, 1),  # Ray: detect, tear down, restart, imports
        "loop_start_to_step_s": round(after[0].timestamp / 1000 - restarted, 1),  # model, checkpoint, loader
        "first_step_after": after[0].step,
        "world_sizes": [c.info["world_size"] for c in checkpoints],
        "step_time_before_s": round(sum(before_s) / len(before_s), 2),
        "step_time_after_s": round(sum(after_s) / len(after_s), 2) if after_s else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kill-after", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--spare", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--start-timeout-s", type=float, help=f"{START_TIMEOUT_ENV} for the job (Ray: 60)")
    args = parser.parse_args()
    with local.leased() as env:
        os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "MLFLOW_"))})
        for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # they would take over the cluster's address
            os.environ.pop(name, None)
        data_uri = f"s3://{local.DATA_BUCKET}/benchmarks/train-recovery-data/{uuid.uuid4().hex}"
        write_scene_shards(data_uri, 2, 32)
        try:
            for _ in range(args.rounds):
                for spare in {"both": (False, True), "yes": (True,), "no": (False,)}[args.spare]:
                    print(json.dumps(run_once(env, data_uri, spare, args)), flush=True)
        finally:
            storage.delete(data_uri, recursive=True)


if __name__ == "__main__":
    main()
