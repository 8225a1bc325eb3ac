"""`make demo`: the whole system on the local stack, each stage a Ray job submitted with `ray job submit`.

Draws a captioned-scene data set, serves it over loopback HTTP, ingests it into WebDataset shards in the S3
store, trains ViT-Tiny-16 with 2 Ray Train workers, evaluates zero-shot on held-out scenes, runs one pass of
the scheduled evaluation, and prints a table of results and the MLflow UI address. A stage whose output is
already there is reused; `--rerun` runs every stage again from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from infra import local
from pipelines import storage
from pipelines.demo import data, scenes
from pipelines.formats import checkpoints, shards

MODEL = "ViT-Tiny-16"
REPO = Path(__file__).resolve().parents[2]
# The demo's suite and scheduler configs, written for s3://clip-data/demo; other outputs get copies.
DEFAULT_OUTPUT = f"s3://{local.DATA_BUCKET}/demo"
EVAL_SUITE = REPO / "configs" / "eval-scenes.yaml"
SCHEDULED_EVAL = REPO / "configs" / "scheduled-eval-demo.yaml"


def submit(entrypoint: list[str], env: dict[str, str]) -> None:
    """Submit a Ray job to the local head and follow its logs until it ends, as a user would."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    command = [ray, "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"], "--", *entrypoint]
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, env={**os.environ, **env})
    if result.returncode != 0:
        raise SystemExit(f"the Ray job `{' '.join(entrypoint)}` failed; its log is above")


class Stages:
    """Numbered progress lines with the time each stage took."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.time()

    def begin(self, title: str) -> float:
        self.done += 1
        print(f"\n=== [{self.done}/{self.total}] {title}", flush=True)
        return time.time()

    def end(self, began: float, detail: str = "") -> None:
        print(f"=== done in {time.time() - began:.0f}s{': ' + detail if detail else ''}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="where every stage writes")
    parser.add_argument("--name", default="clip-ray-demo", help="MLflow experiment and registered model name")
    parser.add_argument("--scenes", type=int, default=5000, help="image-caption pairs to ingest and train on")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch over the 2 workers")
    parser.add_argument("--rerun", action="store_true", help="delete the demo's outputs and run every stage")
    args = parser.parse_args()
    py = sys.executable
    stages = Stages(total=6)
    experiment = args.name

    began = stages.begin("local stack: S3 store, MLflow server, Ray head")
    local.start()
    env = local.stack_env()
    os.environ.update(env)
    if args.rerun:
        storage.delete(args.output, recursive=True)
    stages.end(began)

    shards_uri = storage.join(args.output, "shards")
    train_output = storage.join(args.output, "train")
    eval_root = storage.join(args.output, "eval")
    final_checkpoint = checkpoints.step_uri(checkpoints.checkpoints_uri(train_output), args.steps)
    results_uri = storage.join(eval_root, "results.json")
    suite, scheduler = demo_configs(args.output, args.name)

    began = stages.begin(
        f"drawn scenes: {args.scenes} captioned images and held-out sets of 8 colours, 8 shapes"
    )
    site = local.DEFAULT_STATE_DIR / f"demo-site-{args.scenes}"
    data.write_scene_site(site, args.scenes, seed=0)
    for attribute in ("color", "shape"):
        data.write_classification_folder(
            storage.join(eval_root, f"scenes-{attribute}"), attribute, count=400, seed=1000, size=64
        )
    stages.end(began, f"site in {site}, held-out sets in {eval_root}")

    began = stages.begin("ingest: download over HTTP, resize, dedup, shard into the S3 store (Ray Data)")
    if _ingest_complete(shards_uri):
        print(f"reusing the finished ingest in {shards_uri}")
    else:
        with data.serve(site) as base_url:
            urls = data.write_url_list(site, base_url, site / "urls.parquet")
            input_uri = storage.join(args.output, "input", "urls.parquet")
            storage.write_bytes(input_uri, urls.read_bytes())
            submit(
                [py, "-m", "pipelines.ingest", "--input", input_uri, "--output", shards_uri,
                 "--image-size", "64", "--resize-mode", "center_crop", "--samples-per-shard", "500",
                 "--allow-private-networks", "--mlflow-experiment", experiment],
                env,
            )  # fmt: skip
    manifest = shards.read_manifest(shards_uri)
    stages.end(began, f"{manifest['totals'][shards.SUCCESS]} images in {manifest['committed_shards']} shards")

    began = stages.begin(
        f"train {MODEL}: 2 Ray Train workers, {args.steps} steps, global batch {args.batch_size}"
    )
    if checkpoints.read_info(final_checkpoint) is not None:
        print(f"reusing the finished training run in {train_output}")
    else:
        submit(
            [py, "-m", "pipelines.train", "--data", shards_uri, "--model", MODEL, "--workers", "2",
             "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--output", train_output,
             "--experiment", experiment, "--checkpoint-every", str(max(1, args.steps // 3)),
             "--registered-model", args.name],
            env,
        )  # fmt: skip
    checkpoint = checkpoints.open_checkpoint(final_checkpoint).info
    stages.end(began, f"final checkpoint {final_checkpoint}")

    began = stages.begin("zero-shot evaluation of the final checkpoint (Ray Data feature extraction)")
    if storage.exists(results_uri):
        print(f"reusing the finished evaluation in {results_uri}")
    else:
        submit(
            [py, "-m", "pipelines.evaluate", "--checkpoint", final_checkpoint, "--model", MODEL,
             "--config", suite, "--experiment", experiment, "--results", results_uri],
            env,
        )  # fmt: skip
    results = json.loads(storage.read_bytes(results_uri))
    stages.end(began)

    began = stages.begin("scheduled evaluation: one pass over every checkpoint, champion alias to the best")
    submit([py, "-m", "pipelines.scheduled_eval", "--config", scheduler], env)
    stages.end(began)

    print_results(results, manifest, checkpoint, env)
    print(f"demo finished in {time.time() - stages.started:.0f}s; stop the stack with `make stack-stop`")


def demo_configs(output: str, name: str) -> tuple[str, str]:
    """The suite and scheduled-eval configs for this output: the repo's own files for the default output,
    otherwise copies (under {output}/configs) with the data URIs, experiment and model name replaced."""
    if output == DEFAULT_OUTPUT and name == "clip-ray-demo":
        return str(EVAL_SUITE), str(SCHEDULED_EVAL)
    suite_uri = storage.join(output, "configs", EVAL_SUITE.name)
    scheduler_uri = storage.join(output, "configs", SCHEDULED_EVAL.name)
    suite = yaml.safe_load(EVAL_SUITE.read_text())
    suite["experiment"] = name
    for dataset in suite["datasets"]:
        dataset["uri"] = dataset["uri"].replace(DEFAULT_OUTPUT, output)
    scheduler = yaml.safe_load(SCHEDULED_EVAL.read_text())
    scheduler.update(
        training_outputs=[storage.join(output, "train")],
        suite=suite_uri,
        experiment=name,
        champion_model=name,
        claims=storage.join(output, "scheduled-eval"),
    )
    storage.write_bytes(suite_uri, yaml.safe_dump(suite, sort_keys=False).encode())
    storage.write_bytes(scheduler_uri, yaml.safe_dump(scheduler, sort_keys=False).encode())
    return suite_uri, scheduler_uri


def _ingest_complete(shards_uri: str) -> bool:
    manifest_uri = shards.manifest_uri(shards_uri)
    return storage.exists(manifest_uri) and bool(shards.read_manifest(shards_uri).get("complete"))


def print_results(results: dict, manifest: dict, checkpoint: dict, env: dict[str, str]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    train_run = client.get_run(checkpoint["mlflow_run_id"])
    print("\n| result | value | chance |\n|---|---:|---:|")
    for dataset, classes in (("scenes-color", scenes.COLORS), ("scenes-shape", scenes.SHAPES)):
        acc1 = results["datasets"][dataset]["acc1"]
        print(
            f"| zero-shot acc1, `zeroshot/{dataset}/acc1` ({len(classes)} classes) | {acc1:.3f} | {1 / len(classes):.3f} |"
        )
    print(
        f"| images ingested | {manifest['totals'][shards.SUCCESS]} of {manifest['totals']['count']} rows | |"
    )
    samples_per_s = train_run.data.metrics.get("samples_per_s")
    if samples_per_s is not None:
        print(f"| training samples/s ({MODEL}, 2 workers) | {samples_per_s:.0f} | |")
    print(
        f"| final contrastive loss after {checkpoint['step']} steps | {checkpoint['metrics']['loss']:.3f} | |"
    )
    experiment = train_run.info.experiment_id
    print(
        f"\nMLflow UI: {env['MLFLOW_TRACKING_URI']}/#/experiments/{experiment}/runs/{train_run.info.run_id}"
    )
    print(f"Ray dashboard: {env['RAY_API_SERVER_ADDRESS']}")
