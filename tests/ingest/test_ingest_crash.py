"""An ingest job killed with SIGKILL at chosen points of every phase (planning, URL dedup, staging, CLIP
scoring, content dedup, inside a shard's write, the manifest) and rerun each time ends with exactly the rows,
tar bytes and files of an uninterrupted run, and no leftovers.

The kills are deterministic: pipelines.failpoints kills the job's whole session when it reaches the point
named in CLIP_RAY_KILL_AT, so each run in the chain dies at the point it names, wherever that point runs
(the driver or a Ray worker).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import clip_core
from pipelines import failpoints
from pipelines.demo import scenes
from pipelines.formats.shards import MANIFEST_NAME
from pipelines.ingest import writer
from tests.http_fixtures import serve_directory

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NUM_SCENES = 26
SAMPLES_PER_SHARD = 4

# In pipeline order, so that each rerun, which redoes only what is missing, still reaches the next point.
KILL_CHAIN = (
    "plan.input_cached",
    "plan.done",
    "url_dedup.done",
    "stage.shard_done",
    "write.tar_streaming",  # inside a shard's tar, after its first sample: tars are written while staging
    "write.tar_done",
    "stage.tar_written",
    "stage.shard_writing",  # the staged Parquet is written but not yet published: a .partial is left
    "stage.shard_written",
    "score.shard_written",
    "content_dedup.done",
    "write.parquet_done",
    "write.committed",  # the shard is committed, its staged file not yet removed
    "write.parquet_done",  # again, now that content dedup sees committed and staged shards together
    "manifest.started",
    "manifest.written",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    captions = {}
    for i in range(NUM_SCENES):
        scene = scenes.make_scene(i, seed=11, size=(64 + 7 * i, 48 + 3 * i))
        scene.image.save(root / f"scene{i}.jpg", quality=90)
        captions[i] = scene.caption
    (root / "copy_of_scene2.jpg").write_bytes((root / "scene2.jpg").read_bytes())
    (root / "garbage.jpg").write_bytes(os.urandom(1500))
    with serve_directory(root) as base:
        yield base, captions


@pytest.fixture(scope="module")
def job_inputs(site, tmp_path_factory):
    """A CSV input (so planning copies it to Parquet first) and a CLIP-score checkpoint."""
    base, captions = site
    tmp = tmp_path_factory.mktemp("crash-inputs")
    rows = [(f"{base}/scene{i}.jpg", captions[i]) for i in range(NUM_SCENES)]
    rows[5:5] = [(f"{base}/scene3.jpg", "the same url again")]
    rows[9:9] = [(f"{base}/copy_of_scene2.jpg", "the same bytes, another url")]
    rows[14:14] = [(f"{base}/garbage.jpg", "not an image"), (f"{base}/missing.jpg", "404")]
    input_csv = tmp / "input.csv"
    with input_csv.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["url", "caption", "uid"])
        out.writerows([url, caption, f"uid-{i}"] for i, (url, caption) in enumerate(rows))
    checkpoint = tmp / "tiny.pt"
    torch.manual_seed(0)
    clip_core.save_checkpoint(clip_core.create_model("ViT-Tiny-16"), checkpoint)
    return str(input_csv), str(checkpoint), len(rows)


def ingest_args(input_uri: str, output_uri: str, checkpoint: str, workers: int) -> list[str]:
    return [
        "--input", input_uri, "--output", output_uri, "--samples-per-shard", str(SAMPLES_PER_SHARD),
        "--image-size", "32", "--resize-mode", "keep_ratio", "--allow-private-networks",
        "--set", "download.timeout_s=5", "--set", "download.max_retries=0",
        "--set", f"concurrency.download_workers={workers}",
        "--set", f"filters.clip_score={{checkpoint: '{checkpoint}', model: ViT-Tiny-16, threshold: 0.0}}",
    ]  # fmt: skip


def run_job(
    args: list[str], kill_at: str | None = None, record: Path | None = None
) -> subprocess.CompletedProcess:
    """The ingest CLI on a local Ray of its own, in a session of its own (the failpoint kills the session)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {
        "RAY_AUTH_MODE": "disabled"
    }
    env.pop(failpoints.ENV, None)
    env.pop(failpoints.RECORD_ENV, None)
    if kill_at is not None:
        env[failpoints.ENV] = kill_at
        env[failpoints.RECORD_ENV] = str(record)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.ingest", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )


def listing(output: Path) -> list[str]:
    return sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())


def shard_rows(output: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted(output.glob("[0-9]*.parquet"))]
    return pa.concat_tables(tables).sort_by("row_index").to_pylist()


def test_killed_at_every_phase_resumes_to_the_uninterrupted_output(job_inputs, tmp_path):
    input_csv, checkpoint, num_rows = job_inputs
    reference = tmp_path / "reference"
    done = run_job(ingest_args(input_csv, str(reference), checkpoint, workers=2))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected_rows = shard_rows(reference)
    assert len(expected_rows) == num_rows
    statuses = {r["status"] for r in expected_rows}
    assert {"success", "duplicate", "failed_to_decode", "failed_to_download"} <= statuses, statuses

    output = tmp_path / "crashed"
    args = ingest_args(input_csv, str(output), checkpoint, workers=1)
    record = tmp_path / "kills.log"
    partial = []
    for n, point in enumerate(KILL_CHAIN):
        killed = run_job(args, kill_at=point, record=record)
        log = killed.stdout[-3000:] + killed.stderr[-3000:]
        # The session was killed at the point: by SIGKILL, and the failpoint recorded it.
        assert killed.returncode == -signal.SIGKILL, f"{point}: the run was not killed there\n{log}"
        kills = record.read_text().splitlines()
        assert len(kills) == n + 1 and f"{failpoints.ENV}={point}:" in kills[-1], (kills, log)
        assert not (output / MANIFEST_NAME).exists() or point == "manifest.written"
        partial += [name for name in listing(output) if name.endswith(".partial")]
    # Each run removes what the kill before it left half-written; make sure there was something to remove.
    assert any(name.startswith(f"{writer.STAGING_DIR}/.") for name in partial), partial
    assert any(".tar." in name for name in partial), partial

    final = run_job(args)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert shard_rows(output) == expected_rows
    assert listing(output) == listing(reference)
    for name in listing(reference):
        if name.endswith(".tar"):
            assert (output / name).read_bytes() == (reference / name).read_bytes(), name
    assert json.loads((output / MANIFEST_NAME).read_text()) == json.loads(
        (reference / MANIFEST_NAME).read_text()
    )
