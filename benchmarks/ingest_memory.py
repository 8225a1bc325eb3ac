"""Peak memory of the ingest job against input size: memory must stay bounded by configuration, not input.

Serves the benchmark's cached photo-like JPEGs with nginx and ingests N rows of URLs to them (each URL made
unique with a query string, so every row is downloaded, decoded and resized; repeats of the same bytes become
content duplicates at the end) through `ray job submit` to the local stack. While the job runs, the resident
memory of the whole Ray head process tree (driver, workers, raylet, GCS, dashboard) is sampled every 0.25 s.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/ingest_memory.py --rows 10000 50000
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
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_vs_img2dataset import REPO, generate_images, start_nginx  # noqa: E402

from infra import local  # noqa: E402


def tree_rss(root: int) -> int:
    """Resident bytes of process `root` and all its descendants, from /proc (Linux)."""
    parents, rss = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            statm = (entry / "statm").read_text().split()
        except OSError:  # the process ended while we looked
            continue
        pid = int(entry.name)
        parents[pid] = int(stat[stat.rindex(")") + 2 :].split()[1])
        rss[pid] = int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(rss.get(pid, 0) for pid in tree)


def write_url_list(path: Path, rows: int, names: list[str], port: int, caption: str) -> Path:
    """A Parquet URL list of `rows` rows cycling through the served `names` (each URL distinct)."""
    urls = [f"http://127.0.0.1:{port}/{names[i % len(names)]}?row={i}" for i in range(rows)]
    pq.write_table(pa.table({"url": urls, "caption": [f"{caption} {i}" for i in range(rows)]}), path)
    return path


def submit_ingest(
    env: dict,
    url_list: Path,
    output: Path,
    submit_options: Sequence[str] = (),
    ingest_options: Sequence[str] = (),
) -> float:
    """Run the ingest job through `ray job submit` on the stack (256 px, keep_ratio, 1,000 rows per shard)
    and return its wall-clock seconds; stops the benchmark with the job's output if it fails."""
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", env["RAY_API_SERVER_ADDRESS"],
        *submit_options, "--", sys.executable, "-m", "pipelines.ingest", "--input", str(url_list), "--output", str(output),
        "--image-size", "256", "--resize-mode", "keep_ratio", "--samples-per-shard", "1000", "--allow-private-networks",
        *ingest_options,
    ]  # fmt: skip
    started = time.time()
    job = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if job.returncode != 0:
        raise SystemExit(f"ingest into {output} failed:\n{job.stdout[-4000:]}\n{job.stderr[-4000:]}")
    return time.time() - started


def ingest_peak_rss(rows: int, names: list[str], port: int, work: Path, env: dict, head_pid: int) -> dict:
    url_list = write_url_list(work / f"urls-{rows}.parquet", rows, names, port, "photo")
    head = head_pid
    baseline = tree_rss(head)
    peak, done = [baseline], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(head))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        seconds = submit_ingest(env, url_list, work / f"out-{rows}")
    finally:
        done.set()
        sampler.join()
    return {
        "rows": rows,
        "seconds": round(seconds, 1),
        "baseline_mb": baseline >> 20,
        "peak_mb": peak[0] >> 20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10000, 50000])
    parser.add_argument("--images", type=int, default=5000, help="distinct images behind the URLs")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "out" / "ingest_images")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    names = generate_images(args.cache, args.images)
    local.start()
    env = local.stack_env()
    head_pid = json.loads((local.DEFAULT_STATE_DIR / "run" / "ray.json").read_text())["pid"]
    results = []
    with tempfile.TemporaryDirectory(prefix="ingest-memory-") as tmp:
        nginx, port = start_nginx(args.cache, Path(tmp) / "nginx")
        try:
            for rows in args.rows:
                results.append(ingest_peak_rss(rows, names, port, Path(tmp), env, head_pid))
                print(results[-1], flush=True)
        finally:
            nginx.terminate()
            nginx.wait()
    print(f"\nIngest peak memory (Ray head process tree), {os.cpu_count()} cores, {date.today()}")
    print("| rows | seconds | baseline MB | peak MB | peak over baseline MB |\n|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rows']} | {r['seconds']} | {r['baseline_mb']} | {r['peak_mb']} | {r['peak_mb'] - r['baseline_mb']} |"
        )
    if len(results) >= 2:
        growth = (results[-1]["peak_mb"] - results[-1]["baseline_mb"]) / max(
            1, results[0]["peak_mb"] - results[0]["baseline_mb"]
        )
        print(
            f"growth of the job's own memory from {results[0]['rows']} to {results[-1]['rows']} rows: {growth:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
