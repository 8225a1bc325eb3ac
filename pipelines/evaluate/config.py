"""The evaluation suite: one typed config naming the datasets and tasks a checkpoint is evaluated on, loaded
from YAML (local or S3), overridable from the command line, validated before any work starts, and logged to
MLflow verbatim.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Task = Literal["zeroshot_classification", "zeroshot_retrieval", "linear_probe"]
TASKS: tuple[str, ...] = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
DatasetFormat = Literal["auto", "image_folder", "wds", "ingest"]


class ConfigError(ValueError):
    """A suite config that cannot run; the message is one sentence naming the field and the fix."""


class _Section(BaseModel):
    # A misspelt key must fail loudly rather than silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class LinearProbeConfig(_Section):
    """Logistic regression on frozen image features, as in the CLIP paper, plus its few-shot form."""

    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])  # examples per class; [] skips
    full: bool = True  # also fit on the whole training split
    seeds: int = Field(3, gt=0)  # few-shot draws averaged per shot count
    l2: float = Field(1e-3, ge=0)  # weight decay of the regression (mean loss + l2 * |W|^2)
    max_iter: int = Field(200, gt=0)  # L-BFGS iterations


class DatasetConfig(_Section):
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


class SuiteConfig(_Section):
    datasets: list[DatasetConfig]
    experiment: str = "clip-ray-eval"  # MLflow experiment when the checkpoint has no training run
    batch_size: int = Field(256, gt=0)  # images per forward pass
    workers: int | None = Field(None, gt=0)  # feature-extraction actors; None: one per GPU, else 1
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

    def to_yaml(self) -> str:
        """The resolved suite as YAML, every field included."""
        return yaml.safe_dump(self.model_dump(mode="python"), sort_keys=False, allow_unicode=True)


def parse_dataset_spec(spec: str) -> tuple[str, str]:
    """`name=URI` or `URI` (the name is then the URI's last path part) -> (name, uri)."""
    name, sep, uri = spec.partition("=")
    if sep and "://" not in name and "/" not in name:
        return name.strip(), uri.strip()
    uri = spec.strip()
    return uri.rstrip("/").rsplit("/", 1)[-1], uri


def validate_suite(data: dict[str, Any]) -> SuiteConfig:
    """Build a SuiteConfig, turning pydantic's errors into one sentence that names each bad field."""
    try:
        return SuiteConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for item in e.errors():
            field = ".".join(str(part) for part in item["loc"]) or "the suite"
            if item["type"] == "missing":
                problems.append(f"{field} is required")
            elif item["type"] == "extra_forbidden":
                problems.append(f"{field} is not a known field (misspelt?)")
            else:
                problems.append(f"{field}: {item['msg'].removeprefix('Value error, ')}")
        raise ConfigError("Invalid evaluation suite: " + "; ".join(problems) + ".") from None


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of suite fields, not a {type(data).__name__}.")
    return data


def _read_yaml(uri: str) -> dict[str, Any]:
    from pipelines import storage

    if not storage.exists(uri):
        raise ConfigError(f"suite config {uri} does not exist; check the --config path.")
    text = storage.read_bytes(uri).decode("utf-8")
    return _parse_yaml(text, f"suite config {uri}")


def load_suite(path_or_uri: str) -> SuiteConfig:
    """Parse and validate a suite YAML file (local path or s3:// URI)."""
    return validate_suite(_read_yaml(path_or_uri))


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
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a suite field by its dotted path, e.g. --set batch_size=128 (VALUE is YAML)",
    )
    return parser


def suite_from_args(args: argparse.Namespace) -> SuiteConfig:
    """The suite from --config, plus one entry per --dataset (with the --task list), plus --set overrides."""
    data = _read_yaml(args.config) if args.config else {}
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
    for item in args.overrides:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"--set {item!r} must look like FIELD=VALUE, e.g. --set batch_size=128.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        *parents, leaf = path.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate_suite(data)


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, SuiteConfig]:
    args = build_arg_parser().parse_args(argv)
    return args, suite_from_args(args)
