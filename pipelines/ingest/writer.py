"""Ingest step 6, write: one shard's final rows as img2dataset-compatible files (WebDataset tar, Parquet,
stats), with the stats file written last as the shard's commit mark; and, for step 7, the run manifest of
committed shards.
Everything goes through pipelines.storage, so a local path and an s3:// URI behave the same.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import failpoints, storage
from pipelines.formats import shards
from pipelines.formats.shards import FAILED_TO_DECODE, FAILED_TO_DOWNLOAD, SHARD_IMAGE_EXTS, STATUSES, SUCCESS

# A shard's rows wait here, without their images (those are in its tar already), between download and the
# run-wide content dedup that commits it.
STAGING_DIR = "_staging"

# Every tar member gets the same header fields, so the same rows give byte-identical tars whenever and
# wherever they are written. 2000-01-01: a fixed date that extractors do not flag as implausibly old.
TAR_MTIME = 946_684_800
TAR_MODE = 0o644

# Canonical columns, in the order of img2dataset's metadata (input columns first, then what the download
# added), followed by ours. Carried input columns go between `caption` and `key`, as in img2dataset.
LEADING_FIELDS = [pa.field("url", pa.string()), pa.field("caption", pa.string())]
TRAILING_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("original_width", pa.int64()),
    pa.field("original_height", pa.int64()),
    pa.field("sha256", pa.string()),
    pa.field("clip_score", pa.float64()),
    pa.field("row_index", pa.int64(), nullable=False),
    pa.field("shard_id", pa.int64(), nullable=False),
    pa.field("image_ext", pa.string()),
]
CANONICAL_NAMES = {f.name for f in LEADING_FIELDS + TRAILING_FIELDS} | {"image"}
_INT_FIELDS = ("width", "height", "original_width", "original_height", "row_index", "shard_id")
# What a sample's .json member holds besides the carried columns (clip_score only when the filter ran).
# row_index, shard_id and image_ext stay out: the key and the member names already say them.
_JSON_TRAILING = ["key", "status", "error_message", "width", "height", "original_width", "original_height"]


def staged_uri(output_uri: str, shard_id: int) -> str:
    return storage.join(output_uri, STAGING_DIR, shards.parquet_name(shard_id))


_STAGED_NAME = re.compile(r"^(\d+)\.parquet$")


def staged_shards(output_uri: str, settings: storage.S3Settings | None = None) -> set[int]:
    """Shards whose staged file exists: one listing of the staging folder, not a request per shard, so that a
    resumed run of 40,000 shards learns what is staged in a few requests."""
    folder = storage.join(output_uri, STAGING_DIR)
    root = storage.listing_root(folder)
    found = set()
    for entry in storage.list_files(folder, settings=settings, recursive=False):
        match = _STAGED_NAME.match(entry.uri[len(root) :].lstrip("/"))
        if match:
            found.add(int(match.group(1)))
    return found


# ---------------------------------------------------------------------------------------------------------
# Failure reasons, grouped coarsely so that stats stay small and add up across shards


_URL = re.compile(r"\b[a-zA-Z][\w+.-]*://\S+")
_IP = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b|\b[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,7}\b")
_HOST = re.compile(r"\b(?:[\w-]+\.)+[a-z]{2,}\b(?::\d+)?")
# HTTP status codes are the one number worth keeping: "HTTP 404" and "HTTP 503" call for different fixes.
_NUMBER = re.compile(r"(?<!HTTP )\b\d+(?:\.\d+)?\b")
_HEAD_END = re.compile(r": |; | \(")
MAX_REASON_CHARS = 80


def coarse_reason(status: str, error_message: str | None) -> str:
    """'failed_to_download', 'DNS lookup failed for a.example: [Errno -2] ...' -> 'failed_to_download: DNS
    lookup failed for <host>'. Drops URLs, hosts, numbers (but HTTP codes) and the detail after ':'."""
    if not error_message:
        return f"{status}: no reason given"
    text = _URL.sub("<url>", error_message)
    text = _IP.sub("<ip>", text)
    text = _HOST.sub("<host>", text)
    text = _NUMBER.sub("N", text)
    head = _HEAD_END.split(text, maxsplit=1)[0].strip()
    return f"{status}: {head[:MAX_REASON_CHARS] or 'no reason given'}"


# ---------------------------------------------------------------------------------------------------------
# Rows


def _rows_in_key_order(rows: pa.Table | Iterable[Mapping[str, Any]]) -> tuple[list[str], Iterator[dict]]:
    """(column names, rows as dicts sorted by key). A Table is converted a batch at a time so that only one
    batch of images exists twice in memory."""
    if isinstance(rows, pa.Table):
        table = rows.sort_by("key") if rows.num_rows else rows

        def from_table() -> Iterator[dict]:
            for batch in table.to_batches(max_chunksize=256):
                yield from batch.to_pylist()

        return list(table.column_names), from_table()
    listed = sorted(rows, key=lambda row: row["key"])
    names: dict[str, None] = {}
    for row in listed:
        names.update(dict.fromkeys(row))
    return list(names), iter(listed)


def carried_names(column_names: list[str]) -> list[str]:
    return [name for name in column_names if name not in CANONICAL_NAMES]


def _plain(value: Any) -> Any:
    """A JSON/Arrow-friendly Python value: numpy scalars and arrays (Ray's numpy/pandas batches) become Python
    ones, and NaN (pandas' missing value in numeric columns) becomes None."""
    if hasattr(value, "tolist") and not isinstance(value, (bytes, bytearray, memoryview)):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    raise TypeError(f"a carried column holds a {type(value).__name__}, which has no JSON form: {value!r}")


def sample_metadata(row: Mapping[str, Any], carried: list[str]) -> dict[str, Any]:
    """The .json member of one sample: img2dataset's metadata keys (input columns, key, status, error_message,
    sizes, sha256), plus clip_score when the CLIP-score filter ran."""
    meta = {"url": row.get("url"), "caption": row.get("caption")}
    meta |= {name: row.get(name) for name in carried}
    meta |= {name: row.get(name) for name in _JSON_TRAILING}
    meta["sha256"] = row.get("sha256")
    if "clip_score" in row:
        meta["clip_score"] = row.get("clip_score")
    return {name: _plain(value) for name, value in meta.items()}


def _parquet_row(row: Mapping[str, Any], carried: list[str]) -> dict[str, Any]:
    out = {name: _plain(row.get(name)) for name in [f.name for f in LEADING_FIELDS] + carried}
    for field in TRAILING_FIELDS:
        value = _plain(row.get(field.name))
        # Ints that went through pandas come back as floats.
        out[field.name] = int(value) if field.name in _INT_FIELDS and value is not None else value
    return out


def parquet_schema(carried: list[pa.Field]) -> pa.Schema:
    """The shard Parquet schema: explicit canonical columns with the carried input columns as they came."""
    return pa.schema(LEADING_FIELDS + carried + TRAILING_FIELDS)


def staged_schema(carried: list[pa.Field], scored: bool) -> pa.Schema:
    """A staged shard's schema: the shard Parquet schema, field for field, plus the image bytes. `clip_score`
    is there only once the shard is scored, so that unscored samples' .json members do not carry it."""
    fields = [f for f in parquet_schema(carried) if scored or f.name != "clip_score"]
    return pa.schema([*fields, pa.field("image", pa.binary())])


def _carried_fields(rows: Any, carried: list[str], parquet_rows: list[dict]) -> list[pa.Field]:
    if isinstance(rows, pa.Table):
        return [rows.schema.field(name) for name in carried]
    # From Python rows, let Arrow infer each carried column's type from its values.
    return [pa.field(name, pa.array([r[name] for r in parquet_rows]).type) for name in carried]


# ---------------------------------------------------------------------------------------------------------
# One shard


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tar_member(name, len(data)), io.BytesIO(data))


def _check_row(row: Mapping[str, Any], shard_id: int, seen_keys: set[str]) -> None:
    # These are bugs in an earlier stage, not per-sample failures: stop before anything is published.
    key, status = row.get("key"), row.get("status")
    if not isinstance(key, str) or not key:
        raise ValueError(
            f"shard {shard_id}: a row has no key ({row.get('row_index')=}); keys come from the reader"
        )
    if key in seen_keys:
        raise ValueError(
            f"shard {shard_id}: key {key} appears twice; each input row must reach the writer once"
        )
    seen_keys.add(key)
    if status not in STATUSES:
        raise ValueError(f"shard {shard_id}: row {key} has status {status!r}, expected one of {STATUSES}")
    if row.get("shard_id") is not None and int(row["shard_id"]) != shard_id:
        raise ValueError(f"row {key} belongs to shard {row['shard_id']}, not to shard {shard_id}")


def write_shard(
    output_uri: str,
    shard_id: int,
    rows: pa.Table | Iterable[Mapping[str, Any]],
    settings: storage.S3Settings | None = None,
) -> dict[str, Any]:
    """Write one shard's final rows and commit it; returns its stats (the content of `{shard}_stats.json`).

    rows: a pyarrow Table or dicts with the contract's columns; `image` holds the encoded bytes of success
    rows. The tar holds success rows only, in key order; the Parquet file holds every row. Any earlier stats
    file is removed first, so a crash while rewriting a committed shard leaves it uncommitted, not stale.
    """
    start_time = time.time()
    if not isinstance(rows, pa.Table):
        rows = list(rows)
    storage.delete(shards.stats_uri(output_uri, shard_id), settings=settings)
    failpoints.reach("write.started", shard_id)
    tar_keys, tar_bytes = write_tar(output_uri, shard_id, rows, settings)
    return commit_shard(output_uri, shard_id, rows, tar_keys, tar_bytes, start_time, settings)


def write_tar(
    output_uri: str,
    shard_id: int,
    rows: pa.Table | Iterable[Mapping[str, Any]],
    settings: storage.S3Settings | None = None,
) -> tuple[list[str], int]:
    """Write the shard's tar: the image, caption and metadata of every success row, in key order. Returns the
    keys it holds and its size. The shard is not committed: commit_shard does that."""
    column_names, ordered = _rows_in_key_order(rows)
    carried = carried_names(column_names)
    keys: list[str] = []
    seen_keys: set[str] = set()
    with storage.open_write(shards.tar_uri(output_uri, shard_id), settings=settings) as tar_stream:
        # The tar streams member by member into the atomic writer: memory holds one image and the buffers.
        with tarfile.open(fileobj=tar_stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for row in ordered:
                _check_row(row, shard_id, seen_keys)
                if row["status"] != SUCCESS:
                    continue
                key = row["key"]
                image, ext = row.get("image"), row.get("image_ext") or "jpg"
                if not isinstance(image, (bytes, bytearray, memoryview)):
                    raise TypeError(
                        f"shard {shard_id}: success row {key} has no image bytes (got {type(image)})"
                    )
                if ext not in SHARD_IMAGE_EXTS:
                    raise ValueError(
                        f"shard {shard_id}: row {key} has image_ext {ext!r}, not one of {SHARD_IMAGE_EXTS}"
                    )
                caption = row.get("caption")
                meta = sample_metadata(row, carried)
                _add_member(tar, f"{key}.{ext}", bytes(image))
                _add_member(tar, f"{key}.txt", ("" if caption is None else str(caption)).encode("utf-8"))
                meta_json = json.dumps(meta, indent=4, ensure_ascii=False, default=_json_default)
                _add_member(tar, f"{key}.json", meta_json.encode("utf-8"))
                keys.append(key)
                failpoints.reach("write.tar_streaming", shard_id)
        tar_bytes = tar_stream.tell()
    failpoints.reach("write.tar_done", shard_id)
    return keys, tar_bytes


def commit_shard(
    output_uri: str,
    shard_id: int,
    rows: pa.Table | Iterable[Mapping[str, Any]],
    tar_keys: Iterable[str],
    tar_bytes: int,
    start_time: float | None = None,
    settings: storage.S3Settings | None = None,
) -> dict[str, Any]:
    """Write the shard's Parquet file and then its stats file, which commits it. `tar_keys` are the samples
    its tar holds (write_tar's): those whose final status is not success (a content duplicate found after the
    tar was written, a CLIP score below threshold) are listed in the stats as `excluded_keys`, and readers skip
    them. The image column, if any, is not stored."""
    start_time = time.time() if start_time is None else start_time
    column_names, ordered = _rows_in_key_order(rows)
    carried = carried_names(column_names)
    parquet_rows: list[dict[str, Any]] = []
    counts = Counter({status: 0 for status in STATUSES})
    reasons: Counter[str] = Counter()
    seen_keys: set[str] = set()
    for row in ordered:
        _check_row(row, shard_id, seen_keys)
        status = row["status"]
        counts[status] += 1
        if status != SUCCESS:
            reasons[coarse_reason(status, row.get("error_message"))] += 1
        parquet_rows.append(_parquet_row(row, carried))
    successes = {r["key"] for r in parquet_rows if r["status"] == SUCCESS}
    in_tar = set(tar_keys)
    if successes - in_tar:
        raise ValueError(
            f"shard {shard_id}: success rows {sorted(successes - in_tar)[:3]} are not in the tar"
        )
    excluded = sorted(in_tar - successes)

    schema = parquet_schema(_carried_fields(rows, carried, parquet_rows))
    table = pa.Table.from_pylist(parquet_rows, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(shards.parquet_uri(output_uri, shard_id), buffer.getvalue(), settings=settings)
    failpoints.reach("write.parquet_done", shard_id)

    row_indices = [r["row_index"] for r in parquet_rows]
    end_time = time.time()
    stats = {
        "shard_id": shard_id,
        # img2dataset's stats keys, so its tooling can read ours; it calls decode failures failed_to_resize.
        "count": len(parquet_rows),
        "successes": counts[SUCCESS],
        FAILED_TO_DOWNLOAD: counts[FAILED_TO_DOWNLOAD],
        "failed_to_resize": counts[FAILED_TO_DECODE],
        "duration": end_time - start_time,
        "start_time": start_time,
        "end_time": end_time,
        "status_dict": {SUCCESS: counts[SUCCESS], **dict(reasons.most_common())},
        # Ours.
        "counts": dict(counts),
        "row_range": [min(row_indices), max(row_indices) + 1] if row_indices else None,
        "files": {"tar": shards.tar_name(shard_id), "parquet": shards.parquet_name(shard_id)},
        "bytes_written": {"tar": tar_bytes, "parquet": buffer.tell()},
        shards.EXCLUDED_KEYS: excluded,
    }
    # Written last: its presence is what makes the shard committed.
    storage.write_bytes(
        shards.stats_uri(output_uri, shard_id), json.dumps(stats, indent=4).encode(), settings=settings
    )
    return stats


# ---------------------------------------------------------------------------------------------------------
# The run's manifest of committed shards


# Stats files are small; reading them one after another from S3 would make a 40k-shard manifest take minutes.
MANIFEST_READ_THREADS = 16


def write_manifest(
    output_uri: str, expected_shards: int | None = None, settings: storage.S3Settings | None = None
) -> dict[str, Any]:
    """Write `manifest.json`: every committed shard with its files and counts, and totals by status.

    expected_shards: how many shards the run should have, when known; `complete` then says whether all are in.
    """
    shard_ids = sorted(shards.committed_shards(output_uri, settings=settings))
    with ThreadPoolExecutor(MANIFEST_READ_THREADS) as pool:
        all_stats = list(pool.map(lambda s: shards.read_stats(output_uri, s, settings), shard_ids))
    totals = Counter({status: 0 for status in STATUSES})
    committed = []
    for shard_id, stats in zip(shard_ids, all_stats):
        totals.update(stats["counts"])
        committed.append(
            {
                "shard_id": shard_id,
                "files": {**stats["files"], "stats": shards.stats_name(shard_id)},
                "count": stats["count"],
                "counts": stats["counts"],
                "row_range": stats["row_range"],
                "bytes_written": stats["bytes_written"],
            }
        )
    missing = None
    if expected_shards is not None:
        missing = sorted(set(range(expected_shards)) - set(shard_ids))
    manifest = {
        "committed_shards": len(committed),
        "expected_shards": expected_shards,
        "complete": None if expected_shards is None else not missing,
        "missing_shards": missing,
        "totals": {"count": sum(totals.values()), **dict(totals)},
        "bytes_written": {
            "tar": sum(s["bytes_written"]["tar"] for s in committed),
            "parquet": sum(s["bytes_written"]["parquet"] for s in committed),
        },
        "shards": committed,
    }
    storage.write_bytes(
        shards.manifest_uri(output_uri), json.dumps(manifest, indent=2).encode(), settings=settings
    )
    return manifest
