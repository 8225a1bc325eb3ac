"""Ingest shards, as every job reads them: names and URIs, per-row statuses, stats, committed-shard
discovery and WebDataset tar reading. A shard is `{shard}.tar`, `{shard}.parquet` and `{shard}_stats.json`,
written last as its commit mark; the ingest writer writes them, training and evaluation read them."""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Container, Iterator
from typing import Any

from pipelines import storage

# A row's status in the shard Parquet and its sample's .json: success or why the row has no image.
SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
FAILED_TO_DECODE = "failed_to_decode"
FILTERED = "filtered"
DUPLICATE = "duplicate"
STATUSES = (SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_DECODE, FILTERED, DUPLICATE)

# The image members an ingest shard holds (the resizer's encodings).
SHARD_IMAGE_EXTS = ("jpg", "png", "webp")
# The image files and members readers recognise, in the order they prefer them when a sample has several:
# ours and the "jpeg" that other WebDataset and image-folder writers use.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# A shard's tar is written as soon as its images are downloaded, before the run-wide content dedup and the
# CLIP-score filter have decided every row: writing it once, rather than staging the images and writing them
# again, halves the bytes an ingest run moves. The samples that those later steps turned away stay in the tar,
# and the stats file lists their keys under this name; every reader skips them (the Parquet rows say why).
EXCLUDED_KEYS = "excluded_keys"

MANIFEST_NAME = "manifest.json"
TAR_EXT = ".tar"
STATS_SUFFIX = "_stats.json"
_STATS_NAME = re.compile(r"^(\d+)_stats\.json$")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def tar_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}{TAR_EXT}"


def parquet_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}.parquet"


def stats_name(shard_id: int) -> str:
    return f"{shard_name(shard_id)}{STATS_SUFFIX}"


def tar_uri(output_uri: str, shard_id: int) -> str:
    return storage.join(output_uri, tar_name(shard_id))


def parquet_uri(output_uri: str, shard_id: int) -> str:
    return storage.join(output_uri, parquet_name(shard_id))


def stats_uri(output_uri: str, shard_id: int) -> str:
    return storage.join(output_uri, stats_name(shard_id))


def stats_uri_of_tar(tar_uri: str) -> str:
    """The stats file beside a shard's tar: `.../00042.tar` -> `.../00042_stats.json`."""
    return tar_uri.removesuffix(TAR_EXT) + STATS_SUFFIX


def manifest_uri(output_uri: str) -> str:
    return storage.join(output_uri, MANIFEST_NAME)


def stats_shard_id(name: str) -> int | None:
    """The shard a file name is the stats file of (`00042_stats.json` -> 42), None for any other name."""
    match = _STATS_NAME.match(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------------
# Committed shards: those whose stats file exists, i.e. that were written to the end


def committed_shards(output_uri: str, settings: storage.S3Settings | None = None) -> set[int]:
    """Shards whose stats file exists directly in the output folder: one listing of that folder alone (one
    request per 1,000 of its files on S3, its subfolders such as staging left out), whatever the shard count."""
    # list_files gives local entries as absolute paths.
    root = storage.listing_root(output_uri)
    found = set()
    for entry in storage.list_files(output_uri, settings=settings, recursive=False):
        shard_id = stats_shard_id(entry.uri[len(root) :].lstrip("/"))
        if shard_id is not None:
            found.add(shard_id)
    return found


def committed_tars(output_uri: str, settings: storage.S3Settings | None = None) -> list[str]:
    """The tar URIs of the committed shards, in shard order."""
    return [tar_uri(output_uri, i) for i in sorted(committed_shards(output_uri, settings=settings))]


def read_stats(output_uri: str, shard_id: int, settings: storage.S3Settings | None = None) -> dict:
    return json.loads(storage.read_bytes(stats_uri(output_uri, shard_id), settings=settings))


def excluded_keys(stats: dict[str, Any]) -> frozenset[str]:
    """The keys a committed shard's tar holds that are not samples of the dataset (see EXCLUDED_KEYS)."""
    return frozenset(stats.get(EXCLUDED_KEYS, ()))


def excluded_keys_of_tar(tar: str, settings: storage.S3Settings | None = None) -> frozenset[str]:
    """excluded_keys of the shard a tar URI belongs to; none when the tar has no stats file beside it (a
    WebDataset tar from another tool)."""
    uri = stats_uri_of_tar(tar)
    if not storage.exists(uri, settings=settings):
        return frozenset()
    return excluded_keys(json.loads(storage.read_bytes(uri, settings=settings)))


def read_manifest(output_uri: str, settings: storage.S3Settings | None = None) -> dict[str, Any]:
    return json.loads(storage.read_bytes(manifest_uri(output_uri), settings=settings))


# ---------------------------------------------------------------------------------------------------------
# WebDataset tars: consecutive members that share a key form one sample. The key is the member's name up to
# the first dot of its base name, within its folder, as webdataset groups them.


def tar_samples(
    tar: tarfile.TarFile, keep: Container[str] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order, from a tar opened for streaming ("r|").
    Extensions are lower-cased; with `keep`, other members are skipped unread, but their sample is still
    yielded (perhaps with no members), so callers can count every sample the tar holds."""
    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        stem, _, ext = base.partition(".")
        member_key = f"{folder}/{stem}" if folder else stem
        if member_key != key and key is not None:
            yield key, members
            members = {}
        key = member_key
        ext = ext.lower()
        if keep is None or ext in keep:
            members[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, members


def sample_image(members: dict[str, bytes]) -> bytes | None:
    """A sample's image: its first member with an image extension, in IMAGE_EXTS order; None if it has none."""
    return next((members[ext] for ext in IMAGE_EXTS if ext in members), None)
