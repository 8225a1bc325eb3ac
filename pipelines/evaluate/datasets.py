"""Evaluation sets on storage (local or S3): image-folder trees, CLIP_benchmark's WebDataset layout and our
ingest shards, opened as a list of work items (one image file or one tar shard each) and read into samples
(image bytes with a class label or captions). Every check that can fail stops with one sentence.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clip_core import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from pipelines import storage
from pipelines.entrypoint import JobError
from pipelines.evaluate.config import DatasetConfig
from pipelines.formats import shards
from pipelines.formats.shards import IMAGE_EXTS, TAR_EXT, sample_image, tar_samples

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


class DatasetError(JobError, ValueError):
    """A dataset that cannot be evaluated; the message is one sentence saying what to fix."""


@dataclass
class EvalSet:
    """What the evaluator needs to know about one split of a dataset before reading it."""

    name: str
    uri: str
    format: str  # image_folder | wds | ingest
    items: list[dict]  # {"uri", "label"} per image file, or {"uri"} per tar shard
    classnames: list[str] | None = None
    templates: list[str] | None = None
    captions_in_lines: bool = False  # CLIP_benchmark's retrieval tars: one caption per line of the .txt
    max_samples: int | None = None
    extra: dict = field(default_factory=dict)


def _root(uri: str) -> str:
    return storage.listing_root(uri)


def _relative(root: str, entry_uri: str) -> str:
    return entry_uri[len(root) :].lstrip("/")


def _read_lines(uri: str) -> list[str] | None:
    if not storage.exists(uri):
        return None
    text = storage.read_bytes(uri).decode("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def detect_format(uri: str) -> str:
    """image_folder, wds (CLIP_benchmark: `{split}/nshards.txt`) or ingest (`*_stats.json` / manifest.json)."""
    root = _root(uri)
    relative = [_relative(root, e.uri) for e in storage.list_files(uri)]
    if not relative:
        raise DatasetError(f"dataset {uri} is empty or does not exist; check the URI.")
    if any(r.endswith("/nshards.txt") for r in relative) or "dataset_type.txt" in relative:
        return "wds"
    if shards.MANIFEST_NAME in relative or any(
        shards.stats_shard_id(r.rpartition("/")[2]) is not None for r in relative
    ):
        return "ingest"
    if any("/" in r and r.rsplit(".", 1)[-1].lower() in IMAGE_EXTS for r in relative):
        return "image_folder"
    raise DatasetError(
        f"dataset {uri} is neither an image folder (class folders of images), a CLIP_benchmark WebDataset "
        "({split}/nshards.txt) nor ingest shards (*_stats.json); check the URI."
    )


def _names_and_templates(cfg: DatasetConfig, uri: str) -> tuple[list[str] | None, list[str] | None]:
    if cfg.classnames == "imagenet":
        classnames = list(IMAGENET_CLASSNAMES)
    elif cfg.classnames is not None:
        classnames = list(cfg.classnames)
    else:
        classnames = _read_lines(storage.join(uri, CLASSNAMES_FILE))
    if cfg.templates == "imagenet":
        templates = list(OPENAI_IMAGENET_TEMPLATES)
    elif cfg.templates is not None:
        templates = list(cfg.templates)
    else:
        templates = _read_lines(storage.join(uri, TEMPLATES_FILE))
    return classnames, templates


def open_image_folder(cfg: DatasetConfig, uri: str) -> EvalSet:
    """One class per folder, folders in sorted order; classnames.txt (if any) names them in that order."""
    root = _root(uri)
    by_class: dict[str, list[str]] = {}
    for entry in storage.list_files(uri):
        parts = _relative(root, entry.uri).split("/")
        if len(parts) == 2 and parts[1].rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
            by_class.setdefault(parts[0], []).append(entry.uri)
    if not by_class:
        raise DatasetError(f"dataset {cfg.name} at {uri} has no images in class folders; check the URI.")
    folders = sorted(by_class)
    classnames, templates = _names_and_templates(cfg, uri)
    if classnames is None:
        classnames = [f.replace("_", " ") for f in folders]
    elif len(classnames) != len(folders):
        raise DatasetError(
            f"the class names of dataset {cfg.name} do not match its folders: {len(classnames)} names but "
            f"{len(folders)} class folders in {uri}; give one name per folder, in sorted folder order."
        )
    items = [{"uri": u, "label": label} for label, f in enumerate(folders) for u in sorted(by_class[f])]
    return EvalSet(cfg.name, uri, "image_folder", items, classnames, templates, max_samples=cfg.max_samples)


def open_wds(cfg: DatasetConfig, uri: str, split: str) -> EvalSet:
    """CLIP_benchmark's layout: `{split}/nshards.txt`, `{split}/0.tar ...`, classnames.txt, templates, and
    dataset_type.txt ("retrieval": the .txt member holds one caption per line)."""
    nshards_uri = storage.join(uri, split, "nshards.txt")
    if not storage.exists(nshards_uri):
        raise DatasetError(
            f"dataset {cfg.name} has no split {split!r}: {nshards_uri} does not exist; set split to one that does."
        )
    nshards = int(storage.read_bytes(nshards_uri).decode().strip())
    dataset_type = (_read_lines(storage.join(uri, "dataset_type.txt")) or ["classification"])[0].lower()
    items = [{"uri": storage.join(uri, split, f"{i}{TAR_EXT}")} for i in range(nshards)]
    classnames, templates = _names_and_templates(cfg, uri)
    return EvalSet(
        cfg.name,
        uri,
        "wds",
        items,
        classnames,
        templates,
        captions_in_lines=dataset_type == "retrieval",
        max_samples=cfg.max_samples,
    )


# Stats files are small: read in parallel, so that opening an output of thousands of S3 shards takes seconds.
STATS_READ_THREADS = 16


def open_ingest(cfg: DatasetConfig, uri: str) -> EvalSet:
    """Our ingest output: the tars of its committed shards."""
    tars = shards.committed_tars(uri)
    with ThreadPoolExecutor(STATS_READ_THREADS) as pool:
        excluded = list(pool.map(shards.excluded_keys_of_tar, tars))
    # The keys a shard's stats exclude (content duplicates, CLIP-score rejects) are not part of the set.
    items = [{"uri": tar, "excluded": sorted(keys)} for tar, keys in zip(tars, excluded)]
    classnames, templates = _names_and_templates(cfg, uri)
    return EvalSet(cfg.name, uri, "ingest", items, classnames, templates, max_samples=cfg.max_samples)


def open_dataset(cfg: DatasetConfig, train: bool = False) -> EvalSet:
    """The evaluation split of a dataset, or its linear-probe training split with train=True."""
    uri = cfg.train_uri if train and cfg.train_uri else cfg.uri
    split = cfg.train_split if train else cfg.split
    fmt = cfg.format if cfg.format != "auto" else detect_format(uri)
    if fmt == "image_folder":
        if train and not cfg.train_uri:
            raise DatasetError(f"dataset {cfg.name}: linear_probe on an image folder needs train_uri.")
        opened = open_image_folder(cfg, uri)
    elif fmt == "wds":
        opened = open_wds(cfg, uri, split)
    else:
        opened = open_ingest(cfg, uri)
    if not opened.items:
        raise DatasetError(f"dataset {cfg.name} at {uri} has no shards or images; check the URI.")
    return opened


# ---------------------------------------------------------------------------------------------------------
# Samples


def read_item(item: dict, captions_in_lines: bool = False) -> Iterator[dict]:
    """The samples of one work item: {"key", "image" (encoded bytes), "label" (-1 if none), "captions"}.

    Tar members are grouped by key the way webdataset does (the file name up to its first dot, within its
    folder); a sample without an image is skipped. Captions come from the .json member's "captions" list
    when it has one (our retrieval shards), else from the .txt member: one caption, or one per line in
    CLIP_benchmark's retrieval tars.
    """
    uri = item["uri"]
    if not uri.endswith(TAR_EXT):
        yield {"key": uri, "image": storage.read_bytes(uri), "label": int(item["label"]), "captions": []}
        return
    with storage.open_read(uri) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        excluded = frozenset(item.get("excluded", ()))
        for key, members in tar_samples(tar):
            if key in excluded:
                continue
            sample = _sample(uri, key, members, captions_in_lines)
            if sample is not None:
                yield sample


def _sample(uri: str, key: str, members: dict[str, bytes], captions_in_lines: bool) -> dict | None:
    image = sample_image(members)
    if image is None:
        return None
    label = int(members["cls"].decode().strip()) if "cls" in members else -1
    captions: list[str] = []
    if "json" in members:
        meta = json.loads(members["json"])
        if isinstance(meta.get("captions"), list):
            captions = [str(c) for c in meta["captions"]]
    if not captions and "txt" in members:
        text = members["txt"].decode("utf-8")
        captions = text.splitlines() if captions_in_lines else [text]
    return {"key": f"{uri}#{key}", "image": image, "label": label, "captions": captions}
