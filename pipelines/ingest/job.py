"""The ingest job on Ray Data: URL + caption lists to WebDataset tars and Parquet, one shard per unit of work.

It runs top to bottom like the pipeline:
  0. prepare    refuse an unsafe output or another run's output; remove what killed writes left
  1. plan       split the input into shards (same rows every time); committed shards are skipped
  2. url dedup  over the whole input, first occurrence by input order wins (hash-partitioned on Ray)
  3. stage      per shard: read rows, download, decode + resize, filter -> the shard's final tar, and its rows
                (no images) staged as Parquet
  4. clip score optional, per staged shard, in an actor pool (GPUs when asked for)
  5. dedup      content duplicates (sha256) over the whole run, first occurrence by input order wins
  6. write      per shard: parquet + stats (the commit), then the staged rows go
  7. manifest   totals, summary table, MLflow
Content dedup needs every shard's hashes before any shard can be final. The images go into their tar once, as
they are downloaded; the samples that content dedup or the CLIP score later turn away stay in the tar and are
listed in the shard's stats as excluded_keys, which every reader skips (formats.shards.EXCLUDED_KEYS). So the
store receives each image once, not twice as it would if the images were staged and then written again.
Steps 3 and 6 are one Ray task per shard, so a node that joins mid-run takes shards as soon as it is up, and a
node lost costs only its in-flight shards, which Ray runs again elsewhere. A job killed at any moment resumes
from what was staged or committed, and gives the rows an uninterrupted run gives.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipelines import failpoints, storage
from pipelines.formats import shards
from pipelines.formats.shards import DUPLICATE, FILTERED, SUCCESS
from pipelines.ingest import dedup, output, reader, writer
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.downloader import Downloader
from pipelines.ingest.filters import ClipScorer, filter_reasons
from pipelines.ingest.resizer import Resizer

DECODE_THREADS = 2
SUMMARY_EVERY_S = 5.0
# Up to this many input rows, run-wide dedup gathers its keys in the driver instead of shuffling on Ray.
DRIVER_DEDUP_MAX_ROWS = 5_000_000


# ---------------------------------------------------------------------------------------------------------
# 3. stage: the per-shard work, usable without Ray (tests call it directly)


@dataclass
class ShardStager:
    """Downloads, decodes, resizes and filters the rows of one shard. One per worker: the downloader keeps its
    connections and event loop across shards."""

    cfg: IngestConfig
    downloader: Downloader = field(init=False)
    resizer: Resizer = field(init=False)

    def __post_init__(self) -> None:
        import cv2

        # One decode thread per worker: Ray already runs a worker per core.
        cv2.setNumThreads(1)
        self.downloader = Downloader(self.cfg.download)
        self.resizer = Resizer(self.cfg)

    def stage(self, spec: reader.ShardSpec, url_duplicates: pa.Table) -> pa.Table:
        table = reader.read_shard(self.cfg, spec)
        nulls = pa.nulls(table.num_rows, pa.string())
        table = table.append_column("status", nulls).append_column("error_message", nulls)
        if self.cfg.dedup.urls:
            table = dedup.apply_duplicates(table, url_duplicates, "url")
        rows = table.to_pylist()
        pending = [i for i, row in enumerate(rows) if row["status"] is None]
        progress = Progress(prefix=f"[ingest shard {spec.shard_id}]")
        with ThreadPoolExecutor(DECODE_THREADS) as decode:
            # Each body is decoded as soon as it arrives and then released, so the bytes a worker holds
            # (streaming or waiting to be decoded) stay within download.max_bytes_in_flight; downloads wait
            # for room when decoding falls behind. Decoding releases the GIL, so a second thread keeps both
            # cores busy when this worker runs a run's last shard alone.
            decoding: deque = deque()
            for n, download in self.downloader.stream(rows[i]["url"] for i in pending):
                row = rows[pending[n]]
                decoding.append((row, decode.submit(self._decode_and_filter, row, download)))
                while decoding and decoding[0][1].done():
                    self._count(progress, *decoding.popleft())
            while decoding:
                self._count(progress, *decoding.popleft())
        carried = [table.schema.field(name) for name in writer.carried_names(table.column_names)]
        return pa.Table.from_pylist(rows, schema=writer.staged_schema(carried, scored=False))

    @staticmethod
    def _count(progress: Progress, row: dict, decoded) -> None:
        decoded.result()
        # Workers' output reaches the driver's log, so long shards show progress every few seconds.
        progress.add({row["status"]: 1})

    def _decode_and_filter(self, row: dict, download) -> None:
        if download.status != SUCCESS:
            row["status"], row["error_message"] = download.status, download.error_message
            return
        try:
            image = self.resizer(download.body)
        finally:
            download.release()
        row.update(
            status=image.status,
            error_message=image.error_message,
            width=image.width,
            height=image.height,
            original_width=image.original_width,
            original_height=image.original_height,
            sha256=image.sha256,
            image=image.image if image.status == SUCCESS else None,
            image_ext=image.format if image.status == SUCCESS else None,
        )
        if image.status == SUCCESS:
            reasons = filter_reasons(
                image.original_width, image.original_height, row["caption"], self.cfg.filters
            )
            if reasons:
                row.update(status=FILTERED, error_message="; ".join(reasons), image=None, image_ext=None)

    def close(self) -> None:
        self.downloader.close()


def opencv_limits(cfg: IngestConfig) -> dict[str, str]:
    """OpenCV's own decode limits, from the config. OpenCV reads them from the environment once, when it is
    loaded, so they go into the staging workers' environment rather than being set at run time. They back up
    image_headers' checks: OpenCV only decodes bytes whose header those have passed."""
    return {
        "OPENCV_IO_MAX_IMAGE_PIXELS": str(cfg.max_image_pixels),
        "OPENCV_IO_MAX_IMAGE_WIDTH": str(min(cfg.max_image_pixels, 1 << 20)),
        "OPENCV_IO_MAX_IMAGE_HEIGHT": str(min(cfg.max_image_pixels, 1 << 20)),
    }


def write_table(uri: str, table: pa.Table, failpoint: str | None = None, shard_id: int | None = None) -> None:
    """Publish a Parquet file atomically: it appears whole or not at all."""
    with storage.open_write(uri) as out:
        pq.write_table(table, out)
        if failpoint is not None:
            failpoints.reach(failpoint, shard_id)  # written but not yet published


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open_read(uri) as source:
        return pq.read_table(io.BytesIO(source.read()), columns=columns)


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


# Ray may retry a shard task this many times when its worker or node is lost (a preempted or scaled-down
# node); errors raised by our code are not retried (they are per-sample rows already, or bugs).
SHARD_TASK_RETRIES = 20
# Staged rows record which keys the tar holds (their status may change later: CLIP score, content dedup).
IN_TAR = "in_tar"

_process_stager: tuple[str, ShardStager] | None = None  # (config, stager) of this worker process


def _stager(cfg: IngestConfig) -> ShardStager:
    """The worker process's stager for this config: Ray reuses a worker process for many shard tasks, and the
    downloader's connections and event loop carry over between them."""
    global _process_stager
    key = cfg.to_yaml()
    if _process_stager is None or _process_stager[0] != key:
        if _process_stager is not None:
            _process_stager[1].close()
        _process_stager = (key, ShardStager(cfg))
    return _process_stager[1]


def stage_shard(item: dict, cfg: IngestConfig, specs: dict[int, reader.ShardSpec]) -> dict:
    """Ray Data task for step 3, one shard: download, decode and filter its rows, write its tar, then stage
    its rows without images (the staged file's presence says the tar is complete). Returns counts by status."""
    started = time.time()
    shard_id = item["shard_id"]
    table = _stager(cfg).stage(specs[shard_id], _from_ipc(item["url_duplicates"]))
    failpoints.reach("stage.shard_done", shard_id)
    tar_keys, tar_bytes = writer.write_tar(cfg.output, shard_id, table)
    failpoints.reach("stage.tar_written", shard_id)
    rows = table.drop_columns(["image"])
    rows = rows.append_column(IN_TAR, pa.array(pc.is_in(rows["key"], pa.array(tar_keys, pa.string()))))
    rows = rows.replace_schema_metadata({b"tar_bytes": str(tar_bytes).encode()})
    write_table(writer.staged_uri(cfg.output, shard_id), rows, "stage.shard_writing", shard_id)
    failpoints.reach("stage.shard_written", shard_id)
    counts = Counter(table["status"].to_pylist())
    return {
        "shard_id": shard_id,
        "counts": json.dumps(counts),
        "seconds": time.time() - started,
        "node_id": ray.get_runtime_context().get_node_id(),
    }


def tar_images(output_uri: str, shard_id: int) -> dict[str, bytes]:
    """key -> image bytes of the samples in a shard's tar."""
    with (
        storage.open_read(shards.tar_uri(output_uri, shard_id)) as stream,
        tarfile.open(fileobj=stream, mode="r|") as tar,
    ):
        return {
            key: shards.sample_image(members)
            for key, members in shards.tar_samples(tar, keep=shards.SHARD_IMAGE_EXTS)
        }


class ScoreShards:
    """Ray Data actor-pool UDF for step 4: adds `clip_score` to a staged shard and filters below threshold,
    scoring the images its tar holds."""

    def __init__(self, cfg: IngestConfig, device: str):
        self.cfg = cfg
        score = self.cfg.filters.clip_score
        self.scorer = ClipScorer(score.checkpoint, score.model, score.threshold, score.batch_size, device)

    def __call__(self, item: dict) -> dict:
        uri = writer.staged_uri(self.cfg.output, item["shard_id"])
        table = read_table(uri)
        if "clip_score" not in table.column_names:
            metadata = table.schema.metadata
            images = tar_images(self.cfg.output, item["shard_id"])
            keys = table["key"].to_pylist()
            with_images = table.append_column("image", pa.array([images.get(k) for k in keys], pa.binary()))
            carried = [table.schema.field(name) for name in writer.carried_names(table.column_names)]
            schema = writer.staged_schema([f for f in carried if f.name != IN_TAR], scored=True)
            schema = schema.append(pa.field(IN_TAR, pa.bool_()))
            scored = pa.Table.from_pandas(self.scorer(with_images.to_pandas()), preserve_index=False)
            # Back to the staged types: pandas turns integer columns with nulls into floats.
            scored = scored.select(schema.names).cast(schema).drop_columns(["image"])
            write_table(uri, scored.replace_schema_metadata(metadata))
            failpoints.reach("score.shard_written", item["shard_id"])
        return {"shard_id": item["shard_id"]}


def write_shard(item: dict, cfg: IngestConfig) -> dict:
    """Ray Data task for step 6, one shard: marks content duplicates and commits the shard (its tar is
    written already), then removes its staged rows."""
    started = time.time()
    uri = writer.staged_uri(cfg.output, item["shard_id"])
    table = read_table(uri)
    tar_bytes = int(table.schema.metadata[b"tar_bytes"])
    if cfg.dedup.content:
        table = dedup.apply_duplicates(table, _from_ipc(item["content_duplicates"]), "content")
    tar_keys = pc.filter(table["key"], table[IN_TAR]).to_pylist()
    rows = table.drop_columns([IN_TAR])
    stats = writer.commit_shard(cfg.output, item["shard_id"], rows, tar_keys, tar_bytes, started)
    failpoints.reach("write.committed", item["shard_id"])
    storage.delete(uri)
    return {"shard_id": item["shard_id"], "counts": json.dumps(stats["counts"])}


# ---------------------------------------------------------------------------------------------------------
# 2 and 5: run-wide deduplication keys


class ReadUrls:
    def __init__(self, cfg: IngestConfig, specs: dict[int, reader.ShardSpec]):
        self.cfg = cfg
        self.specs = specs

    def __call__(self, batch: dict) -> pa.Table:
        return pa.concat_tables(
            [reader.read_shard_urls(self.cfg, self.specs[int(s)]) for s in batch["shard_id"]]
        )


# What content dedup reads from each shard, typed the same whether the shard is staged or committed.
HASH_SCHEMA = pa.schema(
    [
        pa.field("row_index", pa.int64()),
        pa.field("key", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("status", pa.string()),
    ]
)


class ReadHashes:
    """(row_index, key, sha256, status) of every downloaded row, from staged or committed shards. In committed
    shards a content duplicate was a success before dedup; URL duplicates have no sha256, so they stay out."""

    def __init__(self, output: str):
        self.output = output

    def __call__(self, batch: dict) -> pa.Table:
        tables = []
        for shard_id, committed in zip(batch["shard_id"], batch["committed"]):
            columns = ["row_index", "key", "sha256", "status"]
            if committed:
                table = read_table(shards.parquet_uri(self.output, int(shard_id)), columns)
                status = table["status"].to_pylist()
                sha = table["sha256"].to_pylist()
                status = [SUCCESS if s == DUPLICATE and h is not None else s for s, h in zip(status, sha)]
                table = table.set_column(3, "status", pa.array(status, pa.string()))
            else:
                table = read_table(writer.staged_uri(self.output, int(shard_id)), columns)
            tables.append(table.cast(HASH_SCHEMA))
        return pa.concat_tables(tables)


def run_wide_duplicates(read_keys, items: list[dict], kind: str, num_rows: int) -> pa.Table:
    """Duplicates over the whole run. Up to DRIVER_DEDUP_MAX_ROWS rows the keys are gathered in the driver
    (a shuffle costs more than it saves there); above, they are hash-partitioned across the cluster."""
    if num_rows <= DRIVER_DEDUP_MAX_ROWS:
        with ThreadPoolExecutor(16) as pool:
            tables = list(pool.map(lambda item: read_keys({k: [v] for k, v in item.items()}), items))
        return dedup.find_duplicates(pa.concat_tables(tables), dedup.KEY_COLUMNS[kind])
    ds = ray.data.from_items(items).map_batches(read_keys, batch_size=1, batch_format="numpy")
    partitions = max(1, min(256, num_rows // 1_000_000))
    return dedup.collect_duplicates(dedup.find_duplicates_on_ray(ds, kind, partitions))


def split_by_shard(duplicates: pa.Table, samples_per_shard: int, shard_ids) -> dict[int, bytes]:
    shard_of = pc.divide(duplicates["row_index"], samples_per_shard).to_pylist()
    rows: dict[int, list[int]] = {}
    for i, shard_id in enumerate(shard_of):
        rows.setdefault(shard_id, []).append(i)
    return {s: _ipc(duplicates.take(pa.array(rows.get(s, []), pa.int64()))) for s in shard_ids}


# ---------------------------------------------------------------------------------------------------------
# The job


@dataclass
class Progress:
    prefix: str = "[ingest]"
    started: float = field(default_factory=time.time)
    counts: Counter = field(default_factory=Counter)
    last_print: float = 0.0

    def add(self, counts: dict, force: bool = False) -> None:
        self.counts.update(counts)
        now = time.time()
        if force or now - self.last_print >= SUMMARY_EVERY_S:
            self.last_print = now
            done = sum(self.counts.values())
            elapsed = max(now - self.started, 1e-9)
            success = self.counts.get(SUCCESS, 0)
            failures = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()) if k != SUCCESS)
            print(
                f"{self.prefix} {done} rows, {success / elapsed:.1f} images/s, success rate "
                f"{success / max(done, 1):.1%}; {failures or 'no failures'}",
                flush=True,
            )


@dataclass
class IngestSummary:
    """What a run wrote: the output folder and its manifest (totals by status, shards, seconds)."""

    output: str
    manifest: dict

    def __str__(self) -> str:
        totals = {k: v for k, v in self.manifest["totals"].items() if k != "count"}
        rows = self.manifest["totals"]["count"]
        seconds = self.manifest["seconds"]
        rate = totals.get(SUCCESS, 0) / seconds if seconds else math.nan
        return "\n".join(
            ["", "| status | rows | share |", "|---|---:|---:|"]
            + [f"| {status} | {count} | {count / max(rows, 1):.1%} |" for status, count in totals.items()]
            + [
                "",
                f"{rows} input rows, {totals.get(SUCCESS, 0)} images in {seconds}s ({rate:.1f} images/s)",
                f"output: {self.output} ({len(self.manifest['shards'])} shards, manifest.json, config.yaml)",
            ]
        )


def run(cfg: IngestConfig) -> IngestSummary:
    """Run the whole ingest job and log it to MLflow when cfg.mlflow_experiment is set. Needs a Ray cluster
    (ray.init() is called if none)."""
    started = time.time()
    # Before anything is written: a safe location, the same run's output (or a fresh one), a store every node
    # shares; then no leftovers.
    checked = output.check(cfg)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    if not storage.is_s3(cfg.output):  # only a local output depends on how many nodes there are
        output.check_shared(cfg, len([n for n in ray.nodes() if n["Alive"]]))
    output.prepare(cfg, checked)
    storage.write_bytes(storage.join(cfg.output, "config.yaml"), cfg.to_yaml().encode())
    # None: as many shard tasks at once as the cluster has CPUs at each moment, nodes joining included.
    workers = cfg.concurrency.download_workers
    shard_tasks = ray.data.TaskPoolStrategy(size=workers) if workers else None

    last = [time.time()]

    def phase(name: str, detail: str = "") -> None:
        now = time.time()
        print(f"[ingest] {name} done in {now - last[0]:.1f}s" + (f": {detail}" if detail else ""), flush=True)
        last[0] = now

    # 1. plan
    specs = {spec.shard_id: spec for spec in reader.plan_shards(cfg)}
    num_rows = sum(spec.num_rows for spec in specs.values())
    committed = shards.committed_shards(cfg.output) & set(specs)
    staged = (writer.staged_shards(cfg.output) & set(specs)) - committed
    to_stage = sorted(set(specs) - committed - staged)
    phase(
        "plan",
        f"{num_rows} rows in {len(specs)} shards of up to {cfg.samples_per_shard}: {len(committed)} committed, "
        f"{len(staged)} staged, {len(to_stage)} to download",
    )
    failpoints.reach("plan.done")

    # 2. url dedup over the whole input
    url_duplicates = dedup.DUPLICATES_SCHEMA.empty_table()
    if cfg.dedup.urls and to_stage:
        items = [{"shard_id": s} for s in sorted(specs)]
        url_duplicates = run_wide_duplicates(ReadUrls(cfg, specs), items, "url", num_rows)
        phase("url dedup", f"{url_duplicates.num_rows} repeated urls")
        failpoints.reach("url_dedup.done")
    by_shard = split_by_shard(url_duplicates, cfg.samples_per_shard, to_stage)

    # 3. stage
    progress = Progress()
    if to_stage:
        items = [{"shard_id": s, "url_duplicates": by_shard[s]} for s in to_stage]
        # One block, so one task, per shard: tasks go to whatever CPUs the cluster has when each starts.
        staging = ray.data.from_items(items, override_num_blocks=len(items)).map(
            stage_shard,
            fn_kwargs={"cfg": cfg, "specs": specs},
            num_cpus=1,
            compute=shard_tasks,
            max_retries=SHARD_TASK_RETRIES,
            runtime_env={"env_vars": opencv_limits(cfg)},
        )
        for result in staging.iter_rows():
            progress.add(json.loads(result["counts"]))
        progress.add({}, force=True)
        phase("download, decode, resize, filter")

    # 4. clip score
    pending = sorted(set(specs) - committed)
    score = cfg.filters.clip_score
    if score is not None and pending:
        use_gpu = score.use_gpu and ray.cluster_resources().get("GPU", 0) > 0
        # On GPUs the pool grows up to one scorer per GPU the cluster has (or gains: the autoscaler may add
        # GPU nodes while the pool runs); on CPU one scorer, as the model uses every core of its node.
        scorers = ray.data.ActorPoolStrategy(
            min_size=1,
            max_size=max(1, int(ray.cluster_resources().get("GPU", 0)), len(pending)) if use_gpu else 1,
        )
        scoring = ray.data.from_items(
            [{"shard_id": s} for s in pending], override_num_blocks=len(pending)
        ).map(
            ScoreShards,
            fn_constructor_kwargs={"cfg": cfg, "device": "cuda" if use_gpu else "cpu"},
            compute=scorers,
            num_gpus=1 if use_gpu else 0,
        )
        scoring.materialize()
        phase("clip score")

    # 5. content dedup over the whole run
    content_duplicates = dedup.DUPLICATES_SCHEMA.empty_table()
    if cfg.dedup.content and pending:
        items = [{"shard_id": s, "committed": s in committed} for s in sorted(specs)]
        content_duplicates = run_wide_duplicates(ReadHashes(cfg.output), items, "content", num_rows)
        phase("content dedup", f"{content_duplicates.num_rows} repeated images")
        failpoints.reach("content_dedup.done")
    by_shard = split_by_shard(content_duplicates, cfg.samples_per_shard, pending)

    # 6. write
    if pending:
        items = [{"shard_id": s, "content_duplicates": by_shard[s]} for s in pending]
        writing = ray.data.from_items(items, override_num_blocks=len(items)).map(
            write_shard,
            fn_kwargs={"cfg": cfg},
            num_cpus=1,
            compute=shard_tasks,
            max_retries=SHARD_TASK_RETRIES,
        )
        writing.materialize()
        phase("write shards")

    # 7. manifest
    failpoints.reach("manifest.started")
    manifest = writer.write_manifest(cfg.output, expected_shards=len(specs))
    failpoints.reach("manifest.written")
    if manifest["complete"]:
        # A kill between a shard's commit and the removal of its staged file can leave one behind; the
        # Parquet copies of text inputs are only needed until every shard is in.
        storage.delete(storage.join(cfg.output, writer.STAGING_DIR), recursive=True)
        storage.delete(storage.join(cfg.output, reader.INPUT_CACHE_DIR), recursive=True)
    manifest["seconds"] = round(time.time() - started, 1)
    if cfg.mlflow_experiment:
        log_to_mlflow(cfg, manifest)
    return IngestSummary(cfg.output, manifest)


def log_to_mlflow(cfg: IngestConfig, manifest: dict) -> None:
    import mlflow

    from pipelines.tracking import use_tracking_server

    use_tracking_server()  # credentials of the tracking URI into the environment, out of the job's log
    mlflow.set_experiment(cfg.mlflow_experiment)
    with mlflow.start_run(run_name="ingest"):
        mlflow.log_text(cfg.to_yaml(), "config.yaml")
        mlflow.log_params({"input": cfg.input, "output": cfg.output, "image_size": cfg.image_size})
        mlflow.log_metrics({f"rows/{status}": n for status, n in manifest["totals"].items()})
        mlflow.log_metric("seconds", manifest["seconds"])
        reasons: Counter = Counter()
        for shard in manifest["shards"]:
            reasons.update(shards.read_stats(cfg.output, shard["shard_id"])["status_dict"])
        mlflow.log_dict(dict(reasons.most_common()), "failures_by_reason.json")
