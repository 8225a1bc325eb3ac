"""Ingest step 0, before a run writes anything: where an output may live, whether the output on disk is this
run's (its fingerprint records the inputs and the config fields that decide its bytes), and the leftovers of
writes that a kill cut short.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.config import ConfigError
from pipelines.formats import shards
from pipelines.ingest import reader, writer
from pipelines.ingest.config import IngestConfig

FINGERPRINT_NAME = "fingerprint.json"
# 2: tars are written at download time and stats list excluded_keys; staged rows no longer hold images.
FINGERPRINT_FORMAT = 2
# Config fields that change how a run goes but not which bytes a row ends with, so a resumed run may change
# them (more workers, longer timeouts). Every other field, including any added later, is in the fingerprint.
OPERATIONAL_FIELDS = frozenset(
    {
        "output",
        "incremental_mode",
        "mlflow_experiment",
        "concurrency",
        "download.timeout_s",
        "download.connect_timeout_s",
        "download.read_timeout_s",
        "download.max_retries",
        "download.max_in_flight",
        "download.max_per_host",
        "download.max_bytes_in_flight",
        "download.user_agent_token",
        "filters.clip_score.batch_size",
        "filters.clip_score.use_gpu",
    }
)
# A shard Parquet file's name, to test whether an input glob would pick up an output's own files.
_SAMPLE_SHARD = shards.parquet_name(0)
VERSION_THREADS = 16


def check(cfg: IngestConfig) -> tuple[dict[str, Any], bool]:
    """Refuse, with one sentence (a ConfigError), an output this run may not use; reads, never writes.
    Returns this run's fingerprint and whether the output has it recorded already."""
    check_location(cfg)
    current = fingerprint(cfg)
    if cfg.incremental_mode == "overwrite":
        _check_replaceable(cfg.output)
        return current, False
    fingerprint_uri = storage.join(cfg.output, FINGERPRINT_NAME)
    if storage.exists(fingerprint_uri):
        recorded = json.loads(storage.read_bytes(fingerprint_uri))
        changes = differences(recorded, current)
        if changes:
            raise ConfigError(
                f"output {cfg.output} holds another run's shards ({'; '.join(changes)}): write to a new "
                "output, or pass --incremental-mode overwrite to replace it"
            )
        return current, True
    if _holds_shards(cfg.output):
        raise ConfigError(
            f"output {cfg.output} holds shards but no {FINGERPRINT_NAME}, so what made them is unknown: "
            "write to a new output, or pass --incremental-mode overwrite to replace it"
        )
    return current, False


def prepare(cfg: IngestConfig, checked: tuple[dict[str, Any], bool] | None = None) -> None:
    """Make cfg.output ready for this run: a fresh output for overwrite, else the leftovers of killed writes
    removed; the fingerprint written if there is none. `checked`: what check() returned, if it ran already."""
    current, recorded = checked if checked is not None else check(cfg)
    fingerprint_uri = storage.join(cfg.output, FINGERPRINT_NAME)
    if cfg.incremental_mode == "overwrite":
        storage.delete(cfg.output, recursive=True)
    else:
        storage.remove_unfinished_writes(cfg.output)
        if recorded:
            return
    storage.write_bytes(fingerprint_uri, json.dumps(current, indent=1, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------------------
# Where an output may live


def check_shared(cfg: IngestConfig, alive_nodes: int) -> None:
    """Refuse a local output on a cluster of several nodes: each node would write its shards to its own disk."""
    if alive_nodes > 1 and not storage.is_s3(cfg.output):
        raise ConfigError(
            f"output {cfg.output} is a local path but the Ray cluster has {alive_nodes} nodes, each of which "
            "would write its shards to its own disk; write to a shared store such as s3://bucket/prefix"
        )


def _normal(uri: str) -> str:
    if storage.is_s3(uri):
        return uri.rstrip("/")
    return os.path.realpath(os.path.expanduser(uri))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _glob_root(pattern: str) -> str | None:
    """The folder a glob's fixed part names, or None for a plain path."""
    if not any(c in pattern for c in "*?["):
        return None
    segments = pattern.split("/")
    fixed = []
    for segment in segments:
        if any(c in segment for c in "*?["):
            break
        fixed.append(segment)
    return "/".join(fixed) or "/"


def check_location(cfg: IngestConfig) -> None:
    """Refuse an output that is `/` or a bucket root, that contains an input (overwrite would delete it), or
    that lies where the input would read its shards back (inside an input folder, or matched by the glob)."""
    out = _normal(cfg.output)
    if storage.is_s3(out):
        if not storage.split_s3(out)[1].strip("/"):
            raise ConfigError(f"output {cfg.output} is a bucket root; give it a prefix such as {out}/shards")
    elif Path(out).parent == Path(out):
        raise ConfigError(f"output {cfg.output} is the filesystem root; give it a folder of its own")

    pattern = storage.listing_root(cfg.input)
    root = _glob_root(pattern)
    inputs = _normal(root if root is not None else pattern)
    if _within(inputs, out):
        raise ConfigError(
            f"output {cfg.output} contains the input {cfg.input}, which a rerun with overwrite would delete; "
            "put the output in a folder of its own"
        )
    if root is None and _within(out, inputs):
        raise ConfigError(
            f"output {cfg.output} is inside the input folder {cfg.input}, so a later run would read its shards "
            "as input; put the output outside the input"
        )
    if root is not None and _within(out, inputs):
        matcher = reader._glob_regex(pattern)
        absolute_out = storage.listing_root(cfg.output)
        for candidate in (absolute_out, out):
            if matcher.match(storage.join(candidate, _SAMPLE_SHARD)):
                raise ConfigError(
                    f"output {cfg.output} is matched by the input glob {cfg.input}, so a later run would read "
                    "its shards as input; put the output outside the input"
                )


# ---------------------------------------------------------------------------------------------------------
# The fingerprint: what decides the output's bytes


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in data.items():
        path = f"{prefix}{name}"
        if path in OPERATIONAL_FIELDS:
            continue
        if isinstance(value, dict):
            flat |= _flatten(value, f"{path}.")
        else:
            flat[path] = value
    return flat


def fingerprint(cfg: IngestConfig) -> dict[str, Any]:
    """Every input file with its size and ETag (S3) or modification time (local), and the config fields
    that decide the output's bytes. The same run resumed gives the same fingerprint; a grown, shrunk or
    replaced input, or another image size, resize mode or filter, does not."""
    files = [uri for uri, _, _ in reader.list_input_files(cfg.input, cfg.input_format)]
    with ThreadPoolExecutor(VERSION_THREADS) as pool:
        versions = list(pool.map(storage.version, files))
    # Through JSON and back, so that a recorded fingerprint and a fresh one compare alike (tuples, inf).
    return json.loads(
        json.dumps(
            {
                "format": FINGERPRINT_FORMAT,
                "inputs": dict(zip(files, versions)),
                "config": _flatten(cfg.model_dump(mode="python")),
            }
        )
    )


def _describe_version(version: dict[str, Any] | None) -> str:
    if version is None:
        return "absent"
    stamp = f"ETag {version['etag']}" if "etag" in version else f"modified at {version.get('mtime_ns')} ns"
    return f"{version.get('size')} bytes, {stamp}"


def differences(recorded: dict[str, Any], current: dict[str, Any], limit: int = 3) -> list[str]:
    """What differs between two fingerprints, in words, the first `limit` items and a count of the rest."""
    found = []
    if recorded.get("format") != current.get("format"):
        found.append(f"fingerprint format {recorded.get('format')} then, {current.get('format')} now")
    before, now = recorded.get("inputs", {}), current.get("inputs", {})
    for uri in sorted(set(before) | set(now)):
        if before.get(uri) != now.get(uri):
            if uri not in now:
                found.append(f"input {uri} is gone")
            elif uri not in before:
                found.append(f"input {uri} is new")
            else:
                found.append(
                    f"input {uri} changed ({_describe_version(before[uri])} then, "
                    f"{_describe_version(now[uri])} now)"
                )
    before, now = recorded.get("config", {}), current.get("config", {})
    # A field absent from one side reads as None: an output fingerprinted before a field with a None default
    # existed (filters.max_caption_words) is still recognised, as long as the new field is left unset.
    for name in sorted(set(before) | set(now)):
        if before.get(name) != now.get(name):
            found.append(f"{name} was {before.get(name)!r}, now {now.get(name)!r}")
    if len(found) > limit:
        found = found[:limit] + [f"and {len(found) - limit} more differences"]
    return found


# ---------------------------------------------------------------------------------------------------------
# What is on disk


def _holds_shards(output_uri: str) -> bool:
    staging = storage.join(output_uri, writer.STAGING_DIR)
    return bool(shards.committed_shards(output_uri)) or bool(storage.list_files(staging))


def _check_replaceable(output_uri: str) -> None:
    """Overwrite deletes only an ingest output (or an empty or missing folder), never a folder of other files."""
    if storage.exists(storage.join(output_uri, FINGERPRINT_NAME)):
        return
    files = storage.list_files(output_uri)
    if not files:
        return
    if storage.exists(storage.join(output_uri, "config.yaml")) and _holds_shards(output_uri):
        return  # written by a version without fingerprints
    raise ConfigError(
        f"output {output_uri} holds files that are not an ingest output (such as {files[0].uri}) and overwrite "
        "would delete them; choose a new or empty folder"
    )
