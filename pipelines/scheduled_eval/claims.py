"""Claims: small JSON records, one per (suite, checkpoint), changed only by compare-and-swap, so that any number
of schedulers agree on who evaluates a checkpoint and everyone later reads its result from the same record.

On S3 the swap is a conditional PUT: `If-None-Match: *` creates a record only if none exists, `If-Match:
<ETag>` replaces it only if nobody changed it since it was read (AWS S3 and SeaweedFS both answer 412
otherwise; `check_conditional_writes` refuses a store that ignores the headers). On a local path the same
operations run under an flock on a sidecar lock file: atomic between processes of one machine only.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pipelines import storage
from pipelines.locks import file_lock

Record = dict[str, Any]


def _lost_race(error: Exception) -> bool:
    # 412: the condition failed. 409: S3 saw a concurrent conditional write to the key and refused this one.
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    status = getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _encode(record: Record) -> bytes:
    return json.dumps(record, indent=1, sort_keys=True).encode()


# ---------------------------------------------------------------------------------------------------------
# The three operations, each returning the record's new version (S3 ETag / content hash) or None if lost.


def read(uri: str) -> tuple[Record, str] | None:
    """(record, version) or None when there is no record."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        client = storage.boto3_client()
        try:
            response = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            return None
        return json.loads(response["Body"].read()), response["ETag"]
    with file_lock(f"{uri}.lock"):
        return _local_read(Path(uri))


def create(uri: str, record: Record) -> str | None:
    """Write the record only if there is none yet: exactly one of any number of racing callers wins."""
    if storage.is_s3(uri):
        return _s3_put(uri, record, IfNoneMatch="*")
    with file_lock(f"{uri}.lock"):
        if _local_read(Path(uri)) is not None:
            return None
        return _local_write(Path(uri), record)


def replace(uri: str, record: Record, version: str) -> str | None:
    """Write the record only if the stored one is still at `version`."""
    if storage.is_s3(uri):
        return _s3_put(uri, record, IfMatch=version)
    with file_lock(f"{uri}.lock"):
        current = _local_read(Path(uri))
        if current is None or current[1] != version:
            return None
        return _local_write(Path(uri), record)


def list_records(root: str) -> list[str]:
    """URIs of every record under a folder."""
    return [e.uri for e in storage.list_files(root) if e.uri.endswith(".json")]


def _s3_put(uri: str, record: Record, **condition: str) -> str | None:
    from botocore.exceptions import ClientError

    bucket, key = storage.split_s3(uri)
    try:
        return storage.boto3_client().put_object(Bucket=bucket, Key=key, Body=_encode(record), **condition)[
            "ETag"
        ]
    except ClientError as e:
        if _lost_race(e):
            return None
        raise


def _local_read(path: Path) -> tuple[Record, str] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return json.loads(data), hashlib.sha256(data).hexdigest()


def _local_write(path: Path, record: Record) -> str:
    data = _encode(record)
    storage.write_bytes(str(path), data)
    return hashlib.sha256(data).hexdigest()


def check_conditional_writes(root: str) -> None:
    """Stop with one sentence if the S3 store under `root` ignores If-None-Match (claims would not be atomic)."""
    if not storage.is_s3(root):
        return
    probe = storage.join(root, "_probe", f"{uuid.uuid4().hex}.json")
    try:
        create(probe, {"probe": 1})
        honoured = create(probe, {"probe": 2}) is None
    finally:
        storage.delete(probe)
    if not honoured:
        raise RuntimeError(
            f"the S3 store behind {root} ignores conditional writes (If-None-Match), so two schedulers could "
            "evaluate one checkpoint twice; put `claims` on a store that supports them (AWS S3, SeaweedFS)."
        )


# ---------------------------------------------------------------------------------------------------------
# Keeping a claim alive while its evaluation runs


class Heartbeat:
    """Refreshes `heartbeat_at` of a held claim every `every_s` seconds from a thread, so that a long
    evaluation is never taken for a crashed one. `version` is the record's latest version; `lost` turns
    True if someone else replaced the record (possible only after this process stalled past the timeout)."""

    def __init__(self, uri: str, record: Record, version: str, every_s: float) -> None:
        self.uri, self.record, self.version, self.every_s = uri, dict(record), version, every_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="claim-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s) and not self.lost:
            self.record["heartbeat_at"] = time.time()
            try:
                version = replace(self.uri, self.record, self.version)
            except Exception as e:  # a failed refresh is retried on the next beat
                print(f"claim heartbeat for {self.uri} failed ({e}); retrying", flush=True)
                continue
            if version is None:
                self.lost = True
            else:
                self.version = version


def owner_id() -> str:
    """Who holds a claim: host, process and a random part (pids repeat across containers)."""
    return f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
