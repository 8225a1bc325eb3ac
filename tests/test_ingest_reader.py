"""The ingest reader: every input format, folders and globs, carried columns, the deterministic shard split and
its keys, the Parquet copy of text inputs, job-level input errors, and S3 input through the real local stack."""

import csv
import gzip
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.reader import (
    INPUT_CACHE_DIR,
    InputError,
    list_input_files,
    plan_shards,
    read_shard,
    shard_key,
)


def make_rows(n, start=0):
    return [
        {"url": f"http://example.com/{i}.jpg", "caption": f"a photo of thing {i}", "similarity": i / 100}
        for i in range(start, start + n)
    ]


def encode(rows, fmt):
    """The bytes of a URL list in one format (before optional gzip)."""
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=2)
        return sink.getvalue()
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def write(path, rows, fmt, gz=False):
    data = encode(rows, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# Planning copies text inputs into the output folder; each test gets its own (set by the fixture below).
OUTPUT = {}


@pytest.fixture(autouse=True)
def output_folder(tmp_path):
    OUTPUT["uri"] = str(tmp_path / "out")
    yield OUTPUT["uri"]
    OUTPUT.clear()


def config(input_uri, **overrides):
    return IngestConfig(input=str(input_uri), output=OUTPUT["uri"], **overrides)


def read_all(cfg):
    specs = plan_shards(cfg)
    return specs, [read_shard(cfg, spec) for spec in specs]


@pytest.mark.parametrize(
    "name, fmt, gz",
    [
        ("urls.parquet", "parquet", False),
        ("urls.csv", "csv", False),
        ("urls.csv.gz", "csv", True),
        ("urls.tsv", "tsv", False),
        ("urls.tsv.gz", "tsv", True),
        ("urls.jsonl", "jsonl", False),
        ("urls.jsonl.gz", "jsonl", True),
    ],
)
def test_each_format_reads_every_row_in_order(tmp_path, name, fmt, gz):
    rows = make_rows(7)
    path = write(tmp_path / name, rows, fmt, gz)
    specs, shards = read_all(config(path, samples_per_shard=3))
    assert [(s.shard_id, s.first_row_index, s.num_rows) for s in specs] == [(0, 0, 3), (1, 3, 3), (2, 6, 1)]
    table = pa.concat_tables(shards)
    assert table.column_names == ["row_index", "shard_id", "key", "url", "caption", "similarity"]
    assert table["row_index"].to_pylist() == list(range(7))
    assert table["shard_id"].to_pylist() == [0, 0, 0, 1, 1, 1, 2]
    assert table["key"].to_pylist() == ["000000", "000001", "000002", "000010", "000011", "000012", "000020"]
    assert table["url"].to_pylist() == [r["url"] for r in rows]
    assert table["caption"].to_pylist() == [r["caption"] for r in rows]
    assert (
        table.schema.field("row_index").type == pa.int64()
        and table.schema.field("shard_id").type == pa.int64()
    )
    # Text formats carry text as written; typed formats keep their types.
    expected = (
        [str(r["similarity"]) for r in rows] if fmt in ("csv", "tsv") else [r["similarity"] for r in rows]
    )
    assert table["similarity"].to_pylist() == expected


def test_explicit_format_reads_a_file_whose_name_does_not_tell(tmp_path):
    path = write(tmp_path / "cc3m_train", make_rows(4), "tsv")
    with pytest.raises(InputError, match="cannot tell the format"):
        plan_shards(config(path))
    _, shards = read_all(config(path, input_format="tsv"))
    assert shards[0]["url"].to_pylist() == [r["url"] for r in make_rows(4)]


def test_folder_takes_data_files_in_path_order_and_shards_cross_files(tmp_path):
    folder = tmp_path / "lists"
    write(folder / "b.csv", make_rows(5, start=4), "csv")
    write(folder / "a.parquet", make_rows(4, start=0), "parquet")
    write(folder / "sub" / "c.jsonl.gz", make_rows(3, start=9), "jsonl", gz=True)
    (folder / "_SUCCESS").write_text("")
    (folder / ".a.parquet.crc").write_text("x")
    (folder / "README.md").write_text("not data")
    specs, shards = read_all(config(folder, samples_per_shard=5))
    assert [[piece.file.uri.rsplit("/", 1)[-1] for piece in s.slices] for s in specs] == [
        ["a.parquet", "b.csv"],
        ["b.csv", "c.jsonl.gz"],
        ["c.jsonl.gz"],
    ]
    assert [(p.start, p.num_rows) for p in specs[1].slices] == [(1, 4), (0, 1)]
    table = pa.concat_tables(shards, promote_options="permissive")
    assert table["url"].to_pylist() == [r["url"] for r in make_rows(12)]
    assert table["row_index"].to_pylist() == list(range(12))
    assert [t.num_rows for t in shards] == [5, 5, 2]
    # Parquet and JSONL hold numbers where the CSV holds text: every shard carries the column as text.
    assert all(s.text_columns == ("similarity",) for s in specs)
    assert all(t.schema.field("similarity").type == pa.string() for t in shards)
    assert table["similarity"].to_pylist()[:2] == ["0", "0.01"]


def test_glob_matches_within_and_across_folders(tmp_path):
    write(tmp_path / "x" / "part-0.csv", make_rows(2), "csv")
    write(tmp_path / "x" / "part-1.csv", make_rows(2, start=2), "csv")
    write(tmp_path / "x" / "part-2.tsv", make_rows(2, start=4), "tsv")
    write(tmp_path / "x" / "deeper" / "part-3.csv", make_rows(2, start=6), "csv")
    names = lambda files: [uri.rsplit("/", 1)[-1] for uri, _, _ in files]  # noqa: E731
    assert names(list_input_files(str(tmp_path / "x" / "part-*.csv"))) == ["part-0.csv", "part-1.csv"]
    assert names(list_input_files(str(tmp_path / "x" / "part-[02].*"))) == ["part-0.csv", "part-2.tsv"]
    assert names(list_input_files(str(tmp_path / "x" / "**" / "*.csv"))) == [
        "part-3.csv",
        "part-0.csv",
        "part-1.csv",
    ]
    _, shards = read_all(config(tmp_path / "x" / "*.csv", samples_per_shard=3))
    assert pa.concat_tables(shards)["url"].to_pylist() == [r["url"] for r in make_rows(4)]
    # An explicit format keeps only that format's files from a folder.
    assert names(list_input_files(str(tmp_path / "x"), "tsv")) == ["part-2.tsv"]


def test_shard_split_is_deterministic_and_keys_follow_img2dataset(tmp_path):
    folder = tmp_path / "in"
    for i, n in enumerate([3, 9, 1, 6]):
        write(folder / f"{i:02d}.parquet", make_rows(n, start=sum([3, 9, 1, 6][:i])), "parquet")
    cfg = config(folder, samples_per_shard=4)
    first, second = plan_shards(cfg), plan_shards(cfg)
    assert first == second
    assert [s.num_rows for s in first] == [4, 4, 4, 4, 3]  # 19 rows: the last shard is partial
    for spec in first:
        table = read_shard(cfg, spec)
        assert table.equals(read_shard(cfg, spec))
        expected = list(range(spec.shard_id * 4, spec.shard_id * 4 + spec.num_rows))
        assert table["row_index"].to_pylist() == expected
        assert table["url"].to_pylist() == [f"http://example.com/{i}.jpg" for i in expected]
        assert set(table["shard_id"].to_pylist()) == {spec.shard_id}
    # img2dataset's scheme: 5-digit shard, then the position padded to the digits of samples_per_shard - 1.
    assert shard_key(420017, 10_000) == "000420017"
    assert shard_key(0, 1) == "000000" and shard_key(7, 1) == "000070"
    assert shard_key(1000, 1001) == "000001000" and shard_key(1001, 1001) == "000010000"
    assert shard_key(123_456_789, 10_000) == "123456789"


def test_carried_columns_keep_types_and_colliding_names_get_source_prefix(tmp_path):
    table = pa.table(
        {
            "URL": ["http://a/1.jpg", "http://a/2.jpg"],
            "TEXT": ["one", "two"],
            "url": ["dup-1", "dup-2"],
            "original_width": pa.array([640, 800], pa.int32()),
            "status": ["x", "y"],
            "sha256": ["s1", "s2"],
            "NSFW": ["UNLIKELY", "NSFW"],
            "similarity": [0.31, 0.42],
        }
    )
    path = tmp_path / "laion.parquet"
    pq.write_table(table, path)
    _, [shard] = read_all(config(path, url_col="URL", caption_col="TEXT"))
    assert shard.column_names == [
        "row_index",
        "shard_id",
        "key",
        "url",
        "caption",
        "source_url",
        "source_original_width",
        "source_status",
        "source_sha256",
        "NSFW",
        "similarity",
    ]
    assert shard["url"].to_pylist() == ["http://a/1.jpg", "http://a/2.jpg"]
    assert shard["caption"].to_pylist() == ["one", "two"]
    assert shard["source_url"].to_pylist() == ["dup-1", "dup-2"]
    assert shard.schema.field("source_original_width").type == pa.int32()
    assert shard["similarity"].to_pylist() == [0.31, 0.42]


def test_without_captions_the_caption_column_is_null_and_input_captions_are_carried(tmp_path):
    path = write(tmp_path / "urls.jsonl", make_rows(2), "jsonl")
    _, [shard] = read_all(config(path, caption_col=None))
    assert shard["caption"].to_pylist() == [None, None]
    assert shard["source_caption"].to_pylist() == [r["caption"] for r in make_rows(2)]


def test_bad_urls_and_odd_captions_are_data_not_errors(tmp_path):
    lines = [
        {"url": "http://ok/1.jpg", "caption": "fine"},
        {"url": None, "caption": None},
        {"url": "", "caption": 42},
        {"url": 12345, "caption": ["a", "b"]},
        {"caption": "no url key"},
    ]
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")  # a trailing blank line is not a row
    _, [shard] = read_all(config(path))
    assert shard["url"].to_pylist() == ["http://ok/1.jpg", None, "", "12345", None]
    assert shard["caption"].to_pylist() == ["fine", None, "42", '["a", "b"]', "no url key"]
    assert shard.schema.field("url").type == pa.string() and shard.schema.field("caption").type == pa.string()


def test_text_quoting_csv_newlines_and_tsv_stray_quotes(tmp_path):
    csv_path = tmp_path / "q.csv"
    csv_path.write_text('url,caption\nhttp://a/1,"two\nlines, and a comma"\nhttp://a/2,plain\n')
    _, [shard] = read_all(config(csv_path))
    assert shard["caption"].to_pylist() == ["two\nlines, and a comma", "plain"]
    tsv_path = tmp_path / "q.tsv"
    tsv_path.write_text('url\tcaption\nhttp://a/1\t"starts with a quote\nhttp://a/2\tthe "movie" poster\n')
    _, [shard] = read_all(config(tsv_path))
    assert shard["url"].to_pylist() == ["http://a/1", "http://a/2"]
    assert shard["caption"].to_pylist() == ['"starts with a quote', 'the "movie" poster']


def mixed_jsonl_rows(n, start=0):
    """Rows whose keys and value types change along the file: a slice's types depend on its own rows."""
    rows = []
    for i in range(start, start + n):
        row = {"url": f"http://example.com/{i}.jpg", "caption": f"thing {i}", "n": i if i % 7 else str(i)}
        if i >= start + 5:
            row["late_key"] = i * 0.5
        if i % 4 == 0:
            row["tags"] = ["a", i]
        rows.append(row)
    return rows


@pytest.mark.parametrize("samples_per_shard", [3, 4, 10])
def test_parquet_copy_of_text_inputs_gives_the_same_shards_as_streaming_the_text(tmp_path, samples_per_shard):
    folder = tmp_path / "in"
    write(folder / "a.csv", make_rows(7), "csv")
    write(folder / "b.tsv.gz", make_rows(5, start=7), "tsv", gz=True)
    write(folder / "c.jsonl", mixed_jsonl_rows(9, start=12), "jsonl")
    write(folder / "d.jsonl.gz", mixed_jsonl_rows(6, start=21), "jsonl", gz=True)
    write(folder / "e.csv.gz", make_rows(4, start=27), "csv", gz=True)
    write(folder / "f.tsv", make_rows(3, start=31), "tsv")
    write(folder / "g.parquet", make_rows(5, start=34), "parquet")
    cfg = config(folder, samples_per_shard=samples_per_shard)
    streamed = plan_shards(cfg, cache_text=False)
    cached = plan_shards(cfg)
    assert all(piece.file.cached is None for spec in streamed for piece in spec.slices)
    cache_dir = os.path.join(cfg.output, INPUT_CACHE_DIR)
    for spec in cached:
        for piece in spec.slices:
            if piece.file.format == "parquet":
                assert piece.file.cached is None
            else:
                assert piece.file.cached.startswith(cache_dir) and os.path.exists(piece.file.cached)
    # Same split, same files, same row counts, same columns and types: only where the rows are read differs.
    strip = lambda specs: [  # noqa: E731
        (
            s.shard_id,
            s.first_row_index,
            s.num_rows,
            s.text_columns,
            [(p.file.uri, p.start, p.num_rows) for p in s.slices],
        )
        for s in specs
    ]
    assert strip(cached) == strip(streamed)
    assert [p.file.columns for s in cached for p in s.slices] == [
        p.file.columns for s in streamed for p in s.slices
    ]
    assert len(cached) == -(-39 // samples_per_shard) and any(len(s.slices) > 1 for s in cached)
    for cached_spec, streamed_spec in zip(cached, streamed, strict=True):
        from_copy, from_text = read_shard(cfg, cached_spec), read_shard(cfg, streamed_spec)
        assert from_copy.schema == from_text.schema
        assert from_copy.equals(from_text)
    # Shards may disagree on a JSONL column's type (as when streaming); the rows themselves are all there.
    everything = pa.concat_tables([read_shard(cfg, s).select(["row_index", "url"]) for s in cached])
    assert everything["row_index"].to_pylist() == list(range(39))
    assert everything["url"].to_pylist() == [f"http://example.com/{i}.jpg" for i in range(39)]
    # The copy holds row groups of samples_per_shard rows, so a slice reads at most the groups it overlaps.
    copy = pq.ParquetFile(cache_dir + "/00000.parquet").metadata
    assert [copy.row_group(i).num_rows for i in range(copy.num_row_groups)] == [
        min(samples_per_shard, 7 - i) for i in range(0, 7, samples_per_shard)
    ]


def test_parquet_copy_is_reused_by_the_next_plan_and_redone_when_the_source_changes(tmp_path):
    path = write(tmp_path / "urls.tsv", make_rows(6), "tsv")
    cfg = config(path, samples_per_shard=4)
    first = plan_shards(cfg)
    copy = os.path.join(cfg.output, INPUT_CACHE_DIR, "00000.parquet")
    marker = os.path.join(cfg.output, INPUT_CACHE_DIR, "00000.json")
    assert (
        json.loads(Path(marker).read_text())["source"]["uri"] == str(path)
        and json.loads(Path(marker).read_text())["num_rows"] == 6
    )
    stamp = os.stat(copy).st_mtime_ns
    # Make the source unreadable as TSV without changing its size or time: a reused copy never reads it.
    data, times = path.read_bytes(), os.stat(path)
    path.write_bytes(b"\xff" * len(data))
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    second = plan_shards(cfg)
    assert second == first and os.stat(copy).st_mtime_ns == stamp
    assert pa.concat_tables([read_shard(cfg, s) for s in second])["url"].to_pylist() == [
        r["url"] for r in make_rows(6)
    ]
    # A different source under the same input index (more rows): converted again.
    write(tmp_path / "urls.tsv", make_rows(9), "tsv")
    third = plan_shards(cfg)
    assert [s.num_rows for s in third] == [4, 4, 1]
    assert json.loads(Path(marker).read_text())["num_rows"] == 9
    assert pa.concat_tables([read_shard(cfg, s) for s in third])["url"].to_pylist() == [
        r["url"] for r in make_rows(9)
    ]
    # An unfinished conversion (copy written, marker not yet) is done again rather than trusted.
    os.remove(marker)
    os.remove(copy)
    plan_shards(cfg)
    assert os.path.exists(copy) and os.path.exists(marker)


def test_job_level_input_errors_are_one_clear_sentence(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        plan_shards(config(tmp_path / "missing.parquet"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(InputError, match="no input files"):
        plan_shards(config(tmp_path / "empty_dir"))
    with pytest.raises(InputError, match="no input files"):
        plan_shards(config(tmp_path / "*.parquet"))
    header_only = tmp_path / "header.csv"
    header_only.write_text("url,caption\n")
    with pytest.raises(InputError, match="has no rows"):
        plan_shards(config(header_only))
    path = write(tmp_path / "urls.csv", make_rows(2), "csv")
    with pytest.raises(
        InputError, match=r"no column 'URL' \(url_col\); its columns are \[url, caption, similarity\]"
    ):
        plan_shards(config(path, url_col="URL"))
    with pytest.raises(InputError, match="caption_col to null"):
        plan_shards(config(path, caption_col="TEXT"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"url": "http://a"}\n{not json\n')
    with pytest.raises(InputError, match="row 1 of .*broken.jsonl is not valid JSON"):
        plan_shards(config(broken))


def test_s3_folder_and_glob_through_the_local_stack(local_stack_env, s3_prefix):
    storage.write_bytes(storage.join(s3_prefix, "lists", "a.parquet"), encode(make_rows(4), "parquet"))
    storage.write_bytes(
        storage.join(s3_prefix, "lists", "b.tsv.gz"), gzip.compress(encode(make_rows(3, start=4), "tsv"))
    )
    storage.write_bytes(storage.join(s3_prefix, "lists", "c.jsonl"), encode(make_rows(2, start=7), "jsonl"))
    storage.write_bytes(storage.join(s3_prefix, "lists", "_SUCCESS"), b"")
    cfg = config(storage.join(s3_prefix, "lists"), samples_per_shard=3)
    specs, shards = read_all(cfg)
    assert [s.num_rows for s in specs] == [3, 3, 3]
    table = pa.concat_tables(shards, promote_options="permissive")
    assert table["url"].to_pylist() == [r["url"] for r in make_rows(9)]
    assert table["key"].to_pylist()[-1] == "000022"
    glob_cfg = config(storage.join(s3_prefix, "lists", "*.parquet"), samples_per_shard=3)
    _, shards = read_all(glob_cfg)
    assert pa.concat_tables(shards)["caption"].to_pylist() == [r["caption"] for r in make_rows(4)]
    with pytest.raises(InputError, match="does not exist"):
        plan_shards(config(storage.join(s3_prefix, "nothing-here.parquet")))
