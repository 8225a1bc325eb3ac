"""Tests for the training input pipeline: shards resolved from folders, manifests and brace patterns; every
sample once per epoch across ranks and workers; shuffling; corrupt samples skipped and counted; exact resume;
streaming from the local stack's S3 without touching local disk."""

import io
import json
import os
import shutil
import tarfile
from collections import Counter

import pytest
import torch

from pipelines import storage
from pipelines.demo import scenes
from pipelines.formats.shards import tar_uri
from pipelines.ingest import writer
from pipelines.train import data

SAMPLES_PER_SHARD = 10
NUM_SHARDS = 6
IMAGE_SIZE = 32
BAD_JPEG = (1, 3)  # (shard, sample) whose image bytes are not an image
NO_CAPTION = (2, 5)  # (shard, sample) written without a caption
TRUNCATED_SHARD = 5
TRUNCATED_KEEPS = 4  # samples of the truncated shard that survive the cut


def key_of(shard_id: int, index: int) -> str:
    return f"{shard_id:05d}{index:04d}"


def jpeg(index: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    scenes.make_scene(index, seed=seed, size=(48, 48)).image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def shard_rows(shard_id: int, count: int = SAMPLES_PER_SHARD, seed: int = 0, bad_images: bool = False):
    rows = []
    for i in range(count):
        scene = scenes.make_scene(shard_id * 100 + i, seed=seed, size=(48, 48))
        image = jpeg(shard_id * 100 + i, seed)
        if bad_images or (shard_id, i) == BAD_JPEG:
            image = b"this is not a jpeg" + image[200:]
        caption = None if (shard_id, i) == NO_CAPTION else f"{scene.caption} ({key_of(shard_id, i)})"
        rows.append(
            {
                "row_index": shard_id * count + i,
                "shard_id": shard_id,
                "key": key_of(shard_id, i),
                "url": f"https://img.example.com/{shard_id}/{i}.jpg",
                "caption": caption,
                "status": "success",
                "image": image,
                "image_ext": "jpg",
            }
        )
    return rows


def truncate_inside_sample(tar_path: str, keep: int) -> None:
    """Cut the tar in the middle of sample `keep`'s image, so samples 0..keep-1 survive whole."""
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name == f"{key_of(TRUNCATED_SHARD, keep)}.jpg")
    with open(tar_path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> str:
    """6 committed shards of 10 samples with a manifest: one bad jpeg, one missing caption, one truncated tar."""
    root = str(tmp_path_factory.mktemp("shards"))
    for shard_id in range(NUM_SHARDS):
        writer.write_shard(root, shard_id, shard_rows(shard_id))
    writer.write_manifest(root, expected_shards=NUM_SHARDS)
    truncate_inside_sample(tar_uri(root, TRUNCATED_SHARD), TRUNCATED_KEEPS)
    return root


def good_keys() -> set[str]:
    keys = {key_of(s, i) for s in range(NUM_SHARDS) for i in range(SAMPLES_PER_SHARD)}
    lost = {key_of(TRUNCATED_SHARD, i) for i in range(TRUNCATED_KEEPS, SAMPLES_PER_SHARD)}
    return keys - lost - {key_of(*BAD_JPEG), key_of(*NO_CAPTION)}


CORRUPT_PER_EPOCH = NUM_SHARDS * SAMPLES_PER_SHARD - len(good_keys())


def loader(shards, position=None, **spec_fields) -> data.TrainLoader:
    defaults = dict(
        rank=0,
        world_size=1,
        local_batch_size=4,
        image_size=IMAGE_SIZE,
        num_workers=0,
        shuffle_buffer=8,
        seed=0,
    )
    spec = data.LoaderSpec(shards=tuple(shards), **(defaults | spec_fields))
    return data.TrainLoader(spec, position, with_keys=True)


# ---------------------------------------------------------------------------------------------------------
# Resolving --data


def test_folder_manifest_and_brace_pattern_resolve_to_shards_with_sample_counts(shards_dir, tmp_path):
    expected = [data.Shard(tar_uri(shards_dir, i), SAMPLES_PER_SHARD) for i in range(NUM_SHARDS)]
    assert data.resolve_shards([shards_dir]) == expected
    assert data.resolve_shards([os.path.join(shards_dir, "manifest.json")]) == expected
    assert data.resolve_shards(os.path.join(shards_dir, "{00001..00003}.tar")) == expected[1:4]
    assert data.resolve_shards([os.path.join(shards_dir, "00004.tar")]) == expected[4:5]
    # Two entries naming the same shard count it once.
    assert data.resolve_shards([shards_dir, os.path.join(shards_dir, "00000.tar")]) == expected

    # Without a manifest the committed stats files count; a tar without stats (uncommitted) is left out.
    no_manifest = tmp_path / "no_manifest"
    shutil.copytree(shards_dir, no_manifest)
    os.remove(no_manifest / "manifest.json")
    os.remove(no_manifest / "00002_stats.json")
    found = data.resolve_shards([str(no_manifest)])
    assert [(os.path.basename(s.uri), s.num_samples) for s in found] == [
        (f"{i:05d}.tar", SAMPLES_PER_SHARD) for i in (0, 1, 3, 4, 5)
    ]


def test_data_without_committed_shards_fails_with_one_sentence(shards_dir, tmp_path):
    with pytest.raises(ValueError, match="holds no committed shard with samples") as error:
        data.resolve_shards([str(tmp_path)])
    assert "\n" not in str(error.value)
    uncommitted = tmp_path / "partial"
    shutil.copytree(shards_dir, uncommitted)
    os.remove(uncommitted / "00003_stats.json")
    with pytest.raises(ValueError, match="00003.tar has no _stats.json"):
        data.resolve_shards([str(uncommitted / "{00002..00003}.tar")])


# ---------------------------------------------------------------------------------------------------------
# Splitting and shuffling


def test_epoch_parts_deal_every_sample_to_one_stream_even_with_fewer_shards_than_streams():
    shards = [data.Shard(f"s{i}.tar", n) for i, n in enumerate([10, 7, 3])]
    for num_streams in (1, 2, 3, 4, 8):
        dealt = Counter()
        streams = data.epoch_parts(shards, num_streams, seed=0, epoch=0)
        assert len(streams) == num_streams and all(streams)
        for parts in streams:
            for p in parts:
                dealt.update((p.shard.uri, i) for i in range(p.part, p.shard.num_samples, p.parts))
        assert dealt == Counter((s.uri, i) for s in shards for i in range(s.num_samples))


def test_every_sample_of_an_epoch_is_seen_once_across_2_ranks_x_2_workers(shards_dir):
    shards = data.resolve_shards([shards_dir])
    seen: Counter = Counter()
    for rank in range(2):
        with loader(shards, rank=rank, world_size=2, num_workers=2) as rank_loader:
            for _ in range(24):  # enough for every stream to finish epoch 0
                images, texts, keys = next(rank_loader)
                assert images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
                assert texts.shape == (4, 77) and texts.dtype == torch.long
                seen.update(keys)
    epoch0 = {key: n for (epoch, key), n in seen.items() if epoch == 0}
    assert epoch0 == dict.fromkeys(good_keys(), 1)
    assert max(n for (epoch, _), n in seen.items() if epoch == 1) == 1


def test_samples_a_shards_stats_exclude_are_never_served(tmp_path):
    """Ingest writes a tar before content dedup: the duplicates it then finds stay in the tar, listed in the
    stats as excluded_keys, and the loader leaves them out (the stats' success count already does)."""
    root = str(tmp_path)
    rows = shard_rows(0)
    tar_keys, tar_bytes = writer.write_tar(root, 0, rows)
    duplicates = {key_of(0, 2), key_of(0, 7)}
    for row in rows:
        if row["key"] in duplicates:
            row.update(status="duplicate", error_message="same image bytes as row_index 1")
    stats = writer.commit_shard(root, 0, rows, tar_keys, tar_bytes)
    assert stats["successes"] == SAMPLES_PER_SHARD - 2 and sorted(stats["excluded_keys"]) == sorted(
        duplicates
    )
    shards = data.resolve_shards([root])
    assert shards == [data.Shard(tar_uri(root, 0), SAMPLES_PER_SHARD - 2)]
    seen: Counter = Counter()
    with loader(shards, local_batch_size=2) as one:
        for _ in range(8):  # two epochs of 8 samples
            seen.update(key for _, key in next(one)[2])
    served = {key_of(0, i) for i in range(SAMPLES_PER_SHARD)} - duplicates - {key_of(*BAD_JPEG)}
    assert set(seen) == served and set(seen.values()) == {2}


def test_corrupt_samples_are_skipped_and_counted(shards_dir):
    # One stream without shuffling, one sample per batch: when epoch 1 starts, epoch 0 is fully counted.
    shards = data.resolve_shards([shards_dir])
    single = loader(shards, local_batch_size=1, shuffle_buffer=0)
    keys = []
    while True:
        _, _, [(epoch, key)] = next(single)
        if epoch == 1:
            break
        keys.append(key)
    assert sorted(keys) == sorted(good_keys())
    assert single.corrupt_samples == CORRUPT_PER_EPOCH == 8


def key_order(shards, seed: int, epoch: int) -> list[str]:
    counters = data.StreamCounters()
    stream = data.stream_raw_samples(
        shards, 0, 1, seed, shuffle_buffer=16, counters=counters, start_epoch=epoch
    )
    return [s.key for s in samples_of_epoch(stream, epoch)]


def samples_of_epoch(stream, epoch: int):
    for sample in stream:
        if sample.epoch != epoch:
            return
        yield sample


def test_shuffle_differs_between_epochs_and_seeds_but_covers_the_same_samples(shards_dir):
    shards = data.resolve_shards([shards_dir])
    epoch0, epoch1 = key_order(shards, seed=0, epoch=0), key_order(shards, seed=0, epoch=1)
    other_seed = key_order(shards, seed=1, epoch=0)
    assert epoch0 == key_order(shards, seed=0, epoch=0)  # deterministic
    assert epoch0 != epoch1 and epoch0 != other_seed
    assert sorted(epoch0) == sorted(epoch1) == sorted(other_seed)
    # Shuffled within the buffer, not only shard by shard: consecutive samples come from different shards.
    assert sum(a[:5] != b[:5] for a, b in zip(epoch0, epoch0[1:])) > len(epoch0) // 4


def test_shuffle_buffer_is_a_permutation():
    import random

    samples = [data.RawSample(str(i), 0, None, None) for i in range(100)]
    for size in (0, 1, 7, 100, 1000):
        out = [s.key for s in data.shuffled(iter(samples), size, random.Random(3))]
        assert sorted(out, key=int) == [str(i) for i in range(100)]


# ---------------------------------------------------------------------------------------------------------
# Corrupt data


def test_missing_image_or_caption_members_are_corrupt_samples(tmp_path):
    image = jpeg(0, seed=0)
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, payload in [
            ("a.jpg", image),
            ("a.txt", b"a red circle"),
            ("b.txt", b"a caption without an image"),
            ("c.jpg", image),  # no caption
            ("d.jpg", image),
            ("d.txt", b"   "),  # blank caption
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    counters = data.StreamCounters()
    part = data.ShardPart(data.Shard(str(path), 4), 0, 1)
    samples = list(data.read_shard_part(part, 0, counters))
    assert [s.key for s in samples] == ["a", "b", "c", "d"]
    transform = data.clip_core.image_transform(IMAGE_SIZE, is_train=True)
    decoded = [data.decode_sample(s, transform) for s in samples]
    assert decoded[0][1] == "a red circle" and decoded[0][0].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert decoded[1:] == [None, None, None]
    assert counters.corrupt == 0  # nothing lost in the tar itself

    # An unreadable shard loses every sample it declares, and the loss is counted, not raised.
    missing = data.ShardPart(data.Shard(str(tmp_path / "gone.tar"), 5), 0, 1)
    assert list(data.read_shard_part(missing, 0, counters)) == []
    assert counters.corrupt == 5


def test_data_where_every_sample_fails_stops_with_one_sentence(tmp_path):
    for shard_id in range(2):
        writer.write_shard(str(tmp_path), shard_id, shard_rows(shard_id, count=3, bad_images=True))
    undecodable = data.resolve_shards([str(tmp_path)])
    unreadable = [data.Shard(str(tmp_path / f"gone_{i}.tar"), 3) for i in range(2)]
    for shards, workers in [(undecodable, 0), (undecodable, 1), (unreadable, 1)]:
        with pytest.raises(data.NoUsableSamplesError, match="no usable training sample") as error:
            next(loader(shards, num_workers=workers))
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Resume


def test_resume_from_position_yields_exactly_the_rest_of_the_uninterrupted_stream(shards_dir):
    shards = data.resolve_shards([shards_dir])
    options = dict(rank=1, world_size=2, num_workers=2, shuffle_buffer=16, seed=7)
    with loader(shards, **options) as first:
        for _ in range(5):  # odd: the resumed loader must start with the second worker's stream
            next(first)
        position = json.loads(json.dumps(first.position()))
        rest = [next(first) for _ in range(9)]  # runs into epoch 1 for some streams
        corrupt_at_end = first.corrupt_samples
    with loader(shards, position=position, **options) as resumed:
        assert resumed.samples_seen == 5 * 4 * 2
        for expected, got in zip(rest, [next(resumed) for _ in range(9)]):
            assert got[2] == expected[2]  # same samples, in the same order
            assert torch.equal(got[0], expected[0])  # same crops
            assert torch.equal(got[1], expected[1])
        assert resumed.corrupt_samples == corrupt_at_end
        assert resumed.position() == first.position()


def _merged(*positions: dict) -> dict:
    """The positions of several ranks in one, as gather_positions makes it."""
    merged = json.loads(json.dumps(positions[0]))
    for other in positions[1:]:
        merged["streams"].update(other["streams"])
    return merged


def _batches(rank_loader, count: int) -> list:
    return [next(rank_loader) for _ in range(count)]


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-loader-workers"])
def test_a_changed_world_size_continues_every_stream_where_it_stopped(shards_dir, caplog, num_workers):
    """2 ranks -> 1 rank -> 2 ranks (an elastic run losing a node and getting it back) yield exactly what 2
    ranks would have yielded all along: the same samples with the same crops, none repeated, none skipped."""
    shards = data.resolve_shards([shards_dir])
    options = dict(max_world_size=2, num_workers=num_workers, shuffle_buffer=16, seed=3)
    two = [loader(shards, rank=r, world_size=2, **options) for r in range(2)]
    before = [_batches(rank_loader, 3) for rank_loader in two]
    at_two = _merged(*(rank_loader.position() for rank_loader in two))
    uninterrupted = [_batches(rank_loader, 8) for rank_loader in two]  # runs into epoch 1
    at_end = _merged(*(rank_loader.position() for rank_loader in two))
    for rank_loader in two:
        rank_loader.close()

    with caplog.at_level("WARNING"):
        one = loader(shards, rank=0, world_size=1, position=at_two, **options)
        shrunk = _batches(one, 8)  # half the steps' samples at 1 rank...
        at_one = one.position()
        one.close()
        regrown = [loader(shards, rank=r, world_size=2, position=at_one, **options) for r in range(2)]
        grown = [_batches(rank_loader, 4) for rank_loader in regrown]  # ...the other half at 2 again
    assert "not resumable exactly" not in caplog.text
    assert at_one["world_size"] == 1 and sorted(at_one["streams"]) == sorted(at_two["streams"])

    def keyed(batches):
        return {tuple(keys): (images, texts) for images, texts, keys in batches}

    expected = keyed(uninterrupted[0] + uninterrupted[1])
    got = keyed(shrunk + grown[0] + grown[1])
    assert got.keys() == expected.keys()  # the same batches, so the same samples: none twice, none skipped
    for keys, (images, texts) in got.items():
        assert torch.equal(images, expected[keys][0]) and torch.equal(texts, expected[keys][1])
    seen = Counter(key for batch in before + [shrunk] + grown for _, _, keys in batch for key in keys)
    assert max(seen.values()) == 1
    assert {key for epoch, key in seen if epoch == 0} == good_keys()
    assert _merged(*(rank_loader.position() for rank_loader in regrown))["streams"] == at_end["streams"]
    assert one.samples_seen == 3 * 4 * 2 + 8 * 4


def test_a_changed_stream_layout_restarts_the_epoch_in_progress_at_shard_level(shards_dir, caplog):
    shards = data.resolve_shards([shards_dir])
    old = loader(shards, world_size=2, local_batch_size=8)  # laid out for 2 ranks: 2 streams
    for _ in range(5):  # 5 * 8 * 2 = 80 samples: epoch 1 of 60 is in progress
        next(old)
    position = old.position()
    with caplog.at_level("WARNING"):
        resumed = loader(shards, world_size=1, local_batch_size=8, position=position)  # 1 stream
    assert "num_streams changed" in caplog.text and "restarting epoch 1" in caplog.text
    _, _, keys = next(resumed)
    assert {epoch for epoch, _ in keys} == {1}
    assert resumed.samples_seen == 80 + 8 and resumed.epoch == pytest.approx(88 / 60)


def test_a_position_of_format_1_resumes_exactly(shards_dir, caplog):
    shards = data.resolve_shards([shards_dir])
    options = dict(rank=1, world_size=2, num_workers=2, shuffle_buffer=16, seed=7)
    with loader(shards, **options) as first:
        _batches(first, 5)
        now = first.position()
        rest = _batches(first, 4)
    # What the format-1 loader saved: streams by rank, local index i being global stream rank * 2 + i.
    old = {k: now[k] for k in ("local_batch_size", "seed", "shuffle_buffer", "num_samples", "num_shards")}
    old |= {"format": 1, "world_size": 2, "num_workers": 2, "batches": 5, "samples_seen": now["samples_seen"]}
    old["ranks"] = {"1": [now["streams"]["2"], now["streams"]["3"]]}
    with caplog.at_level("WARNING"), loader(shards, position=old, **options) as resumed:
        assert [keys for _, _, keys in _batches(resumed, 4)] == [keys for _, _, keys in rest]
    assert "not resumable exactly" not in caplog.text


# ---------------------------------------------------------------------------------------------------------
# S3


def test_streams_shards_from_s3_without_writing_local_files(
    local_stack_env, s3_prefix, tmp_path, monkeypatch
):
    for shard_id in range(3):
        writer.write_shard(s3_prefix, shard_id, shard_rows(shard_id))
    writer.write_manifest(s3_prefix, expected_shards=3)
    expected = [data.Shard(tar_uri(s3_prefix, i), SAMPLES_PER_SHARD) for i in range(3)]
    assert data.resolve_shards([s3_prefix]) == expected
    assert data.resolve_shards([f"{s3_prefix}/{{00000..00002}}.tar"]) == expected

    # Any temporary file, ours or a library's, would land in TMPDIR or the working directory.
    scratch, workdir = tmp_path / "tmp", tmp_path / "cwd"
    scratch.mkdir(), workdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.chdir(workdir)
    keys = []
    with loader(expected, num_workers=1, local_batch_size=4) as s3_loader:
        while len(keys) < 3 * SAMPLES_PER_SHARD - 2:  # one epoch: all but the bad jpeg and the blank caption
            keys += [key for _, key in next(s3_loader)[2]]
        assert sorted(keys) == sorted(
            key_of(s, i)
            for s in range(3)
            for i in range(SAMPLES_PER_SHARD)
            if (s, i) not in (BAD_JPEG, NO_CAPTION)
        )
    assert os.listdir(scratch) == [] and os.listdir(workdir) == []
    assert storage.is_s3(expected[0].uri)


def _rank_process(rank: int, shards, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rank_loader = loader(shards, rank=rank, world_size=2)
    for _ in range(3 + rank):  # ranks at different raw positions (in a real run they take the same steps)
        next(rank_loader)
    gathered = data.gather_positions(rank_loader)
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump({"gathered": gathered, "own": rank_loader.position()}, f)
    torch.distributed.destroy_process_group()


def test_gather_positions_collects_every_rank_so_each_resumes_exactly(shards_dir, tmp_path, caplog):
    import multiprocessing

    shards = data.resolve_shards([shards_dir])
    context = multiprocessing.get_context("fork")
    ranks = [
        context.Process(target=_rank_process, args=(r, shards, str(tmp_path / "init"), str(tmp_path / "out")))
        for r in range(2)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
        assert process.exitcode == 0
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    gathered = results[0]["gathered"]
    assert results[1]["gathered"]["streams"] == gathered["streams"]
    assert sorted(gathered["streams"]) == ["0", "1"]
    for rank in range(2):
        own = results[rank]["own"]["streams"]
        assert list(own) == [str(rank)] and gathered["streams"][str(rank)] == own[str(rank)]
        with caplog.at_level("WARNING"):
            resumed = loader(shards, rank=rank, world_size=2, position=gathered)
        assert resumed.position()["streams"] == own
    assert "not resumable exactly" not in caplog.text
