"""The demo end to end, smaller: every stage runs as a `ray job submit` job on the local stack (ingest over
loopback HTTP, 2-worker training, zero-shot evaluation, a scheduled-evaluation pass), a second run reuses what
is done, and headless Chromium finds the runs in the MLflow UI the way a user would. Screenshots are kept
under test-artifacts/browser/ (gitignored).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import mlflow
import pytest

from pipelines import storage
from tests.browser import HeadlessChromium
from tests.paths import BROWSER_ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = BROWSER_ARTIFACTS
STEPS = 30


def run_demo(output: str, name: str, env: dict[str, str]) -> str:
    command = [sys.executable, "-m", "pipelines.demo", "--output", output, "--name", name]
    command += ["--scenes", "640", "--steps", str(STEPS), "--batch-size", "64"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=1500)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return result.stdout


@pytest.fixture(scope="module")
def demo_run(local_stack):
    """Two demo runs into a fresh prefix under their own experiment and model name."""
    env = local_stack.env
    output = f"s3://clip-data/tests/demo-{uuid.uuid4().hex[:10]}"
    name = f"tests-demo-{uuid.uuid4().hex[:8]}"
    first = run_demo(output, name, env)
    second = run_demo(output, name, env)
    yield {
        "output": output, "name": name, "first": first, "second": second, "env": env,
        "settings": local_stack.s3_settings,
    }  # fmt: skip
    storage.delete(output, recursive=True, settings=local_stack.s3_settings)


def test_demo_runs_each_stage_and_prints_results_and_the_mlflow_address(demo_run):
    out = demo_run["first"]
    for stage in ("pipelines.ingest", "pipelines.train", "pipelines.evaluate", "pipelines.scheduled_eval"):
        assert re.search(rf"\$ \S*ray job submit --address http://127\.0\.0\.1:\d+ -- \S+ -m {stage}", out), (
            stage
        )
    rows = dict(
        re.findall(r"\| zero-shot acc1, `(zeroshot/scenes-\w+/acc1)` \(8 classes\) \| ([0-9.]+) \|", out)
    )
    assert set(rows) == {"zeroshot/scenes-color/acc1", "zeroshot/scenes-shape/acc1"}
    assert re.search(r"\| images ingested \| 640 of 640 rows \|", out)
    assert re.search(r"MLflow UI: http://127\.0\.0\.1:\d+/#/experiments/\d+/runs/\w+", out)

    results = json.loads(
        storage.read_bytes(
            storage.join(demo_run["output"], "eval", "results.json"), settings=demo_run["settings"]
        )
    )
    assert results["step"] == STEPS
    assert float(rows["zeroshot/scenes-color/acc1"]) == pytest.approx(
        results["datasets"]["scenes-color"]["acc1"], abs=5e-4
    )


def test_a_second_demo_run_reuses_every_finished_stage(demo_run):
    out = demo_run["second"]
    assert "reusing the finished ingest" in out
    assert "reusing the finished training run" in out
    assert "reusing the finished evaluation" in out
    assert "pipelines.ingest" not in out and "pipelines.train " not in out
    assert "nothing to do" in out  # the scheduled evaluation found every checkpoint already evaluated


def test_mlflow_ui_shows_the_training_curve_and_the_evaluation(demo_run):
    client = mlflow.MlflowClient(demo_run["env"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(demo_run["name"])
    runs = client.search_runs([experiment.experiment_id])
    train = [r for r in runs if r.data.tags.get("clip_ray.kind") == "train"]
    evals = [
        r
        for r in runs
        if r.data.tags.get("clip_ray.kind") == "eval" and r.data.tags.get("step") == str(STEPS)
    ]
    assert len(train) == 1 and evals
    train_run, eval_run = train[0], evals[0]
    base = f"{demo_run['env']['MLFLOW_TRACKING_URI']}/#/experiments/{experiment.experiment_id}"

    # A tall window: the charts page draws only the charts in view, and the loss chart sits below the
    # zero-shot sections.
    with HeadlessChromium(window=(1440, 4000)) as browser:
        # Evaluation runs are nested under the training run, so the list shows the training run on top.
        browser.open(
            f"{base}/runs", ARTIFACTS / "demo_runs.png", wait_for=[train_run.info.run_name], timeout=90
        )
        browser.open(
            f"{base}/runs/{train_run.info.run_id}/model-metrics",
            ARTIFACTS / "demo_training_curves.png",
            wait_for=["loss", "zeroshot/scenes-color/acc1"],
            wait_for_selector=".js-plotly-plot .scatterlayer .trace",
            timeout=90,
        )
        browser.open(
            f"{base}/runs/{eval_run.info.run_id}",
            ARTIFACTS / "demo_eval_overview.png",
            wait_for=["zeroshot/scenes-color/acc1", "zeroshot/scenes-shape/mean_per_class_recall"],
            timeout=90,
        )
        # The per-class table opens as a table beside the tree that lists the two figures.
        table = browser.open(
            f"{base}/runs/{eval_run.info.run_id}/artifacts/zeroshot/scenes-color/per_class.json",
            ARTIFACTS / "demo_eval_per_class_table.png",
            wait_for=["confusion_matrix.png", "examples.png", "recall", "support", "purple", "suite.yaml"],
            timeout=90,
        )
        assert "View as table" in table.text
        browser.open(
            f"{base}/runs/{eval_run.info.run_id}/artifacts/zeroshot/scenes-color/confusion_matrix.png",
            ARTIFACTS / "demo_eval_confusion_matrix.png",
            wait_for=["confusion_matrix.png"],
            wait_for_selector="img[src^='blob:']",  # the PNG, fetched and shown from a blob URL
            timeout=90,
        )
