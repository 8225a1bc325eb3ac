"""Driver memory and time of the ingest job's planning and run-wide URL dedup at millions of rows, without
downloading anything: each size runs in a fresh process that calls reader.plan_shards and then
job.run_wide_duplicates with job.ReadUrls, as job.run does (in the driver up to DRIVER_DEDUP_MAX_ROWS rows,
hash-partitioned on a local Ray above). The process's resident memory is sampled every 0.1 s, and the peak
of its whole tree (driver plus, on the Ray path, its raylet, object store and workers) too.

Input: synthetic Parquet URL lists on local disk, 1M rows per file written with pyarrow's default row groups
(one per file), 1 % of the URLs repeating an earlier one; 10,000 rows per shard. Extends
benchmarks/ingest_memory.py (its tree_rss) to sizes where downloads would take days on this machine.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ingest_planning.py --rows 1000000 5000000 20000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_memory import tree_rss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_SHARD = 10_000
ROWS_PER_FILE = 1_000_000
REPEAT_EVERY = 100  # every 100th row repeats the URL of the row before it


def write_inputs(folder: Path, rows: int) -> Path:
    """rows URL rows in files of ROWS_PER_FILE, made once and kept in `folder`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        path = folder / f"part-{index:05d}.parquet"
        if path.exists():
            continue
        n = min(ROWS_PER_FILE, rows - start)
        row = pa.array(range(start, start + n), pa.int64())
        repeat = pc.equal(pc.subtract(row, pc.multiply(pc.divide(row, REPEAT_EVERY), REPEAT_EVERY)), 0)
        repeat = pc.and_(repeat, pc.greater_equal(row, 1))
        target = pc.if_else(repeat, pc.subtract(row, 1), row)
        ids = pc.cast(target, pa.string())
        table = pa.table(
            {
                "url": pc.binary_join_element_wise(
                    "https://images.example.com/photos/2024/", ids, ".jpg", ""
                ),
                "caption": pc.binary_join_element_wise(
                    "a photograph of scene ", pc.cast(row, pa.string()), ""
                ),
            }
        )
        pq.write_table(table, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return folder


def measure(input_folder: str, output: str) -> dict:
    from pipelines.ingest import job, reader
    from pipelines.ingest.config import IngestConfig

    rss = {"now": 0, "peak": 0, "tree_peak": 0}
    done = threading.Event()
    page = os.sysconf("SC_PAGE_SIZE")

    def sample() -> None:
        ticks = 0
        while not done.is_set():
            now = int(Path("/proc/self/statm").read_text().split()[1]) * page
            rss["peak"] = max(rss["peak"], now)
            if ticks % 5 == 0:  # the whole tree (a walk over /proc) twice a second
                rss["tree_peak"] = max(rss["tree_peak"], tree_rss(os.getpid()))
            ticks += 1
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    cfg = IngestConfig(input=input_folder, output=output, samples_per_shard=SAMPLES_PER_SHARD)
    started = time.perf_counter()
    specs = {spec.shard_id: spec for spec in reader.plan_shards(cfg)}
    num_rows = sum(spec.num_rows for spec in specs.values())
    plan_s = time.perf_counter() - started
    plan_peak = rss["peak"]
    on_ray = num_rows > job.DRIVER_DEDUP_MAX_ROWS
    if on_ray:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    items = [{"shard_id": s} for s in sorted(specs)]
    duplicates = job.run_wide_duplicates(job.ReadUrls(cfg, specs), items, "url", num_rows)
    dedup_s = time.perf_counter() - started
    done.set()
    return {
        "rows": num_rows,
        "shards": len(specs),
        "plan_s": round(plan_s, 1),
        "url_dedup_s": round(dedup_s, 1),
        "duplicates": duplicates.num_rows,
        "dedup_on": "ray" if on_ray else "driver",
        "plan_peak_mb": plan_peak >> 20,
        "driver_peak_mb": rss["peak"] >> 20,
        "tree_peak_mb": max(rss["tree_peak"], rss["peak"]) >> 20,  # the tree holds the driver
        "regrouped_files": len({p.file.uri for s in specs.values() for p in s.slices if p.file.cached}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000])
    parser.add_argument("--code", type=Path, default=REPO, help="source folder put first on PYTHONPATH")
    parser.add_argument("--inputs", type=Path, default=REPO / "benchmarks" / "out" / "planning_inputs")
    parser.add_argument("--timeout", type=float, default=560)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "ingest_planning.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    results = []
    for rows in args.rows:
        folder = write_inputs(args.inputs / f"rows-{rows}", rows)
        with tempfile.TemporaryDirectory(prefix="ingest-planning-") as output:
            command = [sys.executable, str(Path(__file__).resolve()), "--measure", str(folder), output]
            env = {**os.environ, "PYTHONPATH": str(args.code.resolve()), "NO_ALBUMENTATIONS_UPDATE": "1"}
            try:
                run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                results.append({"rows": rows, "error": f"not done after {args.timeout:.0f}s"})
                print(results[-1], flush=True)
                continue
            if run.returncode != 0:
                results.append({"rows": rows, "error": f"exit {run.returncode}: {run.stderr[-1500:]}"})
            else:
                results.append({"code": str(args.code), **json.loads(run.stdout.splitlines()[-1])})
            print(results[-1], flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    print(
        f"\nPlanning + URL dedup, {SAMPLES_PER_SHARD:,} rows per shard, {os.cpu_count()} cores, {date.today()}"
    )
    print(
        "| rows | plan s | URL dedup s (where) | driver peak MB | tree peak MB |\n|---:|---:|---:|---:|---:|"
    )
    for r in results:
        if "error" in r:
            print(f"| {r['rows']:,} | {r['error'][:80]} | | | |")
        else:
            print(
                f"| {r['rows']:,} | {r['plan_s']} | {r['url_dedup_s']} ({r['dedup_on']}) | {r['driver_peak_mb']:,} "
                f"| {r['tree_peak_mb']:,} |"
            )


if __name__ == "__main__":
    main()
