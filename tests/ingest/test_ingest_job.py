"""The ingest job end to end: real HTTP on loopback (drawn scenes plus hostile files and endpoints), every
input row accounted for, duplicates and failures as rows, output read back with webdataset, and S3 output
through `ray job submit` on the local stack. Kills and resumes are tests/ingest/test_ingest_crash.py's."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

import clip_core
from pipelines import storage
from pipelines.formats import shards
from pipelines.ingest import job, writer
from tests.ingest.conftest import NUM_SCENES

pytestmark = pytest.mark.cluster


def input_rows(site) -> list[dict]:
    """Rows in input order with the status each must end with."""
    base = site["base"]
    rows = [
        {"url": f"{base}/scene{i}.jpg", "caption": site["captions"][f"scene{i}.jpg"], "expect": "success"}
        for i in range(NUM_SCENES)
    ]
    rows += [
        {"url": f"{base}/scene5.jpg", "caption": "the same url again", "expect": "duplicate"},
        {"url": f"{base}/copy_of_scene3.jpg", "caption": "same bytes, other url", "expect": "duplicate"},
        {"url": f"{base}/page.jpg", "caption": "html served as jpeg", "expect": "failed_to_decode"},
        {"url": f"{base}/truncated.jpg", "caption": "cut short", "expect": "failed_to_decode"},
        {"url": f"{base}/garbage.jpg", "caption": "random bytes", "expect": "failed_to_decode"},
        {"url": f"{base}/bomb.png", "caption": "decompression bomb", "expect": "failed_to_decode"},
        {"url": f"{base}/tiny.jpg", "caption": "a tiny image", "expect": "filtered"},
        {"url": f"{base}/wide.jpg", "caption": "a very wide image", "expect": "filtered"},
        {"url": f"{base}/missing.jpg", "caption": "404", "expect": "failed_to_download"},
        {"url": site["hostile"].url("/slow-drip"), "caption": "slow drip", "expect": "failed_to_download"},
        {"url": site["hostile"].url("/loop/a"), "caption": "redirect loop", "expect": "failed_to_download"},
        {
            "url": "http://169.254.169.254/latest/meta-data/",
            "caption": "metadata",
            "expect": "failed_to_download",
        },
        {"url": "file:///etc/passwd", "caption": "not http", "expect": "failed_to_download"},
        {"url": "http://", "caption": "malformed", "expect": "failed_to_download"},
        {"url": None, "caption": "no url", "expect": "failed_to_download"},
        {"url": f"{base}/scene100.jpg", "caption": None, "expect": "success"},
        {"url": f"{base}/scene101.jpg", "caption": "word " * 20000, "expect": "success"},
        {
            "url": f"{base}/scene102.jpg",
            "caption": "un chat 🐱 sur le toit, ça va",
            "expect": "success",
        },
    ]
    for i, row in enumerate(rows):
        row["uid"] = f"uid-{i:03d}"
    return rows


def write_input(rows: list[dict], path: Path) -> str:
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("url", "caption", "uid")} for r in rows]), path)
    return str(path)


def ingest_args(input_uri: str, output_uri: str) -> list[str]:
    return [
        "--input", input_uri, "--output", output_uri, "--samples-per-shard", "10", "--image-size", "32",
        "--resize-mode", "keep_ratio", "--allow-private-networks", "--min-image-size", "16",
        "--max-aspect-ratio", "4", "--set", "download.timeout_s=3", "--set", "download.max_retries=0",
    ]  # fmt: skip


def output_rows(output_uri: str) -> list[dict]:
    manifest = shards.read_manifest(output_uri)
    tables = [job.read_table(shards.parquet_uri(output_uri, s["shard_id"])) for s in manifest["shards"]]
    return pa.concat_tables(tables, promote_options="default").sort_by("row_index").to_pylist()


def tar_samples(output_uri: str) -> dict[str, dict]:
    """Every sample of every committed tar, read with webdataset (from a local copy for S3 output)."""
    samples = {}
    with tempfile.TemporaryDirectory() as local:
        for shard in shards.read_manifest(output_uri)["shards"]:
            path = Path(local, f"{shard['shard_id']}.tar")
            path.write_bytes(storage.read_bytes(shards.tar_uri(output_uri, shard["shard_id"])))
            for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
                samples[sample["__key__"]] = sample
    return samples


def run_ingest_job(args: list[str], dedup_in_driver: bool = True) -> None:
    """Run the ingest job on a Ray of its own in a separate process. Ray Data leaves state behind in a
    process that ran a job and shut Ray down, after which a later Ray session's actor pools are cancelled
    at start (Ray 2.60); keeping jobs out of the pytest process keeps later test modules clean."""
    script = (
        "import sys; from pipelines.ingest import job; from pipelines.ingest.config import IngestConfig; "
    )
    if not dedup_in_driver:
        script += "job.DRIVER_DEDUP_MAX_ROWS = 0; "  # hash-partition dedup keys across the cluster
    script += "job.run(IngestConfig.load(sys.argv[1:]))"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    result = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(site, tmp_path_factory):
    rows = input_rows(site)
    tmp = tmp_path_factory.mktemp("ingest")
    run_ingest_job(ingest_args(write_input(rows, tmp / "input.parquet"), str(tmp / "out")))
    return rows, str(tmp / "out"), shards.read_manifest(str(tmp / "out"))


def test_every_input_row_is_one_output_row_with_the_expected_status(uninterrupted):
    rows, output, manifest = uninterrupted
    out = output_rows(output)
    assert [r["row_index"] for r in out] == list(range(len(rows)))
    assert [r["uid"] for r in out] == [r["uid"] for r in rows]
    mismatched = [
        (r["url"], o["status"], o["error_message"]) for r, o in zip(rows, out) if o["status"] != r["expect"]
    ]
    assert not mismatched
    assert all(o["error_message"] for o in out if o["status"] != "success")
    assert manifest["complete"] and manifest["totals"]["count"] == len(rows)
    assert not storage.list_files(storage.join(output, writer.STAGING_DIR))


def test_duplicates_name_the_first_occurrence_which_is_kept(uninterrupted):
    rows, output, _ = uninterrupted
    out = {r["uid"]: r for r in output_rows(output)}
    url_dup = out[f"uid-{NUM_SCENES:03d}"]
    assert "row_index 5" in url_dup["error_message"] and url_dup["sha256"] is None
    content_dup = out[f"uid-{NUM_SCENES + 1:03d}"]
    assert "row_index 3" in content_dup["error_message"]
    assert content_dup["sha256"] == out["uid-003"]["sha256"]


def excluded_keys(output_uri: str) -> set[str]:
    manifest = shards.read_manifest(output_uri)
    return set().union(
        *(shards.excluded_keys(shards.read_stats(output_uri, s["shard_id"])) for s in manifest["shards"])
    )


def test_tars_hold_exactly_the_success_rows_resized_and_the_stats_exclude_the_content_duplicates(
    uninterrupted,
):
    _, output, _ = uninterrupted
    out = output_rows(output)
    samples = tar_samples(output)
    excluded = excluded_keys(output)
    # The tars are written before content dedup: its duplicates are in them, and listed as excluded.
    content_duplicates = {r["key"] for r in out if r["status"] == "duplicate" and r["sha256"] is not None}
    assert content_duplicates and excluded == content_duplicates
    assert sorted(set(samples) - excluded) == sorted(r["key"] for r in out if r["status"] == "success")
    assert excluded <= set(samples)
    for row in out:
        if row["status"] != "success":
            continue
        sample = samples[row["key"]]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert min(image.size) == 32 and image.size == (row["width"], row["height"])
        assert sample["txt"].decode() == (row["caption"] or "")
        assert json.loads(sample["json"])["uid"] == row["uid"]


def test_ingest_through_ray_job_submit_reads_and_writes_the_s3_store(
    site, local_stack, local_stack_env, s3_prefix
):
    rows = input_rows(site)[:NUM_SCENES] + input_rows(site)[NUM_SCENES : NUM_SCENES + 3]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("url", "caption", "uid")} for r in rows]), buffer)
    input_uri = storage.join(s3_prefix, "input", "pairs.parquet")
    storage.write_bytes(input_uri, buffer.getvalue())
    output = storage.join(s3_prefix, "shards")
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", local_stack.config.ray_dashboard_url,
        "--", sys.executable, "-m", "pipelines.ingest", *ingest_args(input_uri, output),
        "--mlflow-experiment", "tests-ingest",
    ]  # fmt: skip
    job_run = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **local_stack_env}, timeout=600
    )
    assert job_run.returncode == 0, job_run.stdout + job_run.stderr
    assert "| success |" in job_run.stdout
    out = output_rows(output)
    assert [r["status"] for r in out] == [r["expect"] for r in rows]
    assert storage.exists(storage.join(output, "config.yaml"))
    in_dataset = set(tar_samples(output)) - excluded_keys(output)
    assert sorted(in_dataset) == sorted(r["key"] for r in out if r["status"] == "success")

    runs = mlflow.search_runs(experiment_names=["tests-ingest"], filter_string=f"params.output = '{output}'")
    assert len(runs) == 1
    assert runs.iloc[0]["metrics.rows/success"] == sum(r["status"] == "success" for r in out)
    assert runs.iloc[0]["metrics.rows/count"] == len(rows)


def test_clip_score_filter_scores_every_image_and_filters_below_the_threshold(site, tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    clip_core.save_checkpoint(clip_core.create_model("ViT-Tiny-16"), checkpoint)
    rows = input_rows(site)[:12]
    args = ingest_args(write_input(rows, tmp_path / "input.parquet"), str(tmp_path / "out"))
    args += [
        "--set",
        f"filters.clip_score={{checkpoint: '{checkpoint}', model: ViT-Tiny-16, threshold: 0.0}}",
    ]
    run_ingest_job(args)
    out = output_rows(str(tmp_path / "out"))
    scored = [r for r in out if r["clip_score"] is not None]
    assert len(scored) == 12
    below = [r for r in scored if r["clip_score"] < 0.0]
    assert all(r["status"] == "filtered" and "clip" in r["error_message"].lower() for r in below)
    assert all(r["status"] == "success" for r in scored if r["clip_score"] >= 0.0)
    # Same model, same preprocessing: the stored score is the cosine clip_core computes.
    model = clip_core.create_model("ViT-Tiny-16", pretrained=str(checkpoint)).eval()
    first = next(r for r in scored if r["status"] == "success")
    sample = tar_samples(str(tmp_path / "out"))[first["key"]]
    with torch.no_grad():
        image = clip_core.image_transform(64, is_train=False)(Image.open(io.BytesIO(sample["jpg"])))
        feats = (
            model.encode_image(image[None], normalize=True)
            @ model.encode_text(clip_core.tokenize([first["caption"]]), normalize=True).T
        )
    assert first["clip_score"] == pytest.approx(feats.item(), abs=1e-4)


def test_cluster_wide_dedup_gives_the_same_rows_as_dedup_in_the_driver(uninterrupted, tmp_path):
    rows, reference, _ = uninterrupted
    output = str(tmp_path / "out")
    run_ingest_job(ingest_args(write_input(rows, tmp_path / "input.parquet"), output), dedup_in_driver=False)
    ours = [(r["key"], r["sha256"], r["status"], r["error_message"]) for r in output_rows(output)]
    theirs = [(r["key"], r["sha256"], r["status"], r["error_message"]) for r in output_rows(reference)]
    assert ours == theirs
