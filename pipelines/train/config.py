"""The training job's one typed configuration: loaded from YAML, overridden from the command line, validated
before any worker starts, and dumped back to YAML verbatim (written to `{output}/train_config.yaml` and logged
to MLflow). Defaults follow OpenCLIP's trainer for ViTs (lr 5e-4, betas 0.9/0.98, eps 1e-6, wd 0.2).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config import Section, add_config_arguments, check_uri, data_from_args, parse_yaml, validate


class TrainConfig(Section):
    data: list[str]  # ingest output folders, manifest.json URIs or brace patterns of tar URIs
    model: str
    steps: int = Field(gt=0)  # optimizer steps
    batch_size: int = Field(gt=0)  # GLOBAL batch per optimizer step, as in the paper
    workers: int = Field(1, gt=0)  # Ray Train workers (one per GPU with use_gpu); the most, when elastic
    # Elastic training: Ray Train runs between min_workers and workers, restarting the group smaller when a node
    # is lost and larger when nodes come back. None: fixed at `workers`.
    min_workers: int | None = Field(None, gt=0)
    resize_check_s: float = Field(60.0, gt=0)  # elastic: how often Ray looks for room to grow the group
    output: str
    experiment: str = "clip-ray-train"
    run_name: str | None = None
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)

    # Optimisation
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    # Linear warm-up steps before the cosine decay. None: OpenCLIP's 10,000, but at most a tenth of a short run.
    warmup: int | None = Field(None, ge=0)
    # Micro-batches per optimizer step at `workers` workers, each keeping all negatives. With fewer workers
    # (elastic) each worker accumulates more, so that the global batch stays batch_size (accum_steps_at).
    accum_steps: int = Field(1, gt=0)
    precision: Literal["bf16", "fp32"] | None = None  # None: bf16 on GPU, fp32 on CPU
    grad_checkpointing: bool = False
    compile: bool = False
    grad_clip_norm: float | None = Field(None, gt=0)
    seed: int = 0

    # Input pipeline (pipelines.train.data.TrainLoader)
    loader_workers: int = Field(2, ge=0)  # decode/augment processes per training worker
    shuffle_buffer: int = Field(2_000, ge=0)  # samples

    # Checkpoints, recovery, tracking
    checkpoint_every: int = Field(1_000, gt=0)
    keep_last: int = Field(2, gt=0)  # newest complete checkpoints kept, besides the best one
    best_metric: str = "loss"  # checkpoint.json metrics key ranking the checkpoint kept as best
    best_mode: Literal["min", "max"] = "min"
    resume: str | None = None  # a checkpoint folder to start from when the output has none yet
    # Worker-group restarts Ray Train may do; -1 = unlimited, since on a long run the autoscaler replaces lost
    # nodes many times. Ray Train retries every worker error alike, a deterministic bug in the loop too: with
    # -1 such a run restarts from its last checkpoint until stopped (`ray job stop`), so watch the job's log
    # or give a bound (docs/scaling.md, "Elastic training").
    max_failures: int = Field(-1, ge=-1)
    log_every: int = Field(10, gt=0)  # steps between metric logs
    registered_model: str | None = None  # None: "clip-ray-<model>"
    eval_config: str | None = None  # scheduled-eval suite config launched in the background
    eval_every: int | None = Field(None, gt=0)

    @field_validator("output", "resume", "eval_config")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return None if value is None else check_uri(value).rstrip("/")

    @field_validator("data")
    @classmethod
    def _data_uris(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one ingest output, manifest or shard pattern")
        return [check_uri(v) for v in value]

    @field_validator("run_name", "registered_model", "resume", "eval_config", "min_workers", mode="before")
    @classmethod
    def _empty_means_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip() in ("", "null", "none", "None") else value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        import clip_core

        if value not in clip_core.list_models():
            raise ValueError(f"is not a known model; choose one of {', '.join(clip_core.list_models())}")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        per_step = self.workers * self.accum_steps
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size {self.batch_size} must be divisible by workers x accum_steps = {self.workers} x "
                f"{self.accum_steps}, so that every worker's micro-batch has the same size"
            )
        if self.min_workers is not None:
            self._check_elastic_range()
        if self.eval_every is not None and self.eval_config is None:
            raise ValueError("eval_every is set but eval_config is not; give --eval-config FILE.yaml as well")
        if self.eval_every is not None and self.eval_every % self.checkpoint_every:
            raise ValueError(
                f"eval_every {self.eval_every} must be a multiple of checkpoint_every {self.checkpoint_every}, "
                "since evaluation reads the checkpoint written at that step"
            )
        if self.eval_config is not None and self.eval_every is None:
            object.__setattr__(self, "eval_every", self.checkpoint_every)
        if self.warmup is None:
            object.__setattr__(self, "warmup", min(10_000, self.steps // 10))
        elif self.warmup >= self.steps:
            raise ValueError(
                f"warmup {self.warmup} is not below steps {self.steps}: the learning rate would never reach "
                "its peak; lower --warmup"
            )
        if self.precision is None:
            # Store the resolved values so that the dumped config says exactly what ran.
            object.__setattr__(self, "precision", "bf16" if self.use_gpu else "fp32")
        if self.registered_model is None:
            object.__setattr__(self, "registered_model", f"clip-ray-{self.model}")
        if self.resume is not None and self.resume.rstrip("/") == self.output:
            raise ValueError("resume points at the output folder itself; give one checkpoint folder under it")
        return self

    def _check_elastic_range(self) -> None:
        if self.min_workers > self.workers:
            raise ValueError(
                f"min_workers {self.min_workers} is above workers {self.workers}; workers is the most the "
                "elastic run uses, so set min_workers to at most that"
            )
        # The micro-batch is fixed, so world size w accumulates (workers x accum_steps) / w of them per step.
        uneven = [w for w in self.world_sizes if self.micro_batches_per_step % w]
        if uneven:
            lcm = math.lcm(*self.world_sizes)
            fit = lcm // math.gcd(lcm, self.workers)
            raise ValueError(
                f"every world size from min_workers {self.min_workers} to workers {self.workers} must split the "
                f"step's {self.micro_batches_per_step} micro-batches of {self.local_batch_size} samples "
                f"(workers x accum_steps) evenly, so that each step is still batch_size {self.batch_size}, and "
                f"{', '.join(map(str, uneven))} cannot; set accum_steps to a multiple of {fit} (keeping "
                "batch_size divisible by workers x accum_steps) or narrow the range"
            )

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.workers

    @property
    def world_sizes(self) -> range:
        """The worker counts this run may train at."""
        return range(self.min_workers or self.workers, self.workers + 1)

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches of local_batch_size in one step's global batch, all workers together."""
        return self.workers * self.accum_steps

    @property
    def local_batch_size(self) -> int:
        """Samples per worker per micro-batch: fixed for the whole run, whatever the world size."""
        return self.batch_size // (self.workers * self.accum_steps)

    def accum_steps_at(self, world_size: int) -> int:
        """Micro-batches each of `world_size` workers accumulates per step so that the step is batch_size."""
        if world_size not in self.world_sizes:
            raise ValueError(f"world size {world_size} is outside {self.world_sizes.start}..{self.workers}")
        return self.micro_batches_per_step // world_size

    @property
    def checkpoints_uri(self) -> str:
        from pipelines.formats import checkpoints

        return checkpoints.checkpoints_uri(self.output)

    # -----------------------------------------------------------------------------------------------------
    # YAML in and out

    def flat_params(self) -> dict[str, str]:
        """Every field as an MLflow param (lists joined, values stringified)."""
        return {
            k: ",".join(v) if isinstance(v, list) else str(v)
            for k, v in self.model_dump(mode="python").items()
        }

    @classmethod
    def load(cls, argv: Sequence[str] | None = None) -> TrainConfig:
        """The validated config from `--config FILE.yaml` (optional) and command-line overrides."""
        return validate_config(data_from_args(build_arg_parser().parse_args(argv), _SET_EXAMPLE))

    @classmethod
    def from_yaml(cls, text: str) -> TrainConfig:
        return validate_config(parse_yaml(text, "the YAML text"))


def validate_config(data: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig, turning pydantic's errors into one sentence that names each bad field."""
    return validate(TrainConfig, data, "training config", _FLAG_FOR_FIELD)


# ---------------------------------------------------------------------------------------------------------
# Command line: flat options that override the YAML.

# (flag, field, help). Values are parsed by pydantic, so errors name the config field.
_OPTIONS = (
    ("model", "model", "architecture name, e.g. ViT-B-32 (see clip_core.list_models())"),
    ("steps", "steps", "optimizer steps to train for"),
    ("batch-size", "batch_size", "GLOBAL batch size per optimizer step (over all workers and micro-batches)"),
    ("workers", "workers", "Ray Train workers (one per GPU with --use-gpu); the most, with --min-workers"),
    ("min-workers", "min_workers", "elastic training: the fewest workers the run goes on with"),
    ("resize-check-s", "resize_check_s", "elastic: seconds between Ray's checks for room to grow"),
    ("output", "output", "output folder for checkpoints and the resolved config: local path or s3://"),
    ("experiment", "experiment", "MLflow experiment"),
    ("run-name", "run_name", "MLflow run name"),
    ("cpus-per-worker", "cpus_per_worker", "CPUs reserved per training worker"),
    ("lr", "lr", "peak learning rate"),
    ("weight-decay", "weight_decay", "AdamW weight decay on weights (not on gains, biases, logit scale)"),
    ("warmup", "warmup", "linear warm-up steps"),
    ("accum-steps", "accum_steps", "micro-batches accumulated per optimizer step (at --workers workers)"),
    ("precision", "precision", "bf16|fp32 (default: bf16 on GPU, fp32 on CPU)"),
    ("grad-clip-norm", "grad_clip_norm", "clip the global gradient norm to this"),
    ("seed", "seed", "seed of the weights and the data order"),
    ("loader-workers", "loader_workers", "decode/augment processes per training worker"),
    ("shuffle-buffer", "shuffle_buffer", "samples in each worker's shuffle buffer"),
    ("checkpoint-every", "checkpoint_every", "steps between checkpoints"),
    ("keep-last", "keep_last", "newest complete checkpoints kept (besides the best)"),
    ("best-metric", "best_metric", "metric ranking the checkpoint kept as best"),
    ("resume", "resume", "start from this checkpoint folder when the output has no checkpoint yet"),
    ("max-failures", "max_failures", "worker-group restarts after failures (-1: unlimited)"),
    ("log-every", "log_every", "steps between metric logs"),
    ("registered-model", "registered_model", "MLflow registered model name for the final model"),
    ("eval-config", "eval_config", "scheduled-eval config launched after checkpoints"),
    ("eval-every", "eval_every", "steps between background evaluations (a multiple of --checkpoint-every)"),
)
_SWITCHES = (
    ("use-gpu", "use_gpu", "one GPU per worker, NCCL, bf16 autocast"),
    ("grad-checkpointing", "grad_checkpointing", "recompute activations in backward to save memory"),
    ("compile", "compile", "torch.compile the model"),
)
_FLAG_FOR_FIELD = {path: flag for flag, path, _ in _OPTIONS + _SWITCHES} | {"data": "data"}
_SET_EXAMPLE = "shuffle_buffer=5000"


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.train",
        description="CLIP contrastive pretraining on Ray Train from WebDataset shards.",
    )
    # --data takes several URIs; it is a list field, unlike every other flag.
    parser.add_argument(
        "--data", nargs="+", default=argparse.SUPPRESS, help="ingest outputs, manifests or tar patterns"
    )
    add_config_arguments(parser, _OPTIONS, _SWITCHES, _SET_EXAMPLE)
    return parser


if __name__ == "__main__":
    print(TrainConfig.load().to_yaml(), end="")
