"""Ingest time and memory against input size, up to 100k URL rows: time must grow linearly, memory stay flat.

Extends benchmarks/ingest_memory.py (same nginx-served photo-like JPEGs, same process-tree RSS sampling, same
`ray job submit` to the local stack) with larger inputs, a linear fit of time against rows, and the output's
measured bytes per sample. Content deduplication is switched off here so that every row is also encoded and
written into a shard: with it on, the 5,000 distinct images behind the URLs would cap the writing stage.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/ingest_scaling.py --rows 25000 50000 100000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_memory import submit_ingest, tree_rss, write_url_list  # noqa: E402
from ingest_vs_img2dataset import REPO, generate_images, start_nginx  # noqa: E402

from infra import local  # noqa: E402


def output_bytes(folder: Path) -> dict[str, int]:
    """Bytes by kind of file in an ingest output folder, and the samples its committed shards hold."""
    sizes = {"tar": 0, "parquet": 0, "stats": 0, "manifest": 0, "other": 0}
    for path in folder.iterdir():
        if path.name == "manifest.json":
            kind = "manifest"
        elif path.name.endswith("_stats.json"):
            kind = "stats"
        else:
            kind = path.suffix.lstrip(".")
        sizes[kind if kind in sizes else "other"] += path.stat().st_size
    manifest = json.loads((folder / "manifest.json").read_text())
    sizes["successes"] = manifest["totals"].get("success", 0)
    sizes["shards"] = len(manifest["shards"])
    return sizes


def job_rss(job_id: str, driver_pid: int) -> int:
    """Resident bytes of one Ray job: its driver and the worker processes Ray started for it (each worker
    serves one job and carries its id in RAY_JOB_ID). Unlike the head's whole process tree, this leaves out
    other jobs that share the cluster, and Ray's own daemons."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pid = int(entry.name)
            if pid != driver_pid and f"RAY_JOB_ID={job_id}".encode() not in (entry / "environ").read_bytes():
                continue
            total += int((entry / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # ended while we looked, or not ours to read
            continue
    return total


def ingest(
    rows: int, names: list[str], port: int, work: Path, env: dict, head_pid: int, keep_output: bool = False
) -> dict:
    """Submit one ingest of `rows` URL rows and measure it; the output folder is `work/out-{rows}`, deleted
    afterwards unless keep_output."""
    from ray.job_submission import JobSubmissionClient

    url_list = write_url_list(work / f"urls-{rows}.parquet", rows, names, port, "photo number")
    output = work / f"out-{rows}"
    submission_id = f"ingest-scaling-{rows}-{uuid.uuid4().hex[:8]}"
    jobs = JobSubmissionClient(env["RAY_API_SERVER_ADDRESS"])
    baseline = tree_rss(head_pid)
    peak, job_peak, done = [baseline], [0], threading.Event()

    def sample() -> None:
        driver = None
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(head_pid))
            if driver is None:
                with contextlib.suppress(Exception):  # the job may not be registered yet
                    driver = jobs.get_job_info(submission_id).driver_info
            if driver is not None:
                job_peak[0] = max(job_peak[0], job_rss(driver.id, int(driver.pid)))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        seconds = submit_ingest(
            env, url_list, output, ["--submission-id", submission_id], ["--set", "dedup.content=false"]
        )
    finally:
        done.set()
        sampler.join()
    sizes = output_bytes(output)
    if not keep_output:
        shutil.rmtree(output)  # 100k samples are a few GB; keep the disk for the next size
    return {
        "rows": rows,
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds, 1),
        "baseline_mb": baseline >> 20,
        "peak_mb": peak[0] >> 20,
        "peak_over_baseline_mb": (peak[0] - baseline) >> 20,
        "job_peak_mb": job_peak[0] >> 20,
        **sizes,
        "tar_bytes_per_sample": round(sizes["tar"] / max(1, sizes["successes"])),
        "parquet_bytes_per_row": round(sizes["parquet"] / rows, 1),
    }


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[25000, 50000, 100000])
    parser.add_argument("--images", type=int, default=5000, help="distinct images behind the URLs")
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "out" / "ingest_images")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "ingest_scaling.json")
    args = parser.parse_args()

    names = generate_images(args.cache, args.images)
    results = []
    with local.leased() as env, tempfile.TemporaryDirectory(prefix="ingest-scaling-") as tmp:
        head_pid = json.loads((local.DEFAULT_STATE_DIR / "run" / "ray.json").read_text())["pid"]
        nginx, port = start_nginx(args.cache, Path(tmp) / "nginx")
        try:
            for rows in args.rows:
                results.append(ingest(rows, names, port, Path(tmp), env, head_pid))
                print(results[-1], flush=True)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2))
        finally:
            nginx.terminate()
            nginx.wait()

    print(f"\nIngest scaling, {os.cpu_count()} cores, {date.today()} (content dedup off, 256 px keep_ratio)")
    print(
        "| rows | seconds | rows/s | peak job RSS MB | peak head tree RSS over baseline MB | tar bytes/sample |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rows']:,} | {r['seconds']} | {r['rows_per_s']} | {r['job_peak_mb']:,} "
            f"| {r['peak_over_baseline_mb']:,} | {r['tar_bytes_per_sample']:,} |"
        )
    if len(results) >= 2:
        intercept, slope = linear_fit([r["rows"] for r in results], [r["seconds"] for r in results])
        worst = max(abs(r["seconds"] - (intercept + slope * r["rows"])) / r["seconds"] for r in results)
        growth = results[-1]["job_peak_mb"] / max(1, results[0]["job_peak_mb"])
        print(
            f"time = {intercept:.1f} s + {slope * 1000:.2f} s per 1,000 rows (largest residual {worst:.1%})"
        )
        print(f"peak job memory, {results[-1]['rows']:,} vs {results[0]['rows']:,} rows: {growth:.2f}x")


if __name__ == "__main__":
    main()
