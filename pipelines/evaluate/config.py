"""The evaluation's typed config: the suite naming the datasets and tasks a checkpoint is evaluated on (loaded
from YAML, local or S3, and logged to MLflow verbatim), and around it the checkpoint, model and results URI;
built from the command line and validated before any work starts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config import (
    ConfigError,
    Section,
    add_set_argument,
    apply_overrides,
    check_uri,
    read_yaml,
    validate,
)

Task = Literal["zeroshot_classification", "zeroshot_retrieval", "linear_probe"]
TASKS: tuple[str, ...] = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
DatasetFormat = Literal["auto", "image_folder", "wds", "ingest"]


class LinearProbeConfig(Section):
    """Logistic regression on frozen image features, as in the CLIP paper, plus its few-shot form."""

    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])  # examples per class; [] skips
    full: bool = True  # also fit on the whole training split
    seeds: int = Field(3, gt=0)  # few-shot draws averaged per shot count
    l2: float = Field(1e-3, ge=0)  # weight decay of the regression (mean loss + l2 * |W|^2)
    max_iter: int = Field(200, gt=0)  # L-BFGS iterations


class DatasetConfig(Section):
    """One evaluation set. `uri` is an image-folder tree (class per folder), CLIP_benchmark's WebDataset
    folder (`{split}/nshards.txt`, `{split}/{i}.tar`) or an ingest output folder (shards + `_stats.json`)."""

    name: str
    uri: str
    format: DatasetFormat = "auto"
    tasks: list[Task] = Field(default_factory=lambda: ["zeroshot_classification"])
    split: str = "test"  # the WebDataset split evaluated
    # Class names / prompt templates: a list, "imagenet" (clip_core's), or None to read classnames.txt and
    # zeroshot_classification_templates.txt from the dataset.
    classnames: list[str] | Literal["imagenet"] | None = None
    templates: list[str] | Literal["imagenet"] | None = None
    # Linear probe training data: another image folder (train_uri) or another WebDataset split.
    train_uri: str | None = None
    train_split: str = "train"
    max_samples: int | None = Field(None, gt=0)  # evaluate the first N samples only (smoke runs)

    @field_validator("uri", "train_uri")
    @classmethod
    def _uri_without_credentials(cls, value: str | None) -> str | None:
        # The suite is logged to MLflow and its URIs are handed to Ray tasks.
        return None if value is None else check_uri(value)

    @field_validator("name")
    @classmethod
    def _metric_safe(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() or c in "/:" for c in value):
            raise ValueError(
                "must be a non-empty name without spaces, '/' or ':' (it is part of metric names)"
            )
        return value

    @field_validator("templates")
    @classmethod
    def _templates_have_placeholder(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("must list at least one template")
            missing = [t for t in value if "{c}" not in t]
            if missing:
                raise ValueError(f"template {missing[0]!r} has no {{c}} placeholder for the class name")
        return value

    @field_validator("tasks")
    @classmethod
    def _some_task(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one task")
        return list(dict.fromkeys(value))


class SuiteConfig(Section):
    datasets: list[DatasetConfig]
    experiment: str = "clip-ray-eval"  # MLflow experiment when the checkpoint has no training run
    batch_size: int = Field(256, gt=0)  # images per forward pass
    workers: int | None = Field(
        None, gt=0
    )  # most feature-extraction actors; None: as many as the cluster fits
    use_gpu: bool | Literal["auto"] = "auto"  # auto: when the cluster has GPUs
    # Decode JPEGs at a reduced scale (PIL draft) when they are at least twice the model's input size: much
    # faster for small models on large images, but the pixels then differ slightly from a full decode, so
    # the numbers are no longer CLIP_benchmark's to the decimal. Off by default for that reason.
    reduced_decode: bool = False
    recall_k: list[int] = Field(default_factory=lambda: [1, 5, 10])
    example_images: int = Field(16, ge=0)  # images in the example-prediction grid per dataset
    linear_probe: LinearProbeConfig = Field(default_factory=LinearProbeConfig)

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, value: list[DatasetConfig]) -> list[DatasetConfig]:
        if not value:
            raise ValueError("must list at least one dataset")
        names = [d.name for d in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"dataset names must be unique; {', '.join(repeated)} appears more than once")
        return value

    @field_validator("recall_k")
    @classmethod
    def _positive_k(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("must list positive k values, e.g. [1, 5, 10]")
        return sorted(set(value))

    @model_validator(mode="after")
    def _linear_probe_has_training_data(self) -> SuiteConfig:
        for d in self.datasets:
            if "linear_probe" in d.tasks and d.format == "image_folder" and not d.train_uri:
                raise ValueError(f"dataset {d.name}: linear_probe on an image folder needs train_uri")
        return self


class EvaluateConfig(Section):
    """One evaluation: a checkpoint, its architecture, the suite to run, and where the results go."""

    checkpoint: str  # a weights file or a training checkpoint folder
    model: str
    suite: SuiteConfig
    experiment: str | None = None  # MLflow experiment; None: the suite's
    results: str | None = None  # the metrics per dataset as JSON, local or s3://
    log_mlflow: bool = True
    # The training run the metrics also go into at `step`; None: from the checkpoint folder's checkpoint.json.
    training_run_id: str | None = None
    step: int | None = None

    @field_validator("checkpoint", "results")
    @classmethod
    def _uri_without_credentials(cls, value: str | None) -> str | None:
        # The checkpoint URI becomes an MLflow tag and a Ray job's log line, like the suite's URIs.
        return None if value is None else check_uri(value)

    @classmethod
    def load(cls, argv: Sequence[str] | None = None) -> EvaluateConfig:
        """The validated config from the command line: --checkpoint, --model, the suite (--config, --dataset,
        --task, --set) and the options."""
        args = build_arg_parser().parse_args(argv)
        data = {
            "checkpoint": args.checkpoint,
            "model": args.model,
            "suite": suite_from_args(args),
            "experiment": args.experiment,
            "results": args.results,
            "log_mlflow": not args.no_mlflow,
        }
        return validate(cls, data, "evaluation config", _FLAG_FOR_FIELD)


def parse_dataset_spec(spec: str) -> tuple[str, str]:
    """`name=URI` or `URI` (the name is then the URI's last path part) -> (name, uri)."""
    name, sep, uri = spec.partition("=")
    if sep and "://" not in name and "/" not in name:
        return name.strip(), uri.strip()
    uri = spec.strip()
    return uri.rstrip("/").rsplit("/", 1)[-1], uri


def validate_suite(data: dict[str, Any]) -> SuiteConfig:
    """Build a SuiteConfig, turning pydantic's errors into one sentence that names each bad field."""
    return validate(SuiteConfig, data, "evaluation suite")


def load_suite(path_or_uri: str) -> SuiteConfig:
    """Parse and validate a suite YAML file (local path or s3:// URI)."""
    return validate_suite(read_yaml(path_or_uri, "suite config"))


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.evaluate",
        description="Zero-shot classification, retrieval and linear probes of a CLIP checkpoint, on Ray.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or training checkpoint folder")
    parser.add_argument("--model", required=True, help="architecture name, e.g. ViT-B-32 or ViT-Tiny-16")
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="[NAME=]URI",
        help="dataset to evaluate (repeatable)",
    )
    parser.add_argument(
        "--task", action="append", default=[], choices=TASKS, help="task for --dataset (repeatable)"
    )
    parser.add_argument("--config", help="suite YAML (local or s3://); --dataset adds to its datasets")
    parser.add_argument("--experiment", help="MLflow experiment (default: the suite's)")
    parser.add_argument("--results", help="write the metrics per dataset as JSON here (local or s3://)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    add_set_argument(parser, "batch_size=128")
    return parser


_FLAG_FOR_FIELD = {name: name for name in ("checkpoint", "model", "experiment", "results")}


def suite_from_args(args: argparse.Namespace) -> SuiteConfig:
    """The suite from --config, plus one entry per --dataset (with the --task list), plus --set overrides."""
    data = read_yaml(args.config, "suite config") if args.config else {}
    datasets = list(data.get("datasets") or [])
    for spec in args.dataset:
        name, uri = parse_dataset_spec(spec)
        datasets.append({"name": name, "uri": uri, "tasks": args.task or ["zeroshot_classification"]})
    if not datasets:
        raise ConfigError(
            "no dataset to evaluate; pass --dataset [NAME=]URI or a --config suite with datasets."
        )
    data["datasets"] = datasets
    if args.experiment:
        data["experiment"] = args.experiment
    apply_overrides(data, args.overrides, "batch_size=128")
    return validate_suite(data)
