"""Ingest on 1, 2 and 4 one-CPU worker nodes of a multi-node Ray cluster on this machine (a 0-CPU head, each
node its own `ray start` on a loopback address, infra/local/multinode.py), the same corpus each time: images/s
per node relative to one node, and what the run sent to the S3 store over what its output holds.

The corpus is the photo-like JPEGs of benchmarks/ingest_vs_img2dataset.py served by nginx; the input list and
the output are on the local stack's S3 (the store every node shares). A counting proxy in front of S3
(tests/s3_traffic.py) measures the payload bytes of every request the job makes. Content dedup is off, so
every row is written. On a machine with fewer cores than nodes the nodes share the cores: the scaling
efficiency then says where the cores run out, not what separate machines would give.

    NO_ALBUMENTATIONS_UPDATE=1 .venv/bin/python benchmarks/ingest_cluster_scaling.py --images 1000 --nodes 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_memory import write_url_list  # noqa: E402
from ingest_vs_img2dataset import REPO, generate_images, start_nginx  # noqa: E402

sys.path.insert(0, str(REPO))
from infra import local  # noqa: E402
from infra.local.multinode import MultiNodeCluster  # noqa: E402
from tests.s3_traffic import CountingProxy  # noqa: E402

STAGE_LINE = re.compile(r"\[ingest\] download, decode, resize, filter done in ([\d.]+)s")


def run_on_nodes(nodes: int, input_uri: str, output: str, s3_env: dict, proxy: CountingProxy) -> dict:
    from ray.job_submission import JobStatus

    from pipelines import storage
    from pipelines.formats import shards

    with MultiNodeCluster(env=s3_env | {"AWS_ENDPOINT_URL": proxy.endpoint}) as cluster:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        client = cluster.job_client()
        args = [
            "--input", input_uri, "--output", output, "--image-size", "256", "--resize-mode", "keep_ratio",
            "--samples-per-shard", "100", "--allow-private-networks", "--set", "dedup.content=false",
        ]  # fmt: skip
        proxy.reset()
        started = time.time()
        job_id = client.submit_job(entrypoint=" ".join(["python", "-m", "pipelines.ingest", *args]))
        status, logs = cluster.wait_for_job(job_id)
        seconds = time.time() - started
        traffic = proxy.reset()
        if status != JobStatus.SUCCEEDED:
            raise SystemExit(f"the ingest on {nodes} nodes failed:\n{logs[-4000:]}")
    stage = STAGE_LINE.search(logs)
    manifest = shards.read_manifest(output)
    final = sum(e.size for e in storage.list_files(output))
    successes = manifest["totals"]["success"]
    return {
        "nodes": nodes,
        "seconds": round(seconds, 1),
        "stage_seconds": float(stage.group(1)) if stage else None,
        "successes": successes,
        "images_per_s": round(successes / seconds, 1),
        "stage_images_per_s": round(successes / float(stage.group(1)), 1) if stage else None,
        "bytes_sent": traffic.bytes_sent,
        "output_bytes": final,
        "sent_over_output": round(traffic.bytes_sent / final, 4),
        "requests": dict(traffic.requests),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cache", type=Path, default=REPO / "benchmarks" / "out" / "ingest_images")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from pipelines import storage

    names = generate_images(args.cache, args.images)
    local.start()
    env = local.stack_env()
    s3_env = {k: v for k, v in env.items() if k.startswith("AWS_")}
    os.environ.update(s3_env)
    prefix = f"s3://{local.DATA_BUCKET}/benchmarks/cluster-scaling-{uuid.uuid4().hex[:8]}"
    results = []
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        nginx, port = start_nginx(args.cache, Path(tmp) / "nginx")
        try:
            url_list = write_url_list(Path(tmp) / "urls.parquet", len(names), names, port, "photo number")
            input_uri = storage.join(prefix, "urls.parquet")
            storage.write_bytes(input_uri, url_list.read_bytes())
            with CountingProxy(env["AWS_ENDPOINT_URL"]) as proxy:
                for nodes in args.nodes:
                    result = run_on_nodes(
                        nodes, input_uri, storage.join(prefix, f"out-{nodes}"), s3_env, proxy
                    )
                    print(json.dumps(result), flush=True)
                    results.append(result)
        finally:
            nginx.terminate()
            nginx.wait()
            storage.delete(prefix, recursive=True)

    base = next((r for r in results if r["nodes"] == 1), results[0])
    print(f"\nIngest on a multi-node cluster, {len(names)} images, {os.cpu_count()} cores, {date.today()}")
    print("| nodes | seconds | images/s | stage images/s | per node vs 1 node (stage) | sent / output |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        per_node = r["stage_images_per_s"] / r["nodes"] / base["stage_images_per_s"] * base["nodes"]
        r["stage_efficiency"] = round(per_node, 3)
        print(
            f"| {r['nodes']} | {r['seconds']} | {r['images_per_s']} | {r['stage_images_per_s']} | "
            f"{per_node:.2f} | {r['sent_over_output']:.3f}x |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"date": str(date.today()), "cpus": os.cpu_count(), "runs": results}, indent=2)
        )


if __name__ == "__main__":
    main()
