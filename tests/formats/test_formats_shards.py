"""pipelines.formats.shards: committed shards are found by their stats files alone, in shard order, and tars
read back as webdataset groups them, with the image member picked in one order for every reader."""

from __future__ import annotations

import io
import tarfile

from pipelines.formats import shards


def _tar(members: list[tuple[str, bytes]]) -> tarfile.TarFile:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return tarfile.open(fileobj=buffer, mode="r|")


def test_committed_tars_are_the_shards_with_stats_in_shard_order(tmp_path):
    for shard_id in (12, 3, 100000):
        (tmp_path / shards.tar_name(shard_id)).write_bytes(b"")
        (tmp_path / shards.stats_name(shard_id)).write_text("{}")
    (tmp_path / shards.tar_name(7)).write_bytes(b"")  # written, never committed
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / shards.stats_name(8)).write_text("{}")  # not a shard of this output
    (tmp_path / shards.MANIFEST_NAME).write_text("{}")
    assert shards.committed_shards(str(tmp_path)) == {3, 12, 100000}
    assert shards.committed_tars(str(tmp_path)) == [
        str(tmp_path / "00003.tar"),
        str(tmp_path / "00012.tar"),
        str(tmp_path / "100000.tar"),
    ]


def test_a_tar_names_its_stats_file_beside_it():
    assert shards.stats_uri_of_tar("s3://b/run/00042.tar") == "s3://b/run/00042_stats.json"
    assert shards.stats_uri_of_tar(shards.tar_uri("/d", 5)) == shards.stats_uri("/d", 5)
    assert shards.stats_shard_id("00042_stats.json") == 42
    assert shards.stats_shard_id("sub/00042_stats.json") is None
    assert shards.stats_shard_id("00042.tar") is None


def test_tar_samples_group_members_by_key_within_their_folder():
    tar = _tar(
        [("a.jpg", b"A"), ("a.TXT", b"cap a"), ("x/a.png", b"XA"), ("b.seg.json", b"{}"), ("b.webp", b"B")]
    )
    assert list(shards.tar_samples(tar)) == [
        ("a", {"jpg": b"A", "txt": b"cap a"}),
        ("x/a", {"png": b"XA"}),
        ("b", {"seg.json": b"{}", "webp": b"B"}),
    ]


def test_tar_samples_keep_skips_members_but_still_yields_every_sample():
    tar = _tar([("a.jpg", b"A"), ("a.json", b"{}"), ("b.json", b"{}")])
    assert list(shards.tar_samples(tar, keep=("jpg",))) == [("a", {"jpg": b"A"}), ("b", {})]


def test_sample_image_prefers_the_first_image_extension():
    assert shards.sample_image({"png": b"P", "jpeg": b"J", "txt": b"t"}) == b"J"
    assert shards.sample_image({"webp": b"W"}) == b"W"
    assert shards.sample_image({"txt": b"t", "json": b"{}"}) is None
    assert set(shards.SHARD_IMAGE_EXTS) <= set(shards.IMAGE_EXTS)


def test_committed_shards_are_the_same_however_the_output_is_spelt(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "a").mkdir()
    (out / shards.stats_name(0)).write_text("{}")
    monkeypatch.chdir(tmp_path / "a")
    spellings = [str(out), f"{out}/", str(tmp_path / "a" / ".." / "out"), "../out", "../a/../out/"]
    assert {spelling: shards.committed_shards(spelling) for spelling in spellings} == dict.fromkeys(
        spellings, {0}
    )
