"""Storage addressed by URI: local paths and s3://bucket/key alike, for every stage of the pipeline.
The one place that builds S3 clients (boto3, pyarrow, fsspec/s3fs), configured from the usual AWS
environment variables plus an endpoint override for S3-compatible stores such as the local SeaweedFS.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

S3_SCHEME = "s3://"
# S3 needs every part of a multipart upload but the last to be at least 5 MiB.
MULTIPART_PART_SIZE = 8 * 1024 * 1024
# Sequential reads from S3 are buffered so that small reads do not each become a request.
STREAM_BUFFER_SIZE = 1024 * 1024


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and who we are there. None means: let the SDK's default chain decide."""

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if environ is None else environ

        def get(*names: str) -> str | None:
            for name in names:
                if env.get(name):
                    return env[name]
            return None

        # The service-specific endpoint wins over the global one, as in the AWS SDKs.
        return cls(
            endpoint_url=get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            access_key_id=get("AWS_ACCESS_KEY_ID"),
            secret_access_key=get("AWS_SECRET_ACCESS_KEY"),
            session_token=get("AWS_SESSION_TOKEN"),
            region=get("AWS_REGION", "AWS_DEFAULT_REGION"),
        )

    def __repr__(self) -> str:
        # Secrets never reach logs, tracebacks or MLflow params through a repr.
        def shown(value: str | None) -> str:
            return "None" if value is None else "'***'"

        return (
            f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"access_key_id={shown(self.access_key_id)}, secret_access_key={shown(self.secret_access_key)}, "
            f"session_token={shown(self.session_token)})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class FileEntry:
    uri: str
    size: int


# ---------------------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join a URI or local path with further path parts, e.g. join('s3://b/run', 'shards', '0.tar')."""
    base = str(base)
    if not is_s3(base):
        return os.path.join(base, *parts)
    pieces = [base.rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


def _local(uri: str | os.PathLike) -> Path:
    return Path(uri).expanduser().absolute()


def listing_root(uri: str | os.PathLike) -> str:
    """`uri` spelt the way list_files spells the entries under it, so that `entry[len(root):]` is the entry's
    path relative to `uri`. Local paths become absolute with `..` kept (the kernel, not the string, resolves
    it: with symlinks the two differ); S3 URIs lose trailing slashes."""
    return str(uri).rstrip("/") if is_s3(uri) else str(_local(uri))


# ---------------------------------------------------------------------------------------------------------
# Clients for the three client libraries the pipeline uses


def _settings(settings: S3Settings | None) -> S3Settings:
    return S3Settings.from_env() if settings is None else settings


def boto3_client(settings: S3Settings | None = None, timeout_s: float | None = None):
    """A boto3 S3 client; cached per settings because building one costs ~100 ms.

    timeout_s bounds connect and read time and turns retries off, for probes that must answer quickly.
    """
    return _cached_boto3_client(_settings(settings), timeout_s)


def forget_clients() -> None:
    """Drop the cached clients. A forked child must: its parent's clients share their sockets with it."""
    _cached_boto3_client.cache_clear()


@functools.lru_cache(maxsize=8)
def _cached_boto3_client(settings: S3Settings, timeout_s: float | None):
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {}
    if settings.endpoint_url:
        # Path-style addressing: S3-compatible stores on an IP endpoint have no per-bucket DNS names.
        options["s3"] = {"addressing_style": "path"}
    if timeout_s is not None:
        options |= {
            "connect_timeout": timeout_s,
            "read_timeout": timeout_s,
            "retries": {"total_max_attempts": 1},
        }
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        aws_session_token=settings.session_token,
        region_name=settings.region,
        config=Config(**options) if options else None,
    )


def pyarrow_filesystem(uri: str | os.PathLike, settings: S3Settings | None = None, with_keys: bool = True):
    """(pyarrow filesystem, path inside it) for a URI: the pair that pyarrow and Ray Data readers take.
    with_keys=False leaves the keys out (endpoint and region stay), so the AWS SDK's default chain finds them
    in each process's own environment: for a filesystem handed to Ray, which pickles it, keys included, into
    task arguments."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(_local(uri))
    s = _settings(settings)
    kwargs: dict[str, Any] = {"region": s.region}
    if s.access_key_id and with_keys:
        kwargs |= {
            "access_key": s.access_key_id,
            "secret_key": s.secret_access_key,
            "session_token": s.session_token,
        }
    if s.endpoint_url:
        endpoint = urlsplit(s.endpoint_url if "://" in s.endpoint_url else f"https://{s.endpoint_url}")
        kwargs |= {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme}
    bucket, key = split_s3(str(uri))
    return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def fsspec_storage_options(settings: S3Settings | None = None) -> dict[str, Any]:
    """storage_options for fsspec/s3fs users (webdataset, pandas, Ray Data's filesystem argument)."""
    s = _settings(settings)
    options: dict[str, Any] = {
        "key": s.access_key_id,
        "secret": s.secret_access_key,
        "token": s.session_token,
        "endpoint_url": s.endpoint_url,
        "client_kwargs": {"region_name": s.region} if s.region else None,
        # Stages list what earlier stages just wrote; a stale listing cache would hide new shards.
        "use_listings_cache": False,
    }
    return {k: v for k, v in options.items() if v is not None}


def fsspec_filesystem(uri: str | os.PathLike, settings: S3Settings | None = None):
    """(fsspec filesystem, path inside it) for a URI."""
    import fsspec

    if not is_s3(uri):
        return fsspec.filesystem("file"), str(_local(uri))
    bucket, key = split_s3(str(uri))
    return fsspec.filesystem("s3", **fsspec_storage_options(settings)), f"{bucket}/{key}".rstrip("/")


# ---------------------------------------------------------------------------------------------------------
# The helpers every stage needs. Writes are atomic: a reader sees the whole object or nothing.


def _is_not_found(error: Exception) -> bool:
    code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def exists(uri: str | os.PathLike, settings: S3Settings | None = None) -> bool:
    """True for an existing file/object, or a directory/prefix with something under it."""
    if not is_s3(uri):
        return _local(uri).exists()
    from botocore.exceptions import ClientError

    client = boto3_client(settings)
    bucket, key = split_s3(str(uri))
    try:
        if not key:
            client.head_bucket(Bucket=bucket)
        else:
            client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if not _is_not_found(e):
            raise
        if not key:
            return False
    # Not an object: it may still be a "directory", i.e. a prefix with objects under it.
    listing = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    return listing.get("KeyCount", 0) > 0


def read_bytes(uri: str | os.PathLike, settings: S3Settings | None = None) -> bytes:
    if not is_s3(uri):
        return _local(uri).read_bytes()
    bucket, key = split_s3(str(uri))
    return boto3_client(settings).get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str | os.PathLike, data: bytes, settings: S3Settings | None = None) -> None:
    """Write a whole object; readers never see a partial one (S3 PUT is atomic, local uses rename)."""
    if not is_s3(uri):
        with _local_atomic_writer(_local(uri)) as f:
            f.write(data)
        return
    bucket, key = split_s3(str(uri))
    boto3_client(settings).put_object(Bucket=bucket, Key=key, Body=data)


def open_read(uri: str | os.PathLike, settings: S3Settings | None = None) -> IO[bytes]:
    """A sequential binary stream (context manager). Streams S3 objects rather than loading them whole."""
    if not is_s3(uri):
        return open(_local(uri), "rb")  # noqa: SIM115 - the caller owns the stream
    bucket, key = split_s3(str(uri))
    body = boto3_client(settings).get_object(Bucket=bucket, Key=key)["Body"]
    return io.BufferedReader(body, buffer_size=STREAM_BUFFER_SIZE)


@contextlib.contextmanager
def open_write(
    uri: str | os.PathLike, settings: S3Settings | None = None, part_size: int = MULTIPART_PART_SIZE
) -> Iterator[IO[bytes]]:
    """Stream bytes to a URI and publish them only when the block exits cleanly.

    Local: a temporary file next to the target, renamed over it at the end.
    S3: a multipart upload completed at the end (the object appears at once) or aborted on error.
    If the block raises, nothing is published and any earlier object under that name is kept.
    """
    if not is_s3(uri):
        with _local_atomic_writer(_local(uri)) as f:
            yield f
        return
    writer = _S3MultipartWriter(boto3_client(settings), *split_s3(str(uri)), part_size=part_size)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.close()


def publish_file(local_path: str | os.PathLike, uri: str | os.PathLike, settings: S3Settings | None = None):
    """Publish a finished local file (e.g. a shard written to scratch) at a URI, atomically."""
    if not is_s3(uri):
        target = _local(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _local_atomic_writer(target) as out, open(local_path, "rb") as src:
            shutil.copyfileobj(src, out, STREAM_BUFFER_SIZE)
        return
    bucket, key = split_s3(str(uri))
    # upload_file switches to multipart for large files; the object only appears once complete.
    boto3_client(settings).upload_file(str(local_path), bucket, key)


def list_files(
    uri: str | os.PathLike, settings: S3Settings | None = None, recursive: bool = True
) -> list[FileEntry]:
    """Every file under a directory or key prefix, recursively, with sizes, sorted by URI.

    The URI names a directory: 's3://b/shards' lists 's3://b/shards/...' but not 's3://b/shards-old/...'.
    A missing directory lists as empty. recursive=False lists only the files directly in it: on S3 a
    delimited listing, which does not page through the objects of its subfolders.
    """
    if not is_s3(uri):
        root = _local(uri)
        if not root.is_dir():
            return []
        if not recursive:
            with os.scandir(root) as found:
                files = [entry for entry in found if entry.is_file()]
            return sorted(
                (FileEntry(str(root / e.name), e.stat().st_size) for e in files), key=lambda e: e.uri
            )
        entries = [
            FileEntry(str(Path(dirpath, name)), os.path.getsize(os.path.join(dirpath, name)))
            for dirpath, _, names in os.walk(root)
            for name in names
        ]
        return sorted(entries, key=lambda e: e.uri)
    bucket, key = split_s3(str(uri))
    entries = [
        FileEntry(f"{S3_SCHEME}{bucket}/{obj['Key']}", obj["Size"])
        for obj in _s3_objects_under(boto3_client(settings), bucket, key, recursive)
        if not obj["Key"].endswith("/")  # zero-byte "folder" markers that some tools (pyarrow) create
    ]
    return sorted(entries, key=lambda e: e.uri)


def _s3_objects_under(client, bucket: str, key: str, recursive: bool = True) -> Iterator[dict[str, Any]]:
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    options = {} if recursive else {"Delimiter": "/"}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **options):
        yield from page.get("Contents", [])


def delete(uri: str | os.PathLike, recursive: bool = False, settings: S3Settings | None = None) -> None:
    """Delete a file/object; with recursive=True, everything under a directory/prefix. Missing is fine."""
    if not is_s3(uri):
        path = _local(uri)
        if path.is_dir() and not path.is_symlink():
            if not recursive:
                raise IsADirectoryError(f"{path} is a directory; pass recursive=True to delete it")
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return
    client = boto3_client(settings)
    bucket, key = split_s3(str(uri))
    if key:
        client.delete_object(Bucket=bucket, Key=key)
    if recursive:
        keys = [obj["Key"] for obj in _s3_objects_under(client, bucket, key)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def version(uri: str | os.PathLike, settings: S3Settings | None = None) -> dict[str, Any]:
    """What identifies a file's content without reading it: size and ETag on S3, size and modification time
    on local disk."""
    if not is_s3(uri):
        stat = _local(uri).stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    bucket, key = split_s3(str(uri))
    head = boto3_client(settings).head_object(Bucket=bucket, Key=key)
    return {"size": head["ContentLength"], "etag": head["ETag"].strip('"')}


def remove_unfinished_writes(uri: str | os.PathLike, settings: S3Settings | None = None) -> int:
    """Remove what killed writers left under a directory or prefix: the temporary files of local atomic
    writes, the unfinished multipart uploads on S3. Only for a location no writer is using; returns how many."""
    if not is_s3(uri):
        root = _local(uri)
        removed = 0
        for dirpath, _, names in os.walk(root):
            for name in names:
                if _UNFINISHED_LOCAL.match(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
        return removed
    client = boto3_client(settings)
    bucket, key = split_s3(str(uri))
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    removed = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------------------
# Atomic writers


# A local atomic write goes to ".{name}.{random}.partial" beside its target until it is renamed over it.
_PARTIAL_SUFFIX = ".partial"
_UNFINISHED_LOCAL = re.compile(r"^\..+\.[A-Za-z0-9_]+\.partial$")


@contextlib.contextmanager
def _local_atomic_writer(target: Path) -> Iterator[IO[bytes]]:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target, so the final rename never crosses filesystems.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_PARTIAL_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


class _S3MultipartWriter(io.RawIOBase):
    """Buffers writes into parts; small objects become one PUT, large ones a multipart upload."""

    def __init__(self, client, bucket: str, key: str, part_size: int):
        super().__init__()
        self.client, self.bucket, self.key, self.part_size = client, bucket, key, part_size
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.position = 0
        self.published = False

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to a closed S3 writer")
        self.buffer += data
        self.position += len(data)
        while len(self.buffer) >= self.part_size:
            self._upload_part(bytes(self.buffer[: self.part_size]))
            del self.buffer[: self.part_size]
        return len(data)

    def _upload_part(self, chunk: bytes) -> None:
        if self.upload_id is None:
            self.upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
        number = len(self.parts) + 1
        reply = self.client.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=chunk
        )
        self.parts.append({"PartNumber": number, "ETag": reply["ETag"]})

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.upload_id is None:
                self.client.put_object(Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer))
            else:
                if self.buffer:
                    self._upload_part(bytes(self.buffer))
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": self.parts},
                )
            self.published = True
        except BaseException:
            self.abort()
            raise
        finally:
            self.buffer = bytearray()
            super().close()

    def abort(self) -> None:
        if self.upload_id is not None and not self.published:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
            self.upload_id = None
        self.buffer = bytearray()
        super().close()
