"""Tests for the shard writer: img2dataset/WebDataset layout read back by webdataset, Ray Data and OpenCLIP's
loader, Parquet with every row, stats written last as the commit mark, determinism, the run manifest."""

import argparse
import io
import json
import os
import random
import tarfile
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipelines import storage
from pipelines.formats import shards
from pipelines.ingest import writer

SAMPLES_PER_SHARD = 10


def encoded_image(color: tuple[int, int, int], ext: str = "jpg", size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
    return buffer.getvalue()


def shard_rows(shard_id: int = 3) -> list[dict]:
    """One shard of the contract's rows with every status, a png among the jpgs and a carried column."""
    rows = []
    plan = [
        ("success", None),
        ("failed_to_download", "HTTP 404 Not Found"),
        ("success", None),
        ("failed_to_decode", "cannot decode image: UnidentifiedImageError: cannot identify image file"),
        ("filtered", "caption shorter than 5 characters"),
        ("duplicate", "same sha256 as row 31"),
        ("failed_to_download", "HTTP 404 Not Found (gave up after 3 attempts)"),
        ("success", None),
        ("failed_to_download", "DNS lookup failed for img.example.com: [Errno -2] Name or service not known"),
    ]
    for i, (status, error) in enumerate(plan):
        row_index = shard_id * SAMPLES_PER_SHARD + i
        ok = status == "success"
        ext = "png" if i == 2 else "jpg"
        rows.append(
            {
                "row_index": row_index,
                "shard_id": shard_id,
                "key": f"{shard_id:05d}{i:01d}",
                "url": f"https://img.example.com/{row_index}.jpg",
                "caption": f"a photo of thing {row_index}" if i != 7 else None,
                "licence": "cc-by" if i % 2 else None,
                "source_original_width": 640 + i,
                "status": status,
                "error_message": error,
                "width": 24 if ok else None,
                "height": 16 if ok else None,
                "original_width": 48 if ok else None,
                "original_height": 32 if ok else None,
                "sha256": f"{row_index:064x}" if ok or status == "duplicate" else None,
                "image": encoded_image((10 * i, 100, 200), ext) if ok else None,
                "image_ext": ext,
            }
        )
    return rows


def success_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "success"]


def test_shard_reads_back_with_webdataset_in_img2dataset_layout(tmp_path):
    rows = shard_rows()
    stats = writer.write_shard(str(tmp_path), 3, rows)

    assert sorted(os.listdir(tmp_path)) == ["00003.parquet", "00003.tar", "00003_stats.json"]
    with tarfile.open(tmp_path / "00003.tar") as tar:
        names = tar.getnames()
        assert all(m.mtime == writer.TAR_MTIME and m.uid == 0 and m.mode == 0o644 for m in tar.getmembers())
    assert names == [
        "000030.jpg", "000030.txt", "000030.json",
        "000032.png", "000032.txt", "000032.json",
        "000037.jpg", "000037.txt", "000037.json",
    ]  # fmt: skip

    samples = list(wds.WebDataset(str(tmp_path / "00003.tar"), shardshuffle=False))
    by_key = {r["key"]: r for r in rows}
    assert [s["__key__"] for s in samples] == ["000030", "000032", "000037"]
    for sample in samples:
        row = by_key[sample["__key__"]]
        ext = row["image_ext"]
        assert sample[ext] == row["image"]
        assert Image.open(io.BytesIO(sample[ext])).size == (24, 16)
        assert sample["txt"].decode() == (row["caption"] or "")
        meta = json.loads(sample["json"])
        assert list(meta) == [
            "url", "caption", "licence", "source_original_width", "key", "status", "error_message",
            "width", "height", "original_width", "original_height", "sha256",
        ]  # fmt: skip
        assert meta["key"] == row["key"] and meta["url"] == row["url"] and meta["status"] == "success"
        assert (meta["width"], meta["height"], meta["original_width"]) == (24, 16, 48)
        assert (
            meta["sha256"] == row["sha256"] and meta["source_original_width"] == row["source_original_width"]
        )
    assert stats["successes"] == 3 and stats["count"] == 9


def test_openclip_training_loader_reads_the_shard(tmp_path):
    import open_clip
    import torch
    from open_clip_train.data import get_wds_dataset
    from torchvision import transforms

    torch.set_num_threads(1)
    rows = shard_rows()
    writer.write_shard(str(tmp_path), 3, rows)
    args = argparse.Namespace(
        val_data=str(tmp_path / "00003.tar"), val_num_samples=3, batch_size=8, workers=0, world_size=1
    )
    preprocess = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    info = get_wds_dataset(args, preprocess, is_train=False, tokenizer=tokenizer)
    batches = list(info.dataloader)
    assert len(batches) == 1
    images, texts = batches[0]
    assert images.shape == (3, 3, 8, 8) and texts.shape == (3, 77)
    assert torch.equal(texts[0], tokenizer(["a photo of thing 30"])[0])


@pytest.mark.cluster
def test_ray_data_reads_the_shard(tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rows = shard_rows()
    # One image format per shard, as a run has one output_format: Ray Data cannot read a shard whose
    # samples have different image extensions (the missing column of each sample breaks its block).
    rows[2]["image"], rows[2]["image_ext"] = encoded_image((0, 0, 0), "jpg", (8, 8)), "jpg"
    writer.write_shard(str(tmp_path / "out"), 3, rows)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        samples = ray.data.read_webdataset(str(tmp_path / "out" / "00003.tar")).take_all()
    finally:
        ray.shutdown()
    by_key = {s["__key__"]: s for s in samples}
    assert sorted(by_key) == ["000030", "000032", "000037"]
    assert by_key["000030"]["jpg"].shape == (16, 24, 3) and by_key["000032"]["jpg"].shape == (8, 8, 3)
    assert by_key["000030"]["txt"] == "a photo of thing 30"
    assert by_key["000030"]["json"]["url"] == rows[0]["url"]
    assert by_key["000037"]["json"]["caption"] is None


def test_parquet_has_every_input_row_with_status_and_no_image(tmp_path):
    rows = shard_rows()
    writer.write_shard(str(tmp_path), 3, rows)
    table = pq.read_table(tmp_path / "00003.parquet")
    assert table.num_rows == len(rows)
    assert "image" not in table.column_names
    assert table.column("key").to_pylist() == [r["key"] for r in rows]
    assert table.column("status").to_pylist() == [r["status"] for r in rows]
    assert table.column("error_message").to_pylist() == [r["error_message"] for r in rows]
    schema = table.schema
    assert schema.field("width").type == pa.int64() and schema.field("row_index").type == pa.int64()
    assert schema.field("clip_score").type == pa.float64()
    assert schema.field("sha256").type == pa.string() and schema.field("caption").type == pa.string()
    assert schema.field("source_original_width").type == pa.int64()
    assert table.column("clip_score").null_count == len(rows)


def test_stats_count_statuses_and_group_failure_reasons(tmp_path):
    stats = writer.write_shard(str(tmp_path), 3, shard_rows())
    assert json.loads((tmp_path / "00003_stats.json").read_text()) == stats
    assert stats["counts"] == {
        "success": 3, "failed_to_download": 3, "failed_to_decode": 1, "filtered": 1, "duplicate": 1,
    }  # fmt: skip
    assert stats["failed_to_download"] == 3 and stats["failed_to_resize"] == 1
    assert stats["row_range"] == [30, 39]
    assert stats["status_dict"]["success"] == 3
    # The two 404s, one with a retry note, are one reason; the host is gone from the DNS one.
    assert stats["status_dict"]["failed_to_download: HTTP 404 Not Found"] == 2
    assert stats["status_dict"]["failed_to_download: DNS lookup failed for <host>"] == 1
    assert stats["status_dict"]["duplicate: same sha256 as row N"] == 1
    assert stats["bytes_written"]["tar"] == os.path.getsize(tmp_path / "00003.tar")
    assert stats["bytes_written"]["parquet"] == os.path.getsize(tmp_path / "00003.parquet")


def test_coarse_reason_keeps_http_codes_and_drops_specifics():
    assert writer.coarse_reason("failed_to_download", "HTTP 503 Service Unavailable; no time left") == (
        "failed_to_download: HTTP 503 Service Unavailable"
    )
    assert writer.coarse_reason("failed_to_download", "redirect to http://a.b/c?x=1 refused: bad") == (
        "failed_to_download: redirect to <url> refused"
    )
    assert writer.coarse_reason("failed_to_download", "refused to connect to 10.0.0.1: private") == (
        "failed_to_download: refused to connect to <ip>"
    )
    assert writer.coarse_reason("failed_to_download", "deadline of 10 s exceeded (earlier attempt: x)") == (
        "failed_to_download: deadline of N s exceeded"
    )
    assert writer.coarse_reason("filtered", None) == "filtered: no reason given"


def test_same_rows_give_byte_identical_shards_in_any_order_and_form(tmp_path):
    rows = shard_rows()
    writer.write_shard(str(tmp_path / "a"), 3, rows)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    writer.write_shard(str(tmp_path / "b"), 3, pa.Table.from_pylist(shuffled))
    assert (tmp_path / "a" / "00003.tar").read_bytes() == (tmp_path / "b" / "00003.tar").read_bytes()
    assert pq.read_table(tmp_path / "a" / "00003.parquet").equals(
        pq.read_table(tmp_path / "b" / "00003.parquet")
    )


def test_crash_while_writing_the_tar_publishes_nothing(tmp_path):
    rows = shard_rows()
    rows[7]["image"] = "not bytes"
    with pytest.raises(TypeError, match="no image bytes"):
        writer.write_shard(str(tmp_path), 3, rows)
    assert os.listdir(tmp_path) == []
    assert shards.committed_shards(str(tmp_path)) == set()


def test_crash_after_the_tar_leaves_the_shard_uncommitted_and_a_rewrite_commits_it(tmp_path):
    rows = shard_rows()
    rows[1]["licence"] = 12  # a carried column Arrow cannot type: the Parquet step fails after the tar
    with pytest.raises(pa.ArrowException):
        writer.write_shard(str(tmp_path), 3, rows)
    assert (tmp_path / "00003.tar").exists()
    assert not (tmp_path / "00003_stats.json").exists()
    assert shards.committed_shards(str(tmp_path)) == set()

    good = shard_rows()
    good[0]["caption"] = "rewritten"
    writer.write_shard(str(tmp_path), 3, good)
    assert shards.committed_shards(str(tmp_path)) == {3}
    first = next(iter(wds.WebDataset(str(tmp_path / "00003.tar"), shardshuffle=False)))
    assert first["txt"] == b"rewritten"
    assert pq.read_table(tmp_path / "00003.parquet").num_rows == len(good)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]


def test_rewriting_a_committed_shard_uncommits_it_until_done(tmp_path):
    writer.write_shard(str(tmp_path), 3, shard_rows())
    rows = shard_rows()
    rows[0]["image"] = None
    with pytest.raises(TypeError):
        writer.write_shard(str(tmp_path), 3, rows)
    assert shards.committed_shards(str(tmp_path)) == set()


def test_rows_of_another_shard_are_refused(tmp_path):
    with pytest.raises(ValueError, match="belongs to shard 3"):
        writer.write_shard(str(tmp_path), 4, shard_rows())
    assert not (tmp_path / "00004.tar").exists()


def test_tar_streams_without_holding_the_shard_in_memory(tmp_path):
    rows = shard_rows()
    big = np.random.default_rng(0).bytes
    for row in success_rows(rows):
        row["image"] = big(3 * 1024 * 1024)
    total = sum(len(r["image"]) for r in success_rows(rows))
    tracemalloc.start()
    try:
        writer.write_shard(str(tmp_path), 3, rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert os.path.getsize(tmp_path / "00003.tar") > total
    assert peak < total / 2


def test_manifest_lists_committed_shards_with_totals(tmp_path):
    out = str(tmp_path)
    writer.write_shard(out, 0, shard_rows(0))
    writer.write_shard(out, 1, shard_rows(1))
    broken = shard_rows(2)
    broken[0]["image"] = 5
    with pytest.raises(TypeError):
        writer.write_shard(out, 2, broken)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "00009_stats.json").write_text("{}")  # not a shard of this output

    assert shards.committed_shards(out) == {0, 1}
    manifest = writer.write_manifest(out, expected_shards=3)
    assert shards.read_manifest(out) == manifest
    assert [s["shard_id"] for s in manifest["shards"]] == [0, 1]
    assert manifest["shards"][1]["files"] == {
        "tar": "00001.tar", "parquet": "00001.parquet", "stats": "00001_stats.json",
    }  # fmt: skip
    assert manifest["totals"] == {
        "count": 18, "success": 6, "failed_to_download": 6, "failed_to_decode": 2, "filtered": 2, "duplicate": 2,
    }  # fmt: skip
    assert manifest["complete"] is False and manifest["missing_shards"] == [2]


def test_shard_on_s3_matches_the_local_one(tmp_path, s3_prefix, local_stack_env):
    rows = shard_rows()
    rows[0]["clip_score"] = 0.31
    writer.write_shard(str(tmp_path), 3, rows)
    writer.write_shard(s3_prefix, 3, rows)

    assert shards.committed_shards(s3_prefix) == {3}
    s3_tar = storage.read_bytes(storage.join(s3_prefix, "00003.tar"))
    assert s3_tar == (tmp_path / "00003.tar").read_bytes()
    samples = list(wds.WebDataset(str(tmp_path / "00003.tar"), shardshuffle=False))
    assert json.loads(samples[0]["json"])["clip_score"] == 0.31
    s3_table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(s3_prefix, "00003.parquet"))))
    assert s3_table.num_rows == len(rows)
    assert s3_table.column("clip_score").to_pylist()[0] == 0.31

    manifest = writer.write_manifest(s3_prefix)
    assert shards.read_manifest(s3_prefix)["totals"]["count"] == len(rows)
    assert manifest["expected_shards"] is None and manifest["complete"] is None
