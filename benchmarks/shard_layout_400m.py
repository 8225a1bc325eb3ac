"""The shard layout of 400M samples, simulated: file counts and sizes from a real small ingest's measured bytes
per sample, and the cost of listing and indexing that many shards on S3, measured by creating every object
name of a 40,000-shard output (tiny objects, real stats files) in the local stack's S3 store and timing the
project's own code on it: the resume check (`committed_shards`), `write_manifest` and the trainer's
`resolve_shards`.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/shard_layout_400m.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_scaling import ingest  # noqa: E402
from ingest_vs_img2dataset import REPO, generate_images, start_nginx  # noqa: E402

from infra import local  # noqa: E402
from pipelines import storage  # noqa: E402
from pipelines.formats import shards as shard_format  # noqa: E402
from pipelines.ingest import write_manifest  # noqa: E402

TARGET_SAMPLES = 400_000_000
S3_PAGE = 1000  # keys per ListObjectsV2 page (the S3 maximum)


def measure_small_ingest(rows: int, env: dict) -> tuple[dict, dict]:
    """Ingest `rows` unique URL rows (256 px keep_ratio, 1,000 per shard, content dedup off) and return the
    measured sizes and one real `_stats.json` of the output."""
    names = generate_images(REPO / "benchmarks" / "out" / "ingest_images", 5000)
    head_pid = json.loads((local.DEFAULT_STATE_DIR / "run" / "ray.json").read_text())["pid"]
    with tempfile.TemporaryDirectory(prefix="shard-layout-") as tmp:
        nginx, port = start_nginx(REPO / "benchmarks" / "out" / "ingest_images", Path(tmp) / "nginx")
        try:
            measured = ingest(rows, names, port, Path(tmp), env, head_pid, keep_output=True)
        finally:
            nginx.terminate()
            nginx.wait()
        stats = json.loads((Path(tmp) / f"out-{rows}" / shard_format.stats_name(0)).read_text())
    return measured, stats


def layout(samples_per_shard: int, tar_bytes_per_sample: float, parquet_bytes_per_row: float) -> dict:
    shards = math.ceil(TARGET_SAMPLES / samples_per_shard)
    return {
        "samples_per_shard": samples_per_shard,
        "shards": shards,
        "objects": 3 * shards + 1,  # .tar, .parquet, _stats.json per shard, and manifest.json
        "tar_mb_per_shard": round(samples_per_shard * tar_bytes_per_sample / 1e6, 1),
        "tar_tb_total": round(TARGET_SAMPLES * tar_bytes_per_sample / 1e12, 2),
        "parquet_gb_total": round(TARGET_SAMPLES * parquet_bytes_per_row / 1e9, 1),
        "list_pages": math.ceil((3 * shards + 1) / S3_PAGE),
    }


def create_objects(
    prefix: str, shards: int, stats_example: dict, samples_per_shard: int, threads: int
) -> float:
    """Every object name of a `shards`-shard output under `prefix`: empty .tar and .parquet, real-shaped stats.
    Returns the seconds taken."""

    # The small ingest's shard held fewer samples: scale its counts and bytes to the simulated shard size.
    scale = samples_per_shard / stats_example["count"]

    def put_shard(shard_id: int) -> None:
        stats = json.loads(json.dumps(stats_example))
        stats |= {
            "shard_id": shard_id,
            "row_range": [shard_id * samples_per_shard, (shard_id + 1) * samples_per_shard],
            "files": {"tar": shard_format.tar_name(shard_id), "parquet": shard_format.parquet_name(shard_id)},
        }
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            stats[key] = round(stats[key] * scale)
        for group in ("counts", "status_dict", "bytes_written"):
            stats[group] = {k: round(v * scale) for k, v in stats[group].items()}
        storage.write_bytes(shard_format.tar_uri(prefix, shard_id), b"")
        storage.write_bytes(shard_format.parquet_uri(prefix, shard_id), b"")
        storage.write_bytes(shard_format.stats_uri(prefix, shard_id), json.dumps(stats, indent=4).encode())

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put_shard, range(shards)))
    return time.perf_counter() - started


def timed(function, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sample-rows", type=int, default=2000, help="rows of the real ingest that sizes samples"
    )
    parser.add_argument("--shards", type=int, default=40_000, help="shards whose objects are created on S3")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "shard_layout_400m.json")
    args = parser.parse_args()

    from pipelines.train.data import resolve_shards

    with local.leased() as env:
        os.environ.update(env)  # storage reads AWS_* from the environment
        measured, stats_example = measure_small_ingest(args.sample_rows, env)
        print(f"measured on {args.sample_rows:,} rows: {json.dumps(measured)}", flush=True)
        tar_bps = measured["tar_bytes_per_sample"]
        parquet_bpr = measured["parquet_bytes_per_row"]
        layouts = [layout(n, tar_bps, parquet_bpr) for n in (1_000, 5_000, 10_000, 20_000, 50_000)]

        prefix = f"s3://{local.DATA_BUCKET}/benchmarks/shard-layout-{uuid.uuid4().hex[:8]}"
        try:
            put_seconds = create_objects(
                prefix, args.shards, stats_example, args.samples_per_shard, args.threads
            )
            objects = 3 * args.shards
            print(f"created {objects:,} objects in {put_seconds:.1f} s ({objects / put_seconds:.0f} PUT/s)")
            list_seconds, entries = timed(lambda: storage.list_files(prefix), args.repeats)
            assert len(entries) == objects, (len(entries), objects)
            committed_seconds, committed = timed(lambda: shard_format.committed_shards(prefix), args.repeats)
            assert len(committed) == args.shards
            manifest_seconds, manifest = timed(lambda: write_manifest(prefix, expected_shards=args.shards), 1)
            manifest_bytes = len(storage.read_bytes(shard_format.manifest_uri(prefix)))
            resolve_seconds, shards = timed(lambda: resolve_shards([prefix]), args.repeats)
            assert len(shards) == args.shards and manifest["complete"]
        finally:
            started = time.perf_counter()
            storage.delete(prefix, recursive=True)
            delete_seconds = time.perf_counter() - started

    pages = math.ceil((objects + 1) / S3_PAGE)
    result = {
        "date": str(date.today()),
        "cores": os.cpu_count(),
        "measured_ingest": measured,
        "layouts_400m": layouts,
        "simulated_shards": args.shards,
        "simulated_objects": objects + 1,
        "put_seconds": round(put_seconds, 1),
        "put_per_s": round(objects / put_seconds),
        "list_files_seconds": round(list_seconds, 2),
        "list_pages": pages,
        "seconds_per_list_page": round(list_seconds / pages, 4),
        "committed_shards_seconds": round(committed_seconds, 2),
        "write_manifest_seconds": round(manifest_seconds, 1),
        "manifest_bytes": manifest_bytes,
        "resolve_shards_seconds": round(resolve_seconds, 2),
        "delete_seconds": round(delete_seconds, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))

    print(f"\n400M samples at {tar_bps:,} tar bytes/sample (measured, 256 px keep_ratio), {date.today()}")
    print("| samples/shard | shards | objects | tar MB/shard | tar TB total | parquet GB | LIST pages |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in layouts:
        print(
            f"| {row['samples_per_shard']:,} | {row['shards']:,} | {row['objects']:,} | {row['tar_mb_per_shard']:,} "
            f"| {row['tar_tb_total']} | {row['parquet_gb_total']} | {row['list_pages']} |"
        )
    print(f"\nSimulated on the local S3 store (SeaweedFS): {args.shards:,} shards = {objects + 1:,} objects")
    for key in (
        "put_per_s", "list_files_seconds", "seconds_per_list_page", "committed_shards_seconds",
        "write_manifest_seconds", "manifest_bytes", "resolve_shards_seconds", "delete_seconds",
    ):  # fmt: skip
        print(f"  {key}: {result[key]:,}")


if __name__ == "__main__":
    main()
