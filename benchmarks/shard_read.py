"""Per-shard read time of the ingest reader from Parquet URL lists written with 1M-row and with 10k-row row
groups, for code versions given by --code (source folders put first on PYTHONPATH: this checkout, or another
commit's `git archive`), each measured in a fresh process.

For each layout: the planning time (which, from this version on, copies a file of oversized row groups once
into shard-sized ones), then the time to read a sample of shards whole (what a staging task reads) and their
URLs alone (what URL dedup reads: `read_shard_urls` where the code has it, else `read_shard` and a select, as
job.ReadUrls did). Input: --rows rows of url, caption and a float column on local disk, 10,000 per shard.

    git archive 62280ef | tar -x -C /tmp/before-src
    PYTHONPATH=$PWD .venv/bin/python benchmarks/shard_read.py --code /tmp/before-src .
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_SHARD = 10_000


def write_input(path: Path, rows: int, row_group: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = pc.cast(pa.array(range(rows), pa.int64()), pa.string())
    table = pa.table(
        {
            "url": pc.binary_join_element_wise("https://images.example.com/photos/2024/", ids, ".jpg", ""),
            "caption": pc.binary_join_element_wise(
                "a photograph of a scene, number ", ids, " in the set", ""
            ),
            "similarity": pc.divide(pa.array(range(rows), pa.float64()), float(rows)),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)


def measure(input_path: str, output: str, sample: int) -> dict:
    from pipelines.ingest import reader
    from pipelines.ingest.config import IngestConfig

    cfg = IngestConfig(input=input_path, output=output, samples_per_shard=SAMPLES_PER_SHARD)
    started = time.perf_counter()
    specs = reader.plan_shards(cfg)
    plan_s = time.perf_counter() - started
    # Shards spread over the file: its start, middle and end, where an in-place read of a big group differs.
    chosen = [specs[round(i * (len(specs) - 1) / max(1, sample - 1))] for i in range(sample)]

    def read_urls(spec):
        if hasattr(reader, "read_shard_urls"):
            return reader.read_shard_urls(cfg, spec)
        return reader.read_shard(cfg, spec).select(["row_index", "key", "url"])

    timings = {}
    for name, read in (("shard", lambda s: reader.read_shard(cfg, s)), ("urls", read_urls)):
        seconds = []
        for spec in chosen:
            started = time.perf_counter()
            table = read(spec)
            seconds.append(time.perf_counter() - started)
            assert table.num_rows == spec.num_rows
        timings[name] = seconds
    return {
        "shards": len(specs),
        "plan_s": round(plan_s, 3),
        "shard_read_s_median": round(statistics.median(timings["shard"]), 4),
        "urls_read_s_median": round(statistics.median(timings["urls"]), 4),
        "shard_read_s": [round(s, 4) for s in timings["shard"]],
        "regrouped": any(p.file.cached for s in specs for p in s.slices),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=3, metavar=("INPUT", "OUTPUT", "SAMPLE"), help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--row-groups", type=int, nargs="+", default=[1_000_000, 10_000])
    parser.add_argument("--sample", type=int, default=5, help="shards read per layout")
    parser.add_argument("--code", type=Path, nargs="+", default=[REPO])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "shard_read.json")
    args = parser.parse_args()
    if args.measure:
        input_path, output, sample = args.measure
        print(json.dumps(measure(input_path, output, int(sample))))
        return

    results = []
    with tempfile.TemporaryDirectory(prefix="shard-read-") as tmp:
        for row_group in args.row_groups:
            input_path = Path(tmp) / f"groups-{row_group}" / "urls.parquet"
            write_input(input_path, args.rows, row_group)
            for code in args.code:
                output = Path(tmp) / f"out-{row_group}-{len(results)}"
                command = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--measure",
                    str(input_path),
                    str(output),
                ]
                env = {**os.environ, "PYTHONPATH": str(code.resolve()), "NO_ALBUMENTATIONS_UPDATE": "1"}
                done = subprocess.run(
                    command + [str(args.sample)], env=env, capture_output=True, text=True, cwd=code
                )
                if done.returncode != 0:
                    raise SystemExit(f"{code} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                result = {
                    "row_group": row_group,
                    "code": str(code),
                    **json.loads(done.stdout.splitlines()[-1]),
                }
                results.append(result)
                print(result, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(
        f"\nShard reads, {args.rows:,} rows, {SAMPLES_PER_SHARD:,} per shard, {os.cpu_count()} cores, {date.today()}"
    )
    print(
        "| row group | code | plan s | shard read s (median) | URL read s (median) |\n|---:|---|---:|---:|---:|"
    )
    for r in results:
        print(
            f"| {r['row_group']:,} | {r['code']} | {r['plan_s']} | {r['shard_read_s_median']} "
            f"| {r['urls_read_s_median']} |"
        )


if __name__ == "__main__":
    main()
