"""Training input pipeline: streams ingest shards (WebDataset tars) from S3 or local paths into shuffled,
decoded, augmented and tokenized batches for one DDP rank, with a data position that a restarted run resumes.

Why it is built this way
- One stream per DataLoader worker process, and each epoch deals every sample to exactly one stream of one
  rank (`epoch_parts`): ranks need no coordination to see each sample once per epoch.
- Shards are read straight from storage as forward-only tar streams, so nothing is staged on local disk;
  decoding, cropping and tokenization run in the worker processes, off the training loop's critical path.
- Streams run on from one epoch into the next without pause, so unequal shards never leave a rank without
  batches: the trainer decides how many steps to take and every rank takes the same number. Epochs are
  therefore counted in samples: `loader.epoch = samples_seen / num_samples`.
- Corrupt samples are data, not exceptions: they are skipped and counted in `loader.corrupt_samples`; only
  a stream that meets as many failures in a row as the data holds stops the run (NoUsableSamplesError).
- A rank's batches are a pure function of its LoaderSpec, so a checkpoint needs only each stream's place in
  its epoch to resume exactly (`TrainLoader.position`).
- Elastic: the streams are laid out for the most ranks the run may have (`max_world_size`), whatever the
  world size now, and a smaller world gives each rank the streams of several of those slots. A stream's
  samples depend on its id and the layout only, so a run that restarts with another world size continues
  every stream where it stopped: nothing is repeated or skipped (`stream_ids`).
- DataLoader workers and not Ray Data: Ray Data has no mid-epoch position (its block order and local shuffle
  are not reproducible from a checkpoint, so a restarted run would repeat or skip samples), restarts its
  execution every epoch, and took more CPU per sample and far longer to the first batch (BENCHMARKS.md,
  "Input pipeline"). It would win where decoding must move off the GPU nodes to CPU-only nodes; GPU nodes
  with spare cores need no such thing.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import math
import os
import random
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import clip_core
from pipelines import storage
from pipelines.formats.shards import (
    IMAGE_EXTS,
    SUCCESS,
    TAR_EXT,
    committed_tars,
    excluded_keys_of_tar,
    manifest_uri,
    sample_image,
    stats_uri_of_tar,
    tar_samples,
)
from pipelines.train.config import TrainConfig

log = logging.getLogger(__name__)

POSITION_FORMAT = 2  # 1: positions by rank (a layout for one world size), still read
CAPTION_EXT = "txt"
READ_ATTEMPTS = 3
RETRY_PAUSE_S = 0.2
# Stats files are small; read them in parallel so that resolving thousands of S3 shards takes seconds.
STATS_READ_THREADS = 16


class NoUsableSamplesError(RuntimeError):
    """Every sample a loader stream met failed: the data cannot train anything."""


# ---------------------------------------------------------------------------------------------------------
# Which shards: --data entries -> shards with sample counts


@dataclass(frozen=True)
class Shard:
    uri: str
    num_samples: int


def resolve_shards(data: list[str] | str, settings: storage.S3Settings | None = None) -> list[Shard]:
    """Shards of every --data entry: an ingest output folder (its manifest.json, or the committed
    `*_stats.json` files when there is no manifest), a manifest.json URI, or a brace pattern of tar URIs
    (`s3://b/p/{00000..00041}.tar`, counts from each tar's sibling `_stats.json`). Local or S3."""
    entries = [data] if isinstance(data, str) else list(data)
    if not entries:
        raise ValueError("no training data given: pass --data with an ingest output folder, manifest or tars")
    shards: dict[str, Shard] = {}
    for entry in entries:
        found = [s for s in _resolve_entry(entry, settings) if s.num_samples > 0]
        if not found:
            raise ValueError(
                f"--data {entry!r} holds no committed shard with samples: point it at an ingest output "
                "folder, its manifest.json, or a brace pattern of .tar shards whose _stats.json exist"
            )
        shards.update((s.uri, s) for s in found)  # an entry listed twice counts once
    return list(shards.values())


def _resolve_entry(entry: str, settings: storage.S3Settings | None) -> list[Shard]:
    # Local paths become absolute: Ray Train workers need not share the driver's working directory.
    entry = storage.listing_root(entry)
    if entry.endswith(".json"):
        manifest = _read_json(entry, settings)
        if manifest is None:
            raise ValueError(
                f"--data {entry!r}: no such manifest; pass an ingest output folder or its manifest"
            )
        return _shards_from_manifest(_parent(entry), manifest)
    if entry.endswith(TAR_EXT) or "{" in entry:
        tars = list(braceexpand(entry))
        if not all(t.endswith(TAR_EXT) for t in tars):
            raise ValueError(f"--data {entry!r}: a brace pattern must expand to .tar URIs only")
        return _shards_from_stats(tars, settings)
    manifest = _read_json(manifest_uri(entry), settings)
    if manifest is not None:
        return _shards_from_manifest(entry, manifest)
    return _shards_from_stats(committed_tars(entry, settings=settings), settings)


def _shards_from_manifest(folder: str, manifest: dict[str, Any]) -> list[Shard]:
    return [
        Shard(storage.join(folder, s["files"]["tar"]), int(s["counts"][SUCCESS]))
        for s in manifest.get("shards", [])
    ]


def _shards_from_stats(tars: list[str], settings: storage.S3Settings | None) -> list[Shard]:
    stats_uris = [stats_uri_of_tar(t) for t in tars]
    with ThreadPoolExecutor(STATS_READ_THREADS) as pool:
        all_stats = list(pool.map(lambda uri: _read_json(uri, settings), stats_uris))
    for tar, stats in zip(tars, all_stats):
        if stats is None:
            raise ValueError(
                f"shard {tar} has no _stats.json, so the ingest job never committed it: rerun ingest or "
                "leave the shard out of --data"
            )
    return [Shard(tar, int(stats["successes"])) for tar, stats in zip(tars, all_stats)]


def _read_json(uri: str, settings: storage.S3Settings | None) -> dict[str, Any] | None:
    if not storage.exists(uri, settings=settings):
        return None
    return json.loads(storage.read_bytes(uri, settings=settings))


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(uri)


# ---------------------------------------------------------------------------------------------------------
# One stream's raw samples: its shards of each epoch, read as tar streams


@dataclass(frozen=True)
class ShardPart:
    """Samples part, part + parts, part + 2 * parts, ... of a shard (the whole shard when parts == 1)."""

    shard: Shard
    part: int
    parts: int

    @property
    def num_samples(self) -> int:
        return len(range(self.part, self.shard.num_samples, self.parts))


@dataclass
class RawSample:
    key: str
    epoch: int
    image: bytes | None  # None: the tar holds no image member for this key
    caption: bytes | None  # None: no .txt member


@dataclass
class StreamCounters:
    """What a stream has met so far; the reader adds samples lost in bad shards as it meets them."""

    corrupt: int = 0
    failures_in_a_row: int = 0

    def failed(self, count: int = 1) -> None:
        self.corrupt += count
        self.failures_in_a_row += count


def epoch_parts(shards: list[Shard], num_streams: int, seed: int, epoch: int) -> list[list[ShardPart]]:
    """The shard parts each of the num_streams global streams reads in one epoch: the shards permuted with
    (seed, epoch) and dealt round-robin. With fewer shards than streams each shard is split into interleaved
    parts (sample i goes to part i % parts), so no stream is idle."""
    parts = math.ceil(num_streams / len(shards))
    units = [ShardPart(shard, part, parts) for shard in shards for part in range(parts)]
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    units = [units[i] for i in order]
    return [units[stream::num_streams] for stream in range(num_streams)]


def read_shard_part(
    part: ShardPart, epoch: int, counters: StreamCounters, settings: storage.S3Settings | None = None
) -> Iterator[RawSample]:
    """The raw samples of a shard part, streamed; samples a truncated or unreadable shard lost are counted.

    A read that fails for a reason outside the tar's bytes (network, store) is retried from where it broke,
    so a passing failure leaves the stream exactly as an uninterrupted read, which resume relies on.
    """
    yielded = 0
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            excluded = _excluded_keys(part.shard.uri, settings)
            # "r|": a forward-only stream, so S3 bodies are read as they arrive and never land on disk.
            with (
                storage.open_read(part.shard.uri, settings=settings) as stream,
                tarfile.open(fileobj=stream, mode="r|") as tar,
            ):
                for index, sample in enumerate(_samples_in_tar(tar, epoch, excluded)):
                    # index // parts: the sample's place in this part; those before `yielded` went out already.
                    if index % part.parts == part.part and index // part.parts >= yielded:
                        yielded += 1
                        yield sample
            break
        except (tarfile.TarError, FileNotFoundError) as error:  # reading again would meet the same bytes
            log.warning("shard %s is damaged after %d samples: %s", part.shard.uri, yielded, error)
            break
        except Exception as error:  # any other failure costs the shard's remaining samples, not the run
            log.warning("shard %s unreadable (attempt %d): %s", part.shard.uri, attempt, error)
            if attempt < READ_ATTEMPTS:
                time.sleep(RETRY_PAUSE_S * attempt)
    # A tar cut at a member boundary ends without an error; the stats count tells us what is missing.
    lost = part.num_samples - yielded
    if lost > 0:
        counters.failed(lost)


@functools.lru_cache(maxsize=4096)
def _excluded_keys(tar: str, settings: storage.S3Settings | None) -> frozenset[str]:
    # Read once per shard per process: a stream meets each shard once per epoch.
    return excluded_keys_of_tar(tar, settings)


def _samples_in_tar(tar: tarfile.TarFile, epoch: int, excluded: frozenset[str]) -> Iterator[RawSample]:
    """The tar's samples but those its stats exclude (content duplicates, CLIP-score rejects found after the
    tar was written): they are not part of the dataset, and the stats' success count leaves them out."""
    for key, members in tar_samples(tar, keep=(*IMAGE_EXTS, CAPTION_EXT)):
        if key not in excluded:
            yield RawSample(key, epoch, sample_image(members), members.get(CAPTION_EXT))


def stream_raw_samples(
    shards: list[Shard],
    stream: int,
    num_streams: int,
    seed: int,
    shuffle_buffer: int,
    counters: StreamCounters,
    start_epoch: int = 0,
    settings: storage.S3Settings | None = None,
) -> Iterator[RawSample]:
    """One global stream's raw samples, shuffled within each epoch, epoch after epoch, forever.

    The buffer is drained at each epoch's end, so an epoch's order depends on nothing before it: a resumed
    stream replays from the start of its current epoch only. Near an epoch boundary a stream with fewer
    samples already serves epoch e+1 while another still serves epoch e; within one stream's epoch every
    sample comes exactly once.
    """
    num_samples = sum(s.num_samples for s in shards)
    for epoch in itertools.count(start_epoch):
        parts = epoch_parts(shards, num_streams, seed, epoch)[stream]
        samples = itertools.chain.from_iterable(
            _checked(read_shard_part(part, epoch, counters, settings), counters, num_samples)
            for part in parts
        )
        yield from shuffled(samples, shuffle_buffer, random.Random(f"clip-ray/{seed}/{stream}/{epoch}"))


def _checked(samples: Iterator[RawSample], counters: StreamCounters, num_samples: int) -> Iterator[RawSample]:
    yield from samples
    # Without this a stream whose every shard is unreadable would search for a sample forever.
    if counters.failures_in_a_row >= num_samples:
        raise NoUsableSamplesError(f"{counters.failures_in_a_row} failures in a row")


def shuffled(samples: Iterator[RawSample], buffer_size: int, rng: random.Random) -> Iterator[RawSample]:
    """Shuffle within a buffer: each new sample takes the place of a randomly drawn one, which is yielded."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[RawSample] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------------------------------------------------
# One stream's batches (runs in a DataLoader worker process)


@dataclass(frozen=True)
class LoaderSpec:
    """Everything that fixes the batches of one rank: the same spec gives the same batches. It is pickled
    into every DataLoader worker process.

    num_workers: DataLoader worker processes; 0 runs the rank's streams in the training process.
    max_world_size: the most ranks of the run (None: world_size). The streams are laid out for that many,
    `streams_per_rank` each; at a smaller world size rank r serves the streams of every slot q with
    q % world_size == r, so the streams, and what each yields, do not depend on the world size.
    """

    shards: tuple[Shard, ...]
    rank: int
    world_size: int
    local_batch_size: int
    image_size: int
    num_workers: int
    shuffle_buffer: int
    seed: int
    settings: storage.S3Settings | None = None
    max_world_size: int | None = None

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("the loader needs at least one shard")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.max_world_size is not None and self.max_world_size < self.world_size:
            raise ValueError(f"world size {self.world_size} is above max_world_size {self.max_world_size}")
        if self.local_batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("local_batch_size must be >= 1, num_workers and shuffle_buffer >= 0")

    @classmethod
    def from_config(cls, cfg: TrainConfig, shards: list[Shard], rank: int, world_size: int) -> LoaderSpec:
        """The spec of training worker `rank`'s loader under cfg."""
        return cls(
            shards=tuple(shards),
            rank=rank,
            world_size=world_size,
            local_batch_size=cfg.local_batch_size,
            image_size=clip_core.get_model_config(cfg.model)["vision_cfg"]["image_size"],
            num_workers=cfg.loader_workers,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            max_world_size=cfg.workers,
        )

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def num_slots(self) -> int:
        return self.max_world_size or self.world_size

    @property
    def num_streams(self) -> int:
        return self.num_slots * self.streams_per_rank

    @property
    def stream_ids(self) -> list[int]:
        """The global streams this rank serves, in the order its batches take them."""
        slots = range(self.rank, self.num_slots, self.world_size)
        return [slot * self.streams_per_rank + i for slot in slots for i in range(self.streams_per_rank)]

    def worker_streams(self) -> list[list[int]]:
        """The streams of each DataLoader worker (one list for num_workers=0): worker i serves the i-th stream
        of each of the rank's slots, so that at full world size each worker has one stream."""
        ids = self.stream_ids
        return [ids[i :: self.streams_per_rank] for i in range(self.streams_per_rank)]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


@dataclass
class StreamPosition:
    """Where one stream is: its epoch, shuffled raw samples of that epoch consumed, batches made, and its
    counters at that point."""

    epoch: int = 0
    raw: int = 0
    batches: int = 0
    corrupt: int = 0
    failures_in_a_row: int = 0


def decode_sample(sample: RawSample, transform) -> tuple[torch.Tensor, str] | None:
    """(image tensor, caption), or None for a corrupt sample."""
    if sample.image is None or sample.caption is None:
        return None
    try:
        caption = sample.caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if not caption:
        return None
    try:
        with Image.open(io.BytesIO(sample.image)) as image:
            return transform(image), caption
    except Exception:  # PIL raises many types for bad bytes (OSError, ValueError, SyntaxError, ...)
        return None


def stream_batches(spec: LoaderSpec, stream: int, start: StreamPosition) -> Iterator[tuple]:
    """Batches (images, texts, state) of global stream `stream`, forever; state says where the stream is
    after it."""
    counters = StreamCounters()
    samples = stream_raw_samples(
        list(spec.shards),
        stream,
        spec.num_streams,
        spec.seed,
        spec.shuffle_buffer,
        counters,
        start.epoch,
        spec.settings,
    )
    # Resume: the epoch's bytes come again in the same order, so skipping costs reading, not decoding; the
    # counters are then those saved, which already include what the skipped samples met.
    for _ in range(start.raw):
        next(samples)
    counters.corrupt, counters.failures_in_a_row = start.corrupt, start.failures_in_a_row
    epoch, raw, batches = start.epoch, start.raw, start.batches
    transform = clip_core.image_transform(spec.image_size, is_train=True)
    while True:
        images, captions, keys = [], [], []
        # Crops depend only on (seed, stream, batch), so a resumed stream crops as the uninterrupted one.
        # fork_rng: with num_workers=0 this runs in the training process, whose RNG must not be touched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([spec.seed, stream, batches]).generate_state(1)[0]))
            while len(images) < spec.local_batch_size:
                sample = next(samples)
                if sample.epoch != epoch:
                    epoch, raw = sample.epoch, 0
                raw += 1
                decoded = decode_sample(sample, transform)
                if decoded is None:
                    counters.failed()
                else:
                    counters.failures_in_a_row = 0
                    images.append(decoded[0])
                    captions.append(decoded[1])
                    keys.append((sample.epoch, sample.key))
                if counters.failures_in_a_row >= spec.num_samples:
                    raise NoUsableSamplesError(
                        f"stream {stream}: {counters.failures_in_a_row} failures in a row"
                    )
        batches += 1
        state = {
            "stream": stream,
            "position": asdict(
                StreamPosition(epoch, raw, batches, counters.corrupt, counters.failures_in_a_row)
            ),
            "keys": keys,
        }
        yield torch.stack(images), clip_core.tokenize(captions), state


def round_robin_batches(
    spec: LoaderSpec, streams: list[int], positions: dict[int, StreamPosition]
) -> Iterator[tuple]:
    """Batches of several streams in turn. The turn goes on from the batches the streams have made, so a
    resumed group takes the stream whose turn it was."""
    iterators = [stream_batches(spec, stream, positions[stream]) for stream in streams]
    first = sum(positions[stream].batches for stream in streams)
    for turn in itertools.count(first):
        yield next(iterators[turn % len(iterators)])


class RankStreams(IterableDataset):
    """The DataLoader's dataset: worker i serves stream group (i + rotation) % streams_per_rank."""

    def __init__(self, spec: LoaderSpec, positions: dict[int, StreamPosition], rotation: int):
        self.spec, self.positions, self.rotation = spec, positions, rotation

    def __iter__(self):
        info = get_worker_info()
        worker = 0 if info is None else info.id
        groups = self.spec.worker_streams()
        return round_robin_batches(self.spec, groups[(worker + self.rotation) % len(groups)], self.positions)


def _worker_init(worker_id: int) -> None:
    storage.forget_clients()  # workers are forked


# ---------------------------------------------------------------------------------------------------------
# The loader the trainer uses


class TrainLoader:
    """Batches (images float[B,3,H,W], texts long[B,77]) for the rank of `spec`, forever.

    position: a dict from `position()` (or `gather_positions`) of an earlier run, to continue from there.
    pin_memory, prefetch_factor: how the DataLoader hands batches over; they do not change the batches.
    with_keys: also yield each batch's [(epoch, sample key)] (for tests and debugging).
    """

    def __init__(
        self,
        spec: LoaderSpec,
        position: dict | None = None,
        *,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        with_keys: bool = False,
    ):
        self.spec = spec
        self.pin_memory, self.prefetch_factor, self.with_keys = pin_memory, prefetch_factor, with_keys
        self.positions = {stream: StreamPosition() for stream in spec.stream_ids}
        self.samples_seen = 0  # all ranks together, since the run began
        self.wait_seconds = 0.0
        self._batch_iterator: Iterator | None = None
        if position is not None:
            self._restore(position)

    # -- position --------------------------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        """What must be the same for saved stream positions to mean the same samples."""
        spec = self.spec
        return {
            "num_streams": spec.num_streams,
            "local_batch_size": spec.local_batch_size,
            "seed": spec.seed,
            "shuffle_buffer": spec.shuffle_buffer,
            "num_samples": spec.num_samples,
            "num_shards": len(spec.shards),
        }

    def position(self) -> dict[str, Any]:
        """The JSON-serialisable data position after the batches yielded so far, for this rank's streams:
        each one's epoch and how many shuffled raw samples of that epoch it has consumed. The trainer saves
        `gather_positions(loader)`, which holds every stream's."""
        return {
            "format": POSITION_FORMAT,
            **self._layout(),
            "world_size": self.spec.world_size,  # for the record: any world size resumes
            "samples_seen": self.samples_seen,
            "streams": {str(stream): asdict(p) for stream, p in self.positions.items()},
        }

    def _restore(self, position: dict) -> None:
        """Continue exactly where `position` stopped, at any world size: each of this rank's streams replays
        its epoch from the start and skips the consumed samples without decoding them (reading at most one
        stream-epoch of bytes). If the layout changed (the number of streams, the micro-batch, the data...)
        or a stream has no entry, restart the epoch in progress under the new layout."""
        position = _upgraded(position)
        self.samples_seen = int(position["samples_seen"])
        saved = position.get("streams", {})
        changed = [k for k, v in self._layout().items() if position.get(k) != v]
        missing = [s for s in self.positions if str(s) not in saved]
        if not changed and not missing:
            self.positions = {s: StreamPosition(**saved[str(s)]) for s in self.positions}
            return
        # Raw positions mean nothing under another layout: start the epoch in progress over.
        epoch = self.samples_seen // self.spec.num_samples
        self.positions = {s: StreamPosition(epoch=epoch) for s in self.positions}
        why = f"{', '.join(changed)} changed" if changed else f"it holds no entry for streams {missing}"
        log.warning(
            "data position not resumable exactly (%s): restarting epoch %d from its first shard, so samples "
            "already seen in this epoch are seen again",
            why,
            epoch,
        )

    @property
    def corrupt_samples(self) -> int:
        """Corrupt samples this rank's streams skipped (including those lost in bad shards)."""
        return sum(p.corrupt for p in self.positions.values())

    @property
    def epoch(self) -> float:
        return self.samples_seen / self.spec.num_samples

    # -- iteration -------------------------------------------------------------------------------------

    def _start(self) -> Iterator:
        spec = self.spec
        # Rotating the workers makes the resumed round-robin continue with the worker whose turn it was.
        batches = sum(p.batches for p in self.positions.values())
        dataset = RankStreams(spec, self.positions, rotation=batches % spec.streams_per_rank)
        if spec.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(
            dataset,
            batch_size=None,  # workers make whole batches: one pickle per batch, not per sample
            num_workers=spec.num_workers,
            prefetch_factor=self.prefetch_factor,
            pin_memory=self.pin_memory,
            worker_init_fn=_worker_init,
        )
        # One iterator for the whole run: its worker processes live as long as the loader.
        return iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> tuple:
        if self._batch_iterator is None:
            self._batch_iterator = self._start()
        started = time.perf_counter()
        try:
            images, texts, state = next(self._batch_iterator)
        except NoUsableSamplesError:
            self.close()
            raise NoUsableSamplesError(
                f"no usable training sample: a loader stream met {self.spec.num_samples} failures in a row (as "
                "many as the data holds), so every image is undecodable or every shard unreadable; check "
                "that --data points at ingest output with images and captions, and the S3 credentials"
            ) from None
        self.wait_seconds += time.perf_counter() - started
        self.positions[int(state["stream"])] = StreamPosition(**state["position"])
        self.samples_seen += self.spec.local_batch_size * self.spec.world_size
        if not self.with_keys:
            return images, texts
        # The DataLoader's conversion turns tuples into lists on their way out of the worker.
        return images, texts, [(int(epoch), str(key)) for epoch, key in state["keys"]]

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage collected)."""
        self._batch_iterator = None

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def gather_positions(loader: TrainLoader) -> dict[str, Any]:
    """Every rank's data position in one dict (a collective: call it on every rank at the same step)."""
    position = loader.position()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return position
    every_rank: list[dict | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every_rank, position)
    for other in every_rank:
        position["streams"].update(other["streams"])
    return position


def _upgraded(position: dict) -> dict:
    """A position in the current format. Format 1 keyed streams by rank, with rank r's local stream i being
    global stream r * streams_per_rank + i, laid out for its world size."""
    if position.get("format") == POSITION_FORMAT:
        return position
    if position.get("format") != 1:
        raise ValueError(f"data position has format {position.get('format')}, expected {POSITION_FORMAT}")
    per_rank = max(1, int(position["num_workers"]))
    streams = {
        str(int(rank) * per_rank + i): stream
        for rank, rank_streams in position.get("ranks", {}).items()
        for i, stream in enumerate(rank_streams)
    }
    kept = ("local_batch_size", "seed", "shuffle_buffer", "num_samples", "num_shards", "samples_seen")
    return {
        "format": POSITION_FORMAT,
        "num_streams": int(position["world_size"]) * per_rank,
        **{k: position[k] for k in kept},
        "world_size": position["world_size"],
        "streams": streams,
    }
