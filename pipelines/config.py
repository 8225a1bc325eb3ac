"""What every job's configuration shares: a pydantic model that refuses unknown keys and dumps back to YAML,
YAML read from a local path or s3://, `--set FIELD=VALUE` overrides, and pydantic's errors turned into one
sentence that names each bad field (and its flag) without echoing a password embedded in a URI, and URIs
stripped of their credentials for what gets recorded.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one sentence naming the field and the fix."""


class Section(BaseModel):
    # A misspelt key must fail loudly rather than silently fall back to a default.
    model_config = ConfigDict(extra="forbid")

    def to_yaml(self) -> str:
        """The resolved config as YAML, every field included, in declaration order."""
        return yaml.safe_dump(self.model_dump(mode="python"), sort_keys=False, allow_unicode=True)


def check_uri(value: str) -> str:
    """A field validator for URIs: not empty, and no embedded password (configs are dumped beside the
    output and logged to MLflow, so secrets must not live in them)."""
    if not value.strip():
        raise ValueError("must not be empty")
    if "://" in value and urlsplit(value).password is not None:
        raise ValueError("must not embed credentials; set them in the AWS_* environment variables instead")
    return value


def parse_yaml(text: str, where: str) -> dict[str, Any]:
    """The mapping in a YAML text; `where` names the text in errors ("config file s3://...")."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of config fields, not a {type(data).__name__}.")
    return data


def read_yaml(uri: str, what: str = "config file") -> dict[str, Any]:
    """The mapping in a YAML file, local or s3://."""
    from pipelines import storage

    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {uri} does not exist; check the --config path.") from None
    return parse_yaml(text, f"{what} {uri}")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], example: str) -> None:
    """Apply `FIELD=VALUE` items in order: FIELD is a dotted path, VALUE is parsed as YAML (text if it is
    not YAML). `example` is a valid item for this config, quoted when an item is malformed."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"--set {item!r} must look like FIELD=VALUE, e.g. --set {example}.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        set_path(data, path.strip(), value)


Flags = Sequence[tuple[str, str, str]]  # (flag without --, dotted field path, help)


def add_config_arguments(
    parser: argparse.ArgumentParser, options: Flags, switches: Flags, set_example: str
) -> None:
    """`--config FILE`, one flag per option (a value) and switch (--x / --no-x), and repeatable `--set`.
    Unset flags stay absent from the namespace, so only what the user typed overrides the YAML."""
    parser.add_argument(
        "--config", help="YAML file (local or s3://) with the config; options below override it"
    )
    for flag, path, help_text in options:
        parser.add_argument(f"--{flag}", dest=path, default=argparse.SUPPRESS, help=help_text)
    for flag, path, help_text in switches:
        parser.add_argument(
            f"--{flag}", dest=path, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
            help=help_text,
        )  # fmt: skip
    add_set_argument(parser, set_example)


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """Repeatable `--set FIELD=VALUE` into `overrides`, for apply_overrides."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=f"override any field by its dotted path, e.g. --set {example} (VALUE is YAML)",
    )


def data_from_args(args: argparse.Namespace, set_example: str) -> dict[str, Any]:
    """The config mapping from a namespace of add_config_arguments: the --config file, then the flags the
    user typed, then the --set items, in that order."""
    values = dict(vars(args))
    config_uri = values.pop("config", None)
    overrides = values.pop("overrides")
    data = read_yaml(config_uri) if config_uri else {}
    for path, value in values.items():
        set_path(data, path, value)
    apply_overrides(data, overrides, set_example)
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data["a"]["b"] = value for "a.b", creating the sections on the way."""
    *parents, leaf = dotted.split(".")
    node = data
    for name in parents:
        child = node.get(name)
        if not isinstance(child, dict):
            child = {}
            node[name] = child
        node = child
    node[leaf] = value


def validate(
    model: type[Model], data: dict[str, Any], subject: str, flags: Mapping[str, str] | None = None
) -> Model:
    """Build `model` from `data`; pydantic's errors become one ConfigError sentence starting
    "Invalid {subject}: ". `flags` maps a field's dotted path to its command-line flag, named beside it."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(explain(e, subject, flags or {})) from None


def explain(error: ValidationError, subject: str, flags: Mapping[str, str]) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        flag = flags.get(".".join(str(part) for part in item["loc"] if not isinstance(part, int)))
        where = f"{field} (--{flag})" if flag else field or "the config"
        if item["type"] == "missing":
            problems.append(f"{where} is required")
        elif item["type"] == "extra_forbidden":
            problems.append(f"{where} is not a known field (misspelt?)")
        else:
            message = item["msg"].removeprefix("Value error, ")
            if isinstance(item.get("input"), dict):  # a check across fields: the message names them
                problems.append(message)
            else:
                problems.append(f"{where} = {redacted(item.get('input'))!r}: {message}")
    return f"Invalid {subject}: " + "; ".join(problems) + "."


def redacted(value: Any) -> Any:
    """A URI with its embedded password replaced by ***, also inside a list of them (a list field's error
    shows the whole list): error messages reach logs."""
    if isinstance(value, list | tuple):
        return type(value)(redacted(item) for item in value)
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.password is not None:
            return value.replace(f":{parts.password}@", ":***@", 1)
    return value


def without_credentials(uri: str) -> str:
    """The URI without its `user:password@` part: for URIs that are recorded (Ray task arguments, Ray Train's
    run state, MLflow params), whose credentials must come from the environment instead."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
