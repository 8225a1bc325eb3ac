"""The start of a resumed ingest run at 40,000+ shards: seconds and S3 requests from job.run's first line to the
end of planning (prepare, plan, committed and staged shards found; before URL dedup and any download).

Builds, on the local stack's SeaweedFS and on local disk, an input of --shards shards and an output where a
run committed --committed of them (each a stats file, plus a tiny tar and Parquet object with --data-files, so
that listings page through a real output's 3 objects per shard) and staged --staged more. Then it runs job.run
up to the plan.done failpoint in a fresh process per round, once with each code version given by --code
(a source folder put first on PYTHONPATH: this checkout, or another commit's `git archive`), and counts every
HTTP request that process sends to S3 with a loopback proxy between it and SeaweedFS (boto3 and pyarrow's
own S3 client alike), and boto3's calls by operation through botocore's event system.

    git archive 62280ef | tar -x -C /tmp/before-src
    PYTHONPATH=$PWD .venv/bin/python benchmarks/resume_start.py --code /tmp/before-src . --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES_PER_SHARD = 10
# Input row groups of REGROUP_FACTOR shards: read in place by every code version, so both plan the same way.
INPUT_ROW_GROUP = 4 * SAMPLES_PER_SHARD
PUT_THREADS = 32


def counting_proxy(upstream: str):
    """tests/s3_traffic.py's CountingProxy of this checkout, loaded by path: the measured code version (first
    on PYTHONPATH) may be an older commit's, whose tests/ has no such module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("s3_traffic", REPO / "tests" / "s3_traffic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CountingProxy(upstream).__enter__()


# ---------------------------------------------------------------------------------------------------------
# One measurement, in a fresh process whose PYTHONPATH picks the code version


def measure(input_uri: str, output_uri: str, proxy: bool) -> dict:
    """Run job.run up to plan.done and return its seconds, requests and plan line."""
    counting = None
    if proxy:
        counting = counting_proxy(os.environ["AWS_ENDPOINT_URL"])
        os.environ["AWS_ENDPOINT_URL"] = counting.endpoint
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    import ray

    from pipelines import failpoints, storage
    from pipelines.ingest import job
    from pipelines.ingest.config import IngestConfig

    class PlanDone(Exception):
        """Raised at plan.done: the measured part of job.run is over."""

    def reach(point: str, shard_id: int | None = None) -> None:
        if point == "plan.done":
            raise PlanDone
        failpoints.reach(point, shard_id)

    job.failpoints.reach = reach
    # Nothing before plan.done runs on Ray; download_workers is set, so job.run asks Ray for nothing.
    ray.is_initialized = lambda: True
    cfg = IngestConfig(
        input=input_uri,
        output=output_uri,
        samples_per_shard=SAMPLES_PER_SHARD,
        concurrency={"download_workers": 1},
    )
    calls: Counter = Counter()
    if storage.is_s3(output_uri):
        storage.boto3_client().meta.events.register(
            "before-call.s3", lambda model, **_: calls.update([model.name])
        )
    lines = []
    real_print = print

    def capture(*args, **kwargs):
        lines.append(" ".join(str(a) for a in args))
        real_print(*args, **kwargs)

    import builtins

    builtins.print = capture
    started = time.perf_counter()
    with contextlib.suppress(PlanDone):
        job.run(cfg)
    seconds = time.perf_counter() - started
    builtins.print = real_print
    plan = next(line for line in lines if "plan done" in line)
    return {
        "seconds": round(seconds, 2),
        "requests": sum(counting.traffic.requests.values()) if counting else None,
        "requests_by_method": dict(counting.traffic.requests) if counting else None,
        "boto3_calls": dict(calls),
        "plan": plan.split(": ", 1)[-1],
    }


# ---------------------------------------------------------------------------------------------------------
# Building the input and the resumed output


def write_input(uri: str, shards: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines import storage

    rows = shards * SAMPLES_PER_SHARD
    ids = pc.cast(pa.array(range(rows), pa.int64()), pa.string())
    url = pc.binary_join_element_wise("http://images.example.com/", ids, ".jpg", "")
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / "urls.parquet"
        pq.write_table(pa.table({"url": url, "caption": ids}), local, row_group_size=INPUT_ROW_GROUP)
        storage.publish_file(local, uri)


def fill_output(output: str, shards: int, committed: int, staged: int, data_files: bool) -> int:
    """The files a killed run leaves: stats (and tar, Parquet) of committed shards, staged Parquet files."""
    from pipelines import storage
    from pipelines.formats import shards as shard_files
    from pipelines.ingest import writer

    uris = []
    for shard_id in range(committed):
        uris.append((shard_files.stats_uri(output, shard_id), b'{"count": 10}'))
        if data_files:
            uris += [
                (shard_files.tar_uri(output, shard_id), b"t"),
                (shard_files.parquet_uri(output, shard_id), b"p"),
            ]
    for shard_id in range(committed, committed + staged):
        uris.append((writer.staged_uri(output, shard_id), b"s"))
    with ThreadPoolExecutor(PUT_THREADS) as pool:
        list(pool.map(lambda item: storage.write_bytes(*item), uris))
    return len(uris)


def run_measure(code: Path, input_uri: str, output: str, env: dict, proxy: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", input_uri, output] + (
        ["--proxy"] if proxy else []
    )
    child_env = {**os.environ, **env, "PYTHONPATH": str(code), "NO_ALBUMENTATIONS_UPDATE": "1"}
    done = subprocess.run(command, env=child_env, capture_output=True, text=True, cwd=code)
    if done.returncode != 0:
        raise SystemExit(f"measurement with {code} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--proxy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=50_000, help="shards the input splits into")
    parser.add_argument("--committed", type=int, default=40_000)
    parser.add_argument("--staged", type=int, default=5_000)
    parser.add_argument("--data-files", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--code", type=Path, nargs="+", default=[REPO], help="source folders to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--where", nargs="+", default=["s3", "local"], choices=["s3", "local"])
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "out" / "resume_start.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, proxy=args.proxy)))
        return

    sys.path.insert(0, str(REPO))
    from infra import local
    from pipelines import storage

    results = []
    with local.leased() as env, tempfile.TemporaryDirectory(prefix="resume-start-") as tmp:
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        for where in args.where:
            base = f"s3://{local.DATA_BUCKET}/bench/resume-{uuid.uuid4().hex[:8]}" if where == "s3" else tmp
            input_uri = storage.join(base, "in", "urls.parquet")
            started = time.time()
            write_input(input_uri, args.shards)
            output = storage.join(base, "out")
            try:
                # A first start writes the fingerprint and config.yaml, as the killed run did.
                first = run_measure(args.code[0], input_uri, output, env, proxy=False)
                assert f"0 committed, 0 staged, {args.shards} to download" in first["plan"], first
                objects = fill_output(output, args.shards, args.committed, args.staged, args.data_files)
                print(f"[{where}] {objects} objects written in {time.time() - started:.0f}s", flush=True)
                rounds: dict[Path, list] = {code: [] for code in args.code}
                for _ in range(args.rounds):  # the code versions alternate, round by round
                    for code in args.code:
                        rounds[code].append(run_measure(code, input_uri, output, env, proxy=where == "s3"))
                        print(f"[{where}] {code}: {rounds[code][-1]}", flush=True)
                for code, measured in rounds.items():
                    results.append(
                        {
                            "where": where,
                            "code": str(code),
                            "shards": args.shards,
                            "committed": args.committed,
                            "staged": args.staged,
                            "objects": objects,
                            "seconds_median": statistics.median(r["seconds"] for r in measured),
                            "rounds": measured,
                        }
                    )
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2))
            finally:
                storage.delete(base if where == "s3" else storage.join(base, "in"), recursive=True)
                storage.delete(output, recursive=True)

    print(
        f"\nResumed start, {args.shards:,} shards ({args.committed:,} committed, {args.staged:,} staged), {date.today()}"
    )
    print("| where | code | seconds (median) | requests | by method |\n|---|---|---:|---:|---|")
    for r in results:
        last = r["rounds"][-1]
        print(
            f"| {r['where']} | {r['code']} | {r['seconds_median']} | {last['requests'] or 'n/a'} "
            f"| {last['requests_by_method'] or ''} |"
        )


if __name__ == "__main__":
    main()
