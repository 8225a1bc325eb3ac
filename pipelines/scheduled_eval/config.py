"""The scheduled evaluation's config: which training outputs and registered models to scan, the suite to run,
and the registered model whose `champion` alias follows the best checkpoint by one metric. One typed object,
loaded from YAML (local or s3://), overridable with `--set`, validated before any work starts."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator

from pipelines import storage
from pipelines.config import (
    ConfigError,
    Section,
    add_set_argument,
    apply_overrides,
    check_uri,
    read_yaml,
    validate,
)


class ScheduledEvalConfig(Section):
    # Training --output URIs; their complete checkpoints ({output}/checkpoints/step_*/checkpoint.json) are found.
    training_outputs: list[str] = Field(default_factory=list)
    # Registered model names whose versions are evaluated too (champion_model's own versions always are).
    registered_models: list[str] = Field(default_factory=list)
    # The evaluation suite YAML (pipelines.evaluate); a relative local path is relative to this config file.
    suite: str
    # Architecture name; None takes it from checkpoint.json, or the `model` tag or run param of a version.
    model: str | None = None
    # MLflow experiment of evaluations that have no training run; None: the suite's experiment.
    experiment: str | None = None
    champion_model: str  # registered model that gets a version per evaluated checkpoint
    alias: str = "champion"
    metric: str  # the ranking metric, e.g. zeroshot/scenes-color/acc1
    mode: Literal["max", "min"] = "max"
    # Where claims and results live: one small JSON object per (suite, checkpoint). s3:// for clusters.
    claims: str
    # A running claim whose heartbeat is older than this is stale and may be taken over.
    claim_timeout_s: float = Field(600.0, gt=0)
    max_attempts: int = Field(3, gt=0)  # evaluations of one checkpoint that raised before it is given up
    # From --watch only, never the file (the trainer's background passes read the same file and must end):
    # seconds between passes until interrupted; None runs one pass.
    watch: float | None = Field(None, gt=0)
    # The command line this config came from: a watcher reads it again before every pass, so that it
    # follows edits to the file (and the suite, which every pass reads).
    _argv: list[str] = PrivateAttr(default_factory=list)

    @field_validator("training_outputs", "registered_models")
    @classmethod
    def _no_blank_entries(cls, value: list[str]) -> list[str]:
        if any(not item.strip() for item in value):
            raise ValueError("must not contain empty entries")
        return list(dict.fromkeys(check_uri(item).rstrip("/") for item in value))

    @field_validator("suite", "claims", "champion_model", "metric", "alias")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        return check_uri(value).strip()

    @field_validator("alias")
    @classmethod
    def _alias_name(cls, value: str) -> str:
        # MLflow refuses aliases like "v3" or "latest"; say so before any evaluation runs.
        if re.fullmatch(r"v\d+|latest", value.lower()) or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
            raise ValueError("must be letters, digits, '_' or '-', and not 'latest' or 'v<number>'")
        return value

    @classmethod
    def load(cls, argv: Sequence[str] | None = None) -> ScheduledEvalConfig:
        """The validated config from `--config FILE.yaml`, `--set FIELD=VALUE` overrides (VALUE is YAML) and
        `--watch SECONDS`."""
        args = build_arg_parser().parse_args(argv)
        if args.watch is not None and args.watch <= 0:
            raise ConfigError("--watch takes a positive number of seconds between passes.")
        data = read_config_file(args.config)
        if "watch" in data:
            raise ConfigError(
                f"config file {args.config} sets watch; pass --watch SECONDS on the command line."
            )
        apply_overrides(data, args.overrides, "mode=min")
        if args.watch is not None:
            data["watch"] = args.watch
        config = validate_config(data)
        config._argv = list(sys.argv[1:] if argv is None else argv)
        return config

    def reload(self) -> ScheduledEvalConfig:
        """This config read again from the same command line."""
        return type(self).load(self._argv)


def _resolve_relative(path: str, config_uri: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    if storage.is_s3(config_uri):
        return storage.join(config_uri.rsplit("/", 1)[0], path)
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(config_uri)), path))


def validate_config(data: dict[str, Any]) -> ScheduledEvalConfig:
    return validate(ScheduledEvalConfig, data, "scheduled-eval config")


def read_config_file(uri: str) -> dict[str, Any]:
    """The YAML mapping in a config file, with relative local paths made relative to the file."""
    data = read_yaml(uri)
    for key in ("suite", "claims"):
        if isinstance(data.get(key), str) and data[key].strip():
            data[key] = _resolve_relative(data[key].strip(), uri)
    if isinstance(data.get("training_outputs"), list):
        data["training_outputs"] = [
            _resolve_relative(item, uri) if isinstance(item, str) and item.strip() else item
            for item in data["training_outputs"]
        ]
    return data


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.scheduled_eval",
        description="Evaluate every checkpoint not yet evaluated by the suite, once, and move the champion alias.",
    )
    parser.add_argument("--config", required=True, help="scheduled-eval YAML (local path or s3://)")
    parser.add_argument(
        "--watch", type=float, metavar="SECONDS", help="run a pass every SECONDS until interrupted"
    )
    add_set_argument(parser, "mode=min")
    return parser
