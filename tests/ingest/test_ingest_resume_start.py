"""The start of a resumed ingest run (prepare and plan, everything before URL dedup and downloads): what it
finds committed and staged, and the S3 requests it makes, counted on the real client of the local stack's
SeaweedFS, which must not grow with the number of shards."""

from __future__ import annotations

import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import failpoints, storage
from pipelines.formats import shards
from pipelines.ingest import job, writer
from pipelines.ingest.config import IngestConfig

SAMPLES_PER_SHARD = 2


class PlanDone(Exception):
    """Raised at the plan.done failpoint: the run stops there, before URL dedup and downloads."""


def run_until_planned(cfg: IngestConfig, monkeypatch: pytest.MonkeyPatch, capsys) -> str:
    """Run job.run up to plan.done and return its plan line ("... N committed, M staged, K to download")."""

    def reach(point: str, shard_id: int | None = None) -> None:
        if point == "plan.done":
            raise PlanDone
        failpoints.reach(point, shard_id)

    monkeypatch.setattr(job.failpoints, "reach", reach)
    # Nothing before plan.done runs on Ray, so none is started: download_workers is set, ray.init skipped.
    monkeypatch.setattr(job.ray, "is_initialized", lambda: True)
    capsys.readouterr()
    with pytest.raises(PlanDone):
        job.run(cfg)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "[ingest] plan done" in line]
    return line


def count_requests(client) -> tuple[Counter, callable]:
    """Count every call the boto3 client makes, by operation, through botocore's event system."""
    counts: Counter = Counter()

    def before_call(model, **_) -> None:
        counts[model.name] += 1

    client.meta.events.register("before-call.s3", before_call)
    return counts, lambda: client.meta.events.unregister("before-call.s3", before_call)


def resumed_output(prefix: str, num_shards: int, monkeypatch, capsys) -> tuple[IngestConfig, str]:
    """An S3 input of num_shards shards and an output where a run committed half of them and staged a
    quarter (shard files as the job names them), the rest to do."""
    rows = num_shards * SAMPLES_PER_SHARD
    input_uri = storage.join(prefix, "in", "urls.parquet")
    table = pa.table({"url": [f"http://example.com/{i}.jpg" for i in range(rows)], "caption": ["c"] * rows})
    with storage.open_write(input_uri) as out:
        pq.write_table(table, out, row_group_size=SAMPLES_PER_SHARD * 4)
    cfg = IngestConfig(
        input=input_uri,
        output=storage.join(prefix, "out"),
        samples_per_shard=SAMPLES_PER_SHARD,
        concurrency={"download_workers": 1},
    )
    first = run_until_planned(cfg, monkeypatch, capsys)  # writes the fingerprint and config.yaml
    assert f"0 committed, 0 staged, {num_shards} to download" in first
    for shard_id in range(num_shards // 2):
        storage.write_bytes(shards.stats_uri(cfg.output, shard_id), b"{}")
    for shard_id in range(num_shards // 2, num_shards * 3 // 4):
        storage.write_bytes(writer.staged_uri(cfg.output, shard_id), b"staged")
    # A staged file of a shard that is also committed (killed before its removal) counts as committed.
    storage.write_bytes(writer.staged_uri(cfg.output, 0), b"staged")
    return cfg, first


@pytest.mark.parametrize("num_shards", [10, 200])
def test_resumed_start_finds_committed_and_staged_shards(
    s3_prefix, local_stack_env, monkeypatch, capsys, num_shards
):
    cfg, _ = resumed_output(s3_prefix, num_shards, monkeypatch, capsys)
    line = run_until_planned(cfg, monkeypatch, capsys)
    committed, staged = num_shards // 2, num_shards * 3 // 4 - num_shards // 2
    assert f"{committed} committed, {staged} staged, {num_shards - committed - staged} to download" in line


def test_resumed_start_makes_as_many_s3_requests_for_200_shards_as_for_10(
    s3_prefix, local_stack_env, monkeypatch, capsys
):
    client = storage.boto3_client()  # the cached client every storage call of the job uses
    counted = {}
    for num_shards in (10, 200):
        cfg, _ = resumed_output(storage.join(s3_prefix, str(num_shards)), num_shards, monkeypatch, capsys)
        counts, stop = count_requests(client)
        try:
            run_until_planned(cfg, monkeypatch, capsys)
        finally:
            stop()
        counted[num_shards] = counts
    assert counted[200] == counted[10], counted
    # Whole listings, not a request per shard: at most a handful of each operation.
    assert sum(counted[200].values()) <= 16 and max(counted[200].values()) <= 4, counted[200]
    assert counted[200]["ListObjectsV2"] >= 3  # the input, the output's own files, the staging folder


def test_staged_shards_are_the_published_staged_files_only(tmp_path):
    output = str(tmp_path / "out")
    for shard_id in (0, 3, 12345):
        storage.write_bytes(writer.staged_uri(output, shard_id), b"staged")
    staging = tmp_path / "out" / writer.STAGING_DIR
    (staging / ".00004.parquet.a1b2c3.partial").write_bytes(b"killed while writing")
    (staging / "notes.txt").write_bytes(b"not a shard")
    (staging / "old").mkdir()
    (staging / "old" / "00005.parquet").write_bytes(b"in a subfolder")
    assert writer.staged_shards(output) == {0, 3, 12345}
    assert writer.staged_shards(str(tmp_path / "missing")) == set()


def test_committed_shards_ignore_stats_files_in_subfolders(tmp_path, s3_prefix, local_stack_env):
    for output in (str(tmp_path / "out"), storage.join(s3_prefix, "out")):
        storage.write_bytes(shards.stats_uri(output, 7), b"{}")
        storage.write_bytes(storage.join(output, writer.STAGING_DIR, shards.stats_name(8)), b"{}")
        storage.write_bytes(storage.join(output, "_input_cache", "00000.json"), b"{}")
        assert shards.committed_shards(output) == {7}
        assert [e.uri for e in storage.list_files(output, recursive=False)] == [shards.stats_uri(output, 7)]
        assert len(storage.list_files(output)) == 3
        assert re.search(r"/_staging/", " ".join(e.uri for e in storage.list_files(output)))
