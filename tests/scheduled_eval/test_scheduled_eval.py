"""The scheduled evaluation against the local stack: claims are atomic on the real S3 store, every complete
checkpoint is evaluated exactly once however many schedulers run (in-process, as processes, as Ray jobs),
incomplete checkpoints are ignored, crashed and failed claims are retried, and the champion alias follows the
best checkpoint by the ranking metric."""

from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import uuid

import mlflow
import pytest
import ray
import torch
import yaml

import clip_core
from pipelines import storage
from pipelines.config import ConfigError
from pipelines.demo import scenes
from pipelines.demo.data import write_classification_folder
from pipelines.scheduled_eval import (
    BackgroundPass,
    ScheduledEvalConfig,
    claims,
    launch_background_pass,
    run_pass,
)
from pipelines.scheduled_eval.background import TERMINAL
from pipelines.scheduled_eval.scheduler import record_uri, suite_key
from tests.paths import REPO

MODEL = "ViT-Tiny-16"
METRIC = "zeroshot/scenes-color/acc1"


# ---------------------------------------------------------------------------------------------------------
# Fixtures: two sets of weights (random and briefly trained), a held-out colour set, a "training run"


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    """Random-init weights, and the same briefly trained to classify colour far better.

    The brief training fits the image tower to the zero-shot colour classifier of the frozen text tower
    (cross-entropy on colour labels): ten steps lift colour acc1 from ~0.13 to ~0.7, where contrastive
    training needs ~80 steps of batch 128 to get there, too slow for a test on a shared 2-core machine."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    model = clip_core.create_model(MODEL)
    random_init = {k: v.clone() for k, v in model.state_dict().items()}
    transform = clip_core.image_transform(64, is_train=True)
    drawn = [scenes.make_scene(i, seed=11, size=(64, 64)) for i in range(256)]
    images = torch.stack([transform(s.image) for s in drawn])
    names = list(scenes.COLORS)
    labels = torch.tensor([names.index(s.color) for s in drawn])
    with torch.no_grad():
        classifier = clip_core.build_zero_shot_classifier(
            model, clip_core.tokenize, names, scenes.COLOR_PROMPTS
        )
    optimizer = torch.optim.AdamW(model.visual.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        batch = torch.randint(0, len(drawn), (64,), generator=generator)
        logits = 20 * model.encode_image(images[batch], normalize=True) @ classifier
        loss = torch.nn.functional.cross_entropy(logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return {"random": random_init, "trained": model.state_dict()}


@pytest.fixture(scope="module")
def stack_env(local_stack):
    """The stack's client environment for the whole module (module fixtures write to S3 too)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        for name, value in local_stack.env.items():
            patch.setenv(name, value)
        yield local_stack.env


@pytest.fixture(scope="module")
def suite_uri(stack_env, local_stack):
    """A one-dataset suite: zero-shot colour on 48 held-out scenes."""
    root = f"s3://clip-data/tests/scheduled-eval-{uuid.uuid4().hex}"
    write_classification_folder(storage.join(root, "scenes-color"), "color", count=48, seed=1000, size=64)
    suite = {
        "datasets": [
            {"name": "scenes-color", "uri": storage.join(root, "scenes-color"), "format": "image_folder"}
        ],
        "experiment": "tests-scheduled-eval",
        "batch_size": 64,
        "workers": 1,
        "example_images": 0,
    }
    uri = storage.join(root, "suite.yaml")
    storage.write_bytes(uri, yaml.safe_dump(suite).encode())
    yield uri
    storage.delete(root, recursive=True, settings=local_stack.s3_settings)


def _start_pass_process(env: dict[str, str]) -> None:
    os.environ.update(env)
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)


@pytest.fixture(scope="module")
def pass_process(stack_env):
    """In-process passes run in one child process with a Ray of its own. Of its own: the stack's 2-CPU head
    is shared with other test sessions' jobs, and a Ray Data pipeline waits while they hold its CPUs. A
    child process: Ray 2.60 kills a Ray Data actor pool's first actor ("all references to the actor were
    removed") in a process that ran Ray Data on an earlier local cluster, as earlier test modules do."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        1, mp_context=context, initializer=_start_pass_process, initargs=(dict(stack_env),)
    ) as pool:
        yield lambda config: pool.submit(run_pass, config).result()


def training_run() -> tuple[str, str]:
    mlflow.set_experiment("tests-scheduled-eval")
    with mlflow.start_run(run_name="train", tags={"clip_ray.kind": "train"}) as run:
        mlflow.log_param("model", MODEL)
    return run.info.run_id, run.info.experiment_id


def write_checkpoint(output: str, step: int, state_dict, run: tuple[str, str], complete: bool = True) -> str:
    """A checkpoint in the training layout; checkpoint.json, the commit marker, goes last."""
    folder = storage.join(output, "checkpoints", f"step_{step:08d}")
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    storage.write_bytes(storage.join(folder, "model.pt"), buffer.getvalue())
    if complete:
        info = {
            "step": step,
            "model": MODEL,
            "samples_seen": step * 64,
            "epoch": 0.0,
            "mlflow_run_id": run[0],
            "mlflow_experiment_id": run[1],
            "output": output,
            "created_at": time.time(),
            "metrics": {"loss": 1.0},
        }
        storage.write_bytes(storage.join(folder, "checkpoint.json"), json.dumps(info).encode())
    return folder


def write_config(prefix: str, suite_uri: str, **fields) -> str:
    config = {
        "training_outputs": [storage.join(prefix, "train")],
        "suite": suite_uri,
        "champion_model": f"tests-scheduled-eval-{uuid.uuid4().hex[:8]}",
        "metric": METRIC,
        "claims": storage.join(prefix, "claims"),
        **fields,
    }
    uri = storage.join(prefix, "scheduled-eval.yaml")
    storage.write_bytes(uri, yaml.safe_dump(config).encode())
    return uri


def eval_runs(checkpoint_uri: str) -> list:
    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.checkpoint_uri = '{checkpoint_uri}' and tags.`clip_ray.kind` = 'eval'",
        output_format="list",
    )


def champion(config) -> tuple[str, str]:
    version = mlflow.MlflowClient().get_model_version_by_alias(config.champion_model, config.alias)
    return str(version.version), version.tags["checkpoint_uri"]


# ---------------------------------------------------------------------------------------------------------
# Claims


@pytest.mark.parametrize("where", ["s3", "local"])
def test_exactly_one_of_many_racing_claimers_wins_create_and_takeover(
    where, local_stack_env, s3_prefix, tmp_path
):
    root = storage.join(s3_prefix, "claims") if where == "s3" else str(tmp_path / "claims")
    claims.check_conditional_writes(
        root
    )  # SeaweedFS honours If-None-Match; a store that did not would stop here
    for trial in range(2):
        uri = storage.join(root, f"race-{trial}.json")

        def create(i: int, uri=uri):
            return claims.create(uri, {"owner": i, "state": "running"})

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            won = [i for i, v in enumerate(pool.map(create, range(24))) if v is not None]
        assert len(won) == 1
        record, version = claims.read(uri)
        assert record["owner"] == won[0]

        # A stale claim seen by many at once: one conditional replace succeeds, the others see a changed record.
        def take_over(i: int, uri=uri, version=version):
            return claims.replace(uri, {"owner": 100 + i, "state": "running"}, version)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            taken = [i for i, v in enumerate(pool.map(take_over, range(24))) if v is not None]
        assert len(taken) == 1
        assert claims.read(uri)[0]["owner"] == 100 + taken[0]


def test_config_errors_are_one_sentence(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("suite: s.yaml\nchampion_model: m\nmetric: zeroshot/x/acc1\nclaimz: /tmp/c\n")
    with pytest.raises(
        ConfigError, match=r"claims is required; claimz is not a known field \(misspelt\?\)\.$"
    ):
        ScheduledEvalConfig.load(["--config", str(path)])
    path.write_text("suite: s.yaml\nchampion_model: m\nmetric: zeroshot/x/acc1\nclaims: c\n")
    config = ScheduledEvalConfig.load(["--config", str(path), "--set", "mode=min"])
    assert config.suite == str(tmp_path / "s.yaml") and config.claims == str(
        tmp_path / "c"
    )  # beside the file
    with pytest.raises(ConfigError, match="does not exist; check the --config path"):
        ScheduledEvalConfig.load(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="alias = 'latest'"):
        ScheduledEvalConfig.load(["--config", str(path), "--set", "alias=latest"])
    # The trainer's background passes read the same file: it may not turn them into watchers.
    path.write_text(path.read_text() + "watch: 60\n")
    with pytest.raises(ConfigError, match="sets watch; pass --watch SECONDS on the command line"):
        ScheduledEvalConfig.load(["--config", str(path)])
    path.write_text(path.read_text().replace("watch: 60\n", ""))
    assert ScheduledEvalConfig.load(["--config", str(path), "--watch", "60"]).watch == 60


def test_the_cli_stops_with_one_line_and_exit_code_2_on_a_bad_command_line(tmp_path):
    missing = tmp_path / "missing.yaml"
    for argv, expected in [
        (["--config", str(missing)], f"config file {missing} does not exist; check the --config path."),
        (
            ["--config", str(missing), "--watch", "0"],
            "--watch takes a positive number of seconds between passes.",
        ),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "pipelines.scheduled_eval", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"scheduled-eval: {expected}"], result.stderr


def test_a_metric_the_suite_does_not_produce_stops_before_any_work(local_stack_env, s3_prefix, suite_uri):
    config = ScheduledEvalConfig.load(
        ["--config", write_config(s3_prefix, suite_uri, metric="zeroshot/scenes-colour/acc1")]
    )
    with pytest.raises(
        ConfigError, match=r"not one the suite .* produces.*e\.g\. zeroshot/scenes-color/acc1"
    ):
        run_pass(config)
    assert not storage.exists(config.claims)


# ---------------------------------------------------------------------------------------------------------
# Passes


def test_two_schedulers_at_once_one_a_ray_job_from_the_cron_wrapper_evaluate_each_checkpoint_once(
    local_stack_env, s3_prefix, suite_uri, weights
):
    run = training_run()
    output = storage.join(s3_prefix, "train")
    checkpoints = [write_checkpoint(output, step, weights["random"], run) for step in (10, 20)]
    config_uri = write_config(s3_prefix, suite_uri)
    env = {**os.environ, **local_stack_env, "CLIP_RAY_PYTHON": sys.executable}
    address = local_stack_env["RAY_API_SERVER_ADDRESS"]

    # What cron runs: `ray job submit --no-wait` through the wrapper, which returns once the job is queued.
    submitted = subprocess.run(
        [os.path.join(REPO, "infra", "cron", "scheduled-eval.sh"), config_uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    as_ray_job = BackgroundPass(
        "ray_job", re.findall(r"scheduled-eval-\d{8}T\d{6}-\d+", submitted.stdout)[0], address
    )
    # The other scheduler runs its Ray Data on a Ray of its own (RAY_ADDRESS=local), like a second cluster
    # sharing the store and the tracking server: two evaluations at once on the 2-CPU head would each hold
    # one CPU for its encoder actor and leave none for the decoding tasks.
    as_process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.scheduled_eval", "--config", config_uri],
        env={**env, "RAY_ADDRESS": "local"},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        process_log = as_process.communicate(timeout=480)[0]
        job_status = as_ray_job.wait(timeout_s=480)
    finally:
        stop_unfinished(as_ray_job)
        if as_process.poll() is None:
            as_process.kill()
    assert as_process.returncode == 0, process_log[-3000:]
    assert job_status == "SUCCEEDED", as_ray_job.logs()[-3000:]
    assert "2 checkpoints found" in process_log and "2 checkpoints found" in as_ray_job.logs()

    for checkpoint in checkpoints:
        assert len(eval_runs(checkpoint)) == 1, checkpoint
    config = ScheduledEvalConfig.load(["--config", config_uri])
    versions = mlflow.MlflowClient().search_model_versions(f"name='{config.champion_model}'")
    assert sorted(v.tags["checkpoint_uri"] for v in versions) == checkpoints  # one version each
    assert champion(config)[1] in checkpoints

    # A pass started in the background (as the trainer does) returns at once and then finds nothing to do.
    handle = launch_background_pass(config_uri)
    try:
        assert handle.kind == "ray_job" and handle.status() not in TERMINAL
        assert handle.wait(timeout_s=300) == "SUCCEEDED", handle.logs()[-3000:]
    finally:
        stop_unfinished(handle)
    assert "nothing to do" in handle.logs()
    for checkpoint in checkpoints:
        assert len(eval_runs(checkpoint)) == 1


def stop_unfinished(handle: BackgroundPass) -> None:
    """A job left queued on the shared head by a failed test would hold its CPUs for other test sessions."""
    if handle.status() not in TERMINAL:
        from ray.job_submission import JobSubmissionClient

        JobSubmissionClient(handle.address).stop_job(handle.id)


def test_each_checkpoint_is_evaluated_once_and_the_champion_follows_the_best(
    local_stack_env, s3_prefix, suite_uri, weights, pass_process
):
    run = training_run()
    output = storage.join(s3_prefix, "train")
    first = write_checkpoint(output, 0, weights["random"], run)
    partial = write_checkpoint(output, 20, weights["trained"], run, complete=False)  # still being written
    config = ScheduledEvalConfig.load(["--config", write_config(s3_prefix, suite_uri)])
    # The trainer registered the first checkpoint's weights already: found twice, it is one checkpoint.
    client = mlflow.MlflowClient()
    client.create_registered_model(config.champion_model)
    trainers = client.create_model_version(
        config.champion_model, source=first, run_id=run[0], tags={"checkpoint_uri": f"{first}/model.pt"}
    )

    report = pass_process(config)
    assert report.evaluated == [first] and report.found == 1
    assert report.champion["version"] == str(trainers.version)
    assert champion(config) == (report.champion["version"], first)

    again = pass_process(config)  # nothing new: nothing evaluated, nothing moved
    assert again.evaluated == [] and again.found == 1 and not again.champion["moved"]

    better = write_checkpoint(output, 40, weights["trained"], run)
    third = pass_process(config)
    assert third.evaluated == [better] and third.found == 2
    assert third.champion["moved"] and champion(config)[1] == better

    records = {
        r["checkpoint_uri"]: r
        for r in (
            claims.read(u)[0] for u in claims.list_records(storage.join(config.claims, report.suite_key))
        )
    }
    assert set(records) == {first, better} and all(r["state"] == "done" for r in records.values())
    assert records[better]["metrics"][METRIC] > records[first]["metrics"][METRIC]  # training helped
    for checkpoint in (first, better):
        runs = eval_runs(checkpoint)
        assert len(runs) == 1 and runs[0].info.run_id == records[checkpoint]["eval_run_id"]
        assert runs[0].data.tags["mlflow.parentRunId"] == run[0]
    assert eval_runs(partial) == [] and partial not in records

    versions = mlflow.MlflowClient().search_model_versions(f"name='{config.champion_model}'")
    assert sorted(v.tags["checkpoint_uri"] for v in versions) == sorted([first, better])
    for v in versions:
        assert float(v.tags[METRIC]) == records[v.tags["checkpoint_uri"]]["metrics"][METRIC]
        assert v.tags["clip_ray.suite"] == report.suite_key


def test_stale_claims_are_taken_over_fresh_ones_skipped_and_failures_retried_then_given_up(
    local_stack_env, s3_prefix, suite_uri, weights, pass_process
):
    run = training_run()
    output = storage.join(s3_prefix, "train")
    crashed = write_checkpoint(output, 1, weights["random"], run)
    busy = write_checkpoint(output, 2, weights["random"], run)
    broken = write_checkpoint(output, 3, weights["random"], run)
    storage.write_bytes(storage.join(broken, "model.pt"), b"not a checkpoint")
    config = ScheduledEvalConfig.load(
        ["--config", write_config(s3_prefix, suite_uri, max_attempts=2, claim_timeout_s=3000)]
    )
    from pipelines.evaluate import load_suite

    key = suite_key(config.suite, load_suite(config.suite))
    old, now = time.time() - 10_000, time.time()
    claims.create(
        record_uri(config, key, crashed),
        {"state": "running", "owner": "gone", "heartbeat_at": old, "attempts": 1},
    )
    claims.create(
        record_uri(config, key, busy),
        {"state": "running", "owner": "alive", "heartbeat_at": now, "attempts": 1},
    )

    report = pass_process(config)
    assert report.evaluated == [crashed] and report.busy == [busy] and report.failed == [broken]
    crashed_record = claims.read(record_uri(config, key, crashed))[0]
    assert crashed_record["state"] == "done" and crashed_record["attempts"] == 2
    failed = claims.read(record_uri(config, key, broken))[0]
    assert failed["state"] == "failed" and failed["attempts"] == 1 and "model.pt" in failed["error"]

    retried = pass_process(config)
    assert retried.failed == [broken] and retried.evaluated == []
    assert claims.read(record_uri(config, key, broken))[0]["attempts"] == 2
    given_up = pass_process(config)
    assert given_up.given_up == [broken] and given_up.failed == [] and given_up.busy == [busy]
    assert len(eval_runs(crashed)) == 1 and eval_runs(busy) == []
