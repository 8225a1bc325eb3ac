"""pipelines.train.config: the command line and YAML give one validated config, and every config that
cannot run stops with one sentence naming the field before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.config import ConfigError
from pipelines.train.config import TrainConfig

REQUIRED = [
    "--data", "s3://clip-data/cc12m", "s3://clip-data/extra/{00000..00003}.tar", "--model", "ViT-B-32",
    "--steps", "1000", "--batch-size", "512", "--workers", "4", "--output", "s3://clip-data/runs/b32",
    "--experiment", "clip-b32",
]  # fmt: skip


def test_command_line_gives_the_resolved_config():
    cfg = TrainConfig.load(REQUIRED + ["--accum-steps", "2", "--lr", "1e-3", "--grad-checkpointing"])
    assert cfg.data == ["s3://clip-data/cc12m", "s3://clip-data/extra/{00000..00003}.tar"]
    assert (cfg.batch_size, cfg.workers, cfg.accum_steps, cfg.local_batch_size) == (512, 4, 2, 64)
    assert cfg.lr == 1e-3 and cfg.grad_checkpointing and not cfg.compile
    # Resolved defaults are written out, so the dumped config says exactly what ran.
    assert cfg.precision == "fp32" and cfg.registered_model == "clip-ray-ViT-B-32"
    assert TrainConfig.load(REQUIRED + ["--use-gpu"]).precision == "bf16"
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay) == (0.9, 0.98, 1e-6, 0.2)
    assert cfg.checkpoints_uri == "s3://clip-data/runs/b32/checkpoints"
    # OpenCLIP's 10,000 warm-up steps, but never more than a tenth of a short run.
    assert cfg.warmup == 100 and TrainConfig.load(REQUIRED + ["--steps", "500000"]).warmup == 10_000
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg


def test_yaml_file_is_overridden_by_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: ViT-Tiny-16\nsteps: 50\nbatch_size: 64\nwarmup: 5\nshuffle_buffer: 100\n")
    cfg = TrainConfig.load(
        ["--config", str(path), "--data", "/d", "--output", "/o", "--steps", "80", "--set", "keep_last=4"]
    )
    assert (cfg.model, cfg.steps, cfg.warmup, cfg.shuffle_buffer, cfg.keep_last) == (
        "ViT-Tiny-16",
        80,
        5,
        100,
        4,
    )


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--batch-size", "510"], "must be divisible by workers x accum_steps = 4 x 1"),
        (["--accum-steps", "3"], "must be divisible by workers x accum_steps = 4 x 3"),
        (["--model", "ViT-Q-99"], "model (--model) = 'ViT-Q-99': is not a known model; choose one of"),
        (["--steps", "0"], "steps (--steps) = '0'"),
        (["--precision", "fp8"], "precision (--precision) = 'fp8'"),
        (["--eval-every", "500"], "eval_every is set but eval_config is not"),
        (["--eval-config", "s3://b/eval.yaml", "--eval-every", "150", "--checkpoint-every", "100"],
         "eval_every 150 must be a multiple of checkpoint_every 100"),
        (["--set", "learning_rate=0.1"], "learning_rate is not a known field (misspelt?)"),
        (["--warmup", "1000"], "warmup 1000 is not below steps 1000"),
        (["--resume", "s3://clip-data/runs/b32/"], "resume points at the output folder itself"),
        (["--min-workers", "5"], "min_workers 5 is above workers 4"),
        (["--min-workers", "2"],
         "every world size from min_workers 2 to workers 4 must split the step's 4 micro-batches of 128 "
         "samples (workers x accum_steps) evenly, so that each step is still batch_size 512, and 3 cannot; set "
         "accum_steps to a multiple of 3"),
    ],
)  # fmt: skip
def test_configs_that_cannot_run_fail_with_one_sentence(extra, expected):
    with pytest.raises(ConfigError) as error:
        TrainConfig.load(REQUIRED + extra)
    message = str(error.value)
    assert message.startswith("Invalid training config: ") and expected in message
    assert "\n" not in message


def test_an_elastic_run_keeps_the_micro_batch_and_accumulates_more_with_fewer_workers():
    import ray.train

    from pipelines.train.job import scaling_config

    cfg = TrainConfig.load(REQUIRED + ["--batch-size", "768", "--min-workers", "2", "--accum-steps", "3"])
    assert cfg.elastic and list(cfg.world_sizes) == [2, 3, 4] and cfg.local_batch_size == 64
    for world_size, accum in [(4, 3), (3, 4), (2, 6)]:
        assert cfg.accum_steps_at(world_size) == accum
        assert world_size * accum * cfg.local_batch_size == cfg.batch_size
    with pytest.raises(ValueError, match="world size 1 is outside 2..4"):
        cfg.accum_steps_at(1)
    scaling = scaling_config(cfg)
    assert isinstance(scaling, ray.train.ScalingConfig) and scaling.num_workers == (2, 4)
    assert scaling.elasticity_enabled and scaling.elastic_resize_monitor_interval_s == 60.0
    fixed = TrainConfig.load(REQUIRED)
    assert not fixed.elastic and fixed.min_workers is None and scaling_config(fixed).num_workers == 4
    assert fixed.accum_steps_at(4) == 1
    # min_workers == workers is a fixed run; the node-replacing default retries without bound.
    assert not TrainConfig.load(REQUIRED + ["--min-workers", "4"]).elastic
    assert fixed.max_failures == -1


def test_credentials_in_uris_are_refused_without_echoing_them():
    with pytest.raises(ConfigError) as error:
        TrainConfig.load(REQUIRED + ["--output", "s3://key:hunter2@clip-data/runs"])
    assert "must not embed credentials" in str(error.value) and "hunter2" not in str(error.value)


def test_missing_required_options_are_named():
    with pytest.raises(ConfigError, match=r"data \(--data\) is required.*model \(--model\) is required"):
        TrainConfig.load(["--steps", "10", "--batch-size", "8", "--output", "/o"])


@pytest.mark.slow
def test_cli_stops_with_one_sentence_on_a_bad_config_and_on_data_without_shards(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "pipelines.train", *REQUIRED, "--batch-size", "30"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "train: Invalid training config: batch_size 30 must be divisible by workers x accum_steps = 4 x 1, so "
        "that every worker's micro-batch has the same size."
    ]
    (tmp_path / "empty").mkdir()
    args = ["--data", str(tmp_path / "empty"), "--model", "ViT-Tiny-16", "--steps", "2", "--batch-size", "4"]
    no_data = subprocess.run(
        [sys.executable, "-m", "pipelines.train", *args, "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert no_data.returncode == 2
    last = no_data.stderr.strip().splitlines()[-1]
    assert last.startswith("train: --data") and "holds no committed shard" in last
    assert not (tmp_path / "out").exists()  # nothing written, no worker started
