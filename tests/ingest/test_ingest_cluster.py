"""Ingest on a cluster that grows and shrinks while it runs (a 0-CPU head and 1-CPU worker nodes on loopback
addresses, S3 the shared store): nodes that join take shards, a node lost mid-shard costs only that shard's
work, and the output is the one a single-node run writes. A local output on several nodes is refused."""

from __future__ import annotations

import io
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.job_submission import JobStatus

from pipelines import failpoints, storage
from pipelines.formats import shards
from tests.ingest.conftest import NUM_SCENES
from tests.ingest.test_ingest_job import ingest_args, input_rows, run_ingest_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SAMPLES_PER_SHARD = 4


def _args(input_uri: str, output_uri: str) -> list[str]:
    args = ingest_args(input_uri, output_uri)
    args[args.index("--samples-per-shard") + 1] = str(SAMPLES_PER_SHARD)
    return args


def _submit(cluster, args: list[str], env_vars: dict[str, str] | None = None) -> str:
    return cluster.job_client().submit_job(
        entrypoint=" ".join(["python", "-m", "pipelines.ingest", *(f"'{a}'" for a in args)]),
        runtime_env={"env_vars": env_vars or {}},
    )


def _staging_nodes(cluster) -> set[str]:
    """The nodes on which a shard's staging task has finished so far."""
    return {t["node_id"] for t in cluster.state("tasks", state="FINISHED") if "stage_shard" in t["name"]}


def _shard_files(output_uri: str) -> dict[int, tuple[list[dict], bytes, list[str]]]:
    """Per committed shard: its Parquet rows, its tar's bytes, and its excluded keys."""
    found = {}
    for shard_id in sorted(shards.committed_shards(output_uri)):
        rows = pq.read_table(
            io.BytesIO(storage.read_bytes(shards.parquet_uri(output_uri, shard_id)))
        ).to_pylist()
        stats = shards.read_stats(output_uri, shard_id)
        tar = storage.read_bytes(shards.tar_uri(output_uri, shard_id))
        found[shard_id] = (rows, tar, sorted(shards.excluded_keys(stats)))
    return found


def test_nodes_joining_take_shards_and_a_lost_node_costs_only_its_shard(
    site,
    multinode_ray,
    s3_prefix,
    tmp_path,
):
    cluster = multinode_ray
    rows = input_rows(site)[: NUM_SCENES + 3]  # scenes, a repeated URL, repeated bytes, an HTML page
    table = pa.Table.from_pylist([{k: r[k] for k in ("url", "caption", "uid")} for r in rows])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    input_uri = storage.join(s3_prefix, "input", "pairs.parquet")
    storage.write_bytes(input_uri, buffer.getvalue())
    num_shards = -(-len(rows) // SAMPLES_PER_SHARD)

    # The reference: the same input on one node, local output.
    pq.write_table(table, tmp_path / "pairs.parquet")
    run_ingest_job(_args(str(tmp_path / "pairs.parquet"), str(tmp_path / "reference")))
    reference = _shard_files(str(tmp_path / "reference"))
    assert len(reference) == num_shards

    first = cluster.add_node(num_cpus=1)

    # On more than one node a local output would be spread over the nodes' disks: refused, nothing written.
    status, logs = cluster.wait_for_job(_submit(cluster, _args(input_uri, str(tmp_path / "local-out"))))
    assert status == JobStatus.FAILED
    assert "is a local path but the Ray cluster has 2 nodes" in logs and "s3://" in logs
    assert not (tmp_path / "local-out").exists()

    # The first shard task to finish downloading waits while two nodes join; then the first shard task to
    # have written its tar waits while its node is killed (raylet, object store, workers: SIGKILL).
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    env = {failpoints.PAUSE_ENV: "stage.shard_done,stage.tar_written", failpoints.PAUSE_DIR_ENV: str(pauses)}
    output = storage.join(s3_prefix, "out")
    job_id = _submit(cluster, _args(input_uri, output), env)
    failpoints.wait_reached(pauses, "stage.shard_done", timeout_s=300)
    joined = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    failpoints.release(pauses, "stage.shard_done")
    paused = failpoints.wait_reached(pauses, "stage.tar_written", timeout_s=300)
    lost = cluster.node_of_pid(paused["pid"])
    assert lost is not None and lost.node_id is not None
    # While that shard is held in flight, the nodes that joined take shards of their own (Ray's state API
    # says where each shard task ran): the job follows the cluster it has now, not the one it started on.
    others = {n.node_id for n in [first, *joined] if n is not lost}
    deadline = time.monotonic() + 300
    while not others & _staging_nodes(cluster) and time.monotonic() < deadline:
        time.sleep(1.0)
    before_kill = _staging_nodes(cluster)
    assert others & before_kill & {n.node_id for n in joined}, before_kill
    cluster.kill_node(lost)
    status, logs = cluster.wait_for_job(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    # The lost node's in-flight shard ran again on another node; every shard was staged somewhere.
    assert lost.node_id not in _staging_nodes(cluster) - before_kill
    ran = [t for t in cluster.state("tasks", state="FINISHED") if "stage_shard" in t["name"]]
    print(f"shard tasks by node: {Counter(t['node_id'][:8] for t in ran)}; lost node {lost.node_id[:8]}")

    # The output is the single-node one: every shard's rows, tar bytes and excluded keys.
    assert _shard_files(output) == reference
    assert not storage.list_files(storage.join(output, "_staging"))
