"""The ingest reader: every input format, folders and globs, carried columns, the deterministic shard split and
its keys, the Parquet copy of text inputs, job-level input errors, and S3 input through the real local stack."""

import csv
import gzip
import io
import json
import os
import random
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.input_formats import _QuoteCheckedStream
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


# --- hostile and broken inputs: one-sentence errors, no rows lost ---------------------------------------------


def plan_error(cfg, cache_text):
    """The InputError that planning raises, checked to be one sentence that names the input file."""
    with pytest.raises(InputError) as caught:
        plan_shards(cfg, cache_text=cache_text)
    message = str(caught.value)
    assert "\n" not in message and ". " not in message, message
    assert os.path.basename(cfg.input) in message, message
    return message


def parquet_bytes(table):
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@pytest.mark.parametrize(
    "name, data, repeated",
    [
        ("dup.csv", b"url,caption,url\nhttp://a/1,one,http://b/1\n", "'url'"),
        ("dup2.csv", b"url,x,caption,x,caption\nhttp://a/1,1,one,2,uno\n", "'x', 'caption'"),
        ("dup.csv.gz", gzip.compress(b"url,caption,caption\nhttp://a/1,one,two\n"), "'caption'"),
        ("dup.tsv", b"url\tcaption\tsimilarity\tsimilarity\nhttp://a/1\tone\t0.1\t0.2\n", "'similarity'"),
        (
            "dup.parquet",
            parquet_bytes(pa.Table.from_arrays([pa.array(["http://a/1"]), pa.array(["x"])], ["url", "url"])),
            "'url'",
        ),
        (
            "dup_carried.parquet",
            parquet_bytes(
                pa.Table.from_arrays(
                    [pa.array(["http://a/1"]), pa.array([1]), pa.array([2])], ["url", "n", "n"]
                )
            ),
            "'n'",
        ),
    ],
)
@pytest.mark.parametrize("cache_text", [True, False])
def test_duplicate_column_names_are_one_sentence_naming_file_and_columns(
    tmp_path, name, data, repeated, cache_text
):
    path = tmp_path / name
    path.write_bytes(data)
    message = plan_error(config(path, caption_col=None), cache_text)
    assert f"has more than one column named {repeated}" in message


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_names_that_differ_only_in_case_are_distinct_columns(tmp_path, fmt):
    rows = [
        {"url": f"http://a/{i}", "URL": f"mirror {i}", "caption": f"c{i}", "Caption": f"C{i}"}
        for i in range(3)
    ]
    _, [shard] = read_all(config(write(tmp_path / f"case.{fmt}", rows, fmt)))
    assert shard.column_names == ["row_index", "shard_id", "key", "url", "caption", "URL", "Caption"]
    assert shard["url"].to_pylist() == [r["url"] for r in rows]
    assert shard["URL"].to_pylist() == [r["URL"] for r in rows]
    assert shard["Caption"].to_pylist() == [r["Caption"] for r in rows]


@pytest.mark.parametrize(
    "line, repeated",
    [
        ('{"url": "http://a/vetted.jpg", "caption": "x", "url": "http://169.254.169.254/"}', "'url'"),
        ('{"url": "http://a/3", "tag": 1, "caption": "x", "tag": 2}', "'tag'"),
    ],
)
@pytest.mark.parametrize("cache_text", [True, False])
def test_a_jsonl_key_given_twice_in_one_row_is_refused(tmp_path, line, repeated, cache_text):
    path = tmp_path / "twice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(3)) + line + "\n")
    message = plan_error(config(path), cache_text)
    assert f"row 3 of {path} has the key {repeated} more than once" in message
    # A nested object's repeated key is carried as parsed: it names no column.
    path.write_text(json.dumps(make_rows(1)[0]) + "\n" + '{"url": "http://a/1", "meta": {"k": 1, "k": 2}}\n')
    _, [shard] = read_all(config(path))
    assert shard["meta"].to_pylist() == [None, {"k": 2}]


def rows_with_late_keys(n, url_from, late_from):
    """JSONL rows that gain the url key at row url_from and a carried key at row late_from."""
    rows = []
    for i in range(n):
        row = {"caption": f"c{i}"}
        if i >= url_from:
            row["url"] = f"http://example.com/{i}.jpg"
        if i >= late_from:
            row["late"] = i / 2
        rows.append(row)
    return rows


# 1000 was the old sample of leading rows; 8192 rows are parsed per batch.
@pytest.mark.parametrize("url_from, late_from", [(1001, 1500), (9000, 9100), (0, 8193)])
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("cache_text", [True, False])
def test_jsonl_columns_come_from_every_row_not_a_leading_sample(
    tmp_path, url_from, late_from, gz, cache_text
):
    n = 9200
    rows = rows_with_late_keys(n, url_from, late_from)
    path = write(tmp_path / ("late.jsonl.gz" if gz else "late.jsonl"), rows, "jsonl", gz=gz)
    cfg = config(path, samples_per_shard=1000)
    specs = plan_shards(cfg, cache_text=cache_text)
    assert sum(s.num_rows for s in specs) == n
    assert specs[0].slices[0].file.columns == ("caption", "url", "late")
    shards = [read_shard(cfg, spec) for spec in specs]
    # Every shard carries the late column, null where a row lacks it, so no shard silently drops it.
    assert all(t.column_names == ["row_index", "shard_id", "key", "url", "caption", "late"] for t in shards)
    urls = [u for t in shards for u in t["url"].to_pylist()]
    late = [v for t in shards for v in t["late"].to_pylist()]
    # Rows without the url key get a null url, which the downloader fails as "empty URL": a per-row failure.
    assert urls == [r.get("url") for r in rows]
    assert late == [r.get("late") for r in rows]


@pytest.mark.parametrize("cache_text", [True, False])
def test_a_jsonl_key_that_never_appears_is_one_sentence(tmp_path, cache_text):
    path = write(tmp_path / "nourl.jsonl", rows_with_late_keys(9000, 10**9, 8500), "jsonl")
    message = plan_error(config(path), cache_text)
    assert "has no column 'url' (url_col); its columns are [caption, late]" in message


def test_a_late_jsonl_key_counts_when_files_disagree_on_its_type(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(
        pa.table({"url": ["http://a/0"], "caption": ["c"], "late": ["text"]}), folder / "a.parquet"
    )
    write(folder / "b.jsonl", rows_with_late_keys(9000, 0, 8500), "jsonl")
    cfg = config(folder, samples_per_shard=3000)
    specs = plan_shards(cfg)
    assert specs[0].slices[1].file.column_types[-1] == "double"
    # Text in one file, numbers in the other: every shard carries the column as text, as for any column.
    assert all(s.text_columns == ("late",) for s in specs)
    assert all(read_shard(cfg, s).schema.field("late").type == pa.string() for s in specs)


ROWS_CSV = "url,caption\nhttp://a/1,one\nhttp://a/2,two\nhttp://a/3,three\n"


@pytest.mark.parametrize(
    "name, text, line",
    [
        # A caption's quote opens and nothing closes it: rows 2 and 3 would become part of row 1's caption.
        ("caption.csv", 'url,caption\nhttp://a/1,"one\nhttp://a/2,two\nhttp://a/3,three\n', 2),
        # The same in the url column.
        ("url.csv", 'url,caption\n"http://a/1,one\nhttp://a/2,two\nhttp://a/3,three\n', 2),
        # On the last line, with and without a final newline.
        ("last.csv", ROWS_CSV + 'http://a/4,"four\n', 5),
        ("last_no_newline.csv", ROWS_CSV + 'http://a/4,"four', 5),
        # In the header.
        ("header.csv", 'url,"caption\nhttp://a/1,one\nhttp://a/2,two\n', 1),
        # Closed by some later value's opening quote: the closing quote is followed by text, not a comma.
        ("partner.csv", 'url,caption\nhttp://a/1,"one\nhttp://a/2,two\nhttp://a/3,"three"\n', 2),
        ("partner_url.csv", 'url,caption\n"http://a/1,one\nhttp://a/2,two\n"http://a/3",three\n', 2),
        # Windows line ends, a byte order mark, gzip.
        ("crlf.csv", 'url,caption\r\nhttp://a/1,one\r\nhttp://a/2,"two\r\nhttp://a/3,three\r\n', 3),
        ("bom.csv", '\ufeff"url,caption\nhttp://a/1,one\n', 1),
        ("quoted.csv.gz", 'url,caption\nhttp://a/1,"one\nhttp://a/2,two\n', 2),
        # Far into the file, past pyarrow's first block (4 MiB).
        (
            "deep.csv",
            ROWS_CSV + "".join(f"http://a/{i},caption {i}\n" for i in range(150_000)) + '"x,y\n',
            150_005,
        ),
    ],
)
@pytest.mark.parametrize("cache_text", [True, False])
def test_an_unterminated_csv_quote_is_one_sentence_naming_its_line(tmp_path, name, text, line, cache_text):
    path = tmp_path / name
    data = text.encode()
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    message = plan_error(config(path), cache_text)
    assert f"{path} line {line}: the quote" in message or f"{path} line {line}: the quoted value" in message
    assert "close, double or remove that quote" in message


@pytest.mark.parametrize("cache_text", [True, False])
def test_quotes_that_pyarrow_reads_as_text_lose_no_rows(tmp_path, cache_text):
    path = tmp_path / "quotes.csv"
    path.write_text(
        "url,caption\n"
        'http://a/1,ab"c\n'  # a quote inside a field is text
        'http://a/2,"ab"c\n'  # after a one-line quoted value the field goes on as text
        'http://a/3,"a ""quoted"" word, and a comma"\n'
        'http://a/4,"two\nlines"\n'
        '"http://a/5",""\n'
        'http://a/6,say "hi" twice "hi"\n'
    )
    _, [shard] = read_all(config(path))
    assert shard["url"].to_pylist() == [f"http://a/{i}" for i in range(1, 7)]
    assert shard["caption"].to_pylist() == [
        'ab"c',
        "abc",
        'a "quoted" word, and a comma',
        "two\nlines",
        "",
        'say "hi" twice "hi"',
    ]
    # TSV has no quoting: an opening quote is text and swallows nothing.
    tsv = tmp_path / "quotes.tsv"
    tsv.write_text('url\tcaption\nhttp://a/1\t"one\nhttp://a/2\ttwo\nhttp://a/3\t"three"\n')
    specs = plan_shards(config(tsv), cache_text=cache_text)
    assert sum(s.num_rows for s in specs) == 3
    assert read_shard(config(tsv), specs[0])["caption"].to_pylist() == ['"one', "two", '"three"']


@pytest.mark.parametrize("seed", range(4))
def test_csv_written_by_a_csv_writer_plans_exactly_its_records(tmp_path, seed):
    rng = random.Random(seed)
    pieces = ["a", "b c", ",", '"', '""', "\n", "\r\n", " ", "\u00e9", "http://x"]
    rows = [
        {"url": f"http://a/{i}", "caption": "".join(rng.choice(pieces) for _ in range(rng.randrange(8)))}
        for i in range(300)
    ]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["url", "caption"], lineterminator=rng.choice(["\n", "\r\n"]))
    writer.writeheader()
    writer.writerows(rows)
    path = tmp_path / "written.csv"
    path.write_bytes(text.getvalue().encode())
    specs, shards = read_all(config(path, samples_per_shard=64))
    assert sum(s.num_rows for s in specs) == len(rows)
    table = pa.concat_tables(shards)
    assert table["url"].to_pylist() == [r["url"] for r in rows]
    # pyarrow keeps a quoted value's characters as written; an empty field reads as "".
    assert table["caption"].to_pylist() == [r["caption"] for r in rows]


@pytest.mark.parametrize(
    "text",
    [
        'url,caption\nhttp://a/1,"one\nhttp://a/2,two\n',
        'url,caption\nhttp://a/1,"one\nhttp://a/2,"two"\n',
        'url,caption\r\nhttp://a/1,"o""n""e"\r\nhttp://a/2,"t\r\nwo"\r\n"x"y,z\r\n',
        '\ufeff"url",caption\nhttp://a/1,ab"c\n"http://a/2","x\n""\ny"\n',
        'url,caption\nhttp://a/1,""""\nhttp://a/2,"\n',
        'a,b\n"x""\n"\n',
    ],
)
def test_quote_check_gives_the_same_verdict_however_the_bytes_are_split(text):
    data = text.encode()

    def verdict(read_size):
        stream = _QuoteCheckedStream(pa.BufferReader(data), "f.csv")
        try:
            stream.drain(read_size)
        except InputError as e:
            return str(e)
        return None

    whole = verdict(len(data) + 1)
    assert [verdict(size) for size in range(1, 12)] == [whole] * 11


def zip_bytes():
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w") as archive:
        archive.writestr("urls.csv", encode(make_rows(3), "csv"))
    return sink.getvalue()


CSV_BYTES = encode(make_rows(3), "csv")
PARQUET_BYTES = encode(make_rows(3), "parquet")
# Enough rows to reach past the 64 KiB that are looked at first, so that the parser is what finds the bad byte.
ASCII_ROWS = 5000


@pytest.mark.parametrize(
    "name, data, fragment",
    [
        ("urls.csv", zip_bytes(), "is a zip archive, not CSV text; unzip it"),
        ("urls.jsonl", zip_bytes(), "is a zip archive, not JSONL text"),
        ("urls.parquet", zip_bytes(), "is a zip archive, not a Parquet file"),
        ("urls.parquet", CSV_BYTES, "is not a Parquet file (it does not start with the bytes PAR1)"),
        ("urls.parquet", b"", "is empty"),
        ("urls.parquet", PARQUET_BYTES[:-20], "as Parquet: "),
        ("urls.parquet.gz", gzip.compress(PARQUET_BYTES), "Parquet inputs cannot be compressed as a whole"),
        ("urls.csv.gz", CSV_BYTES, "is not gzip-compressed data, although its name ends in .gz"),
        ("urls.jsonl.gz", encode(make_rows(3), "jsonl"), "is not gzip-compressed data"),
        ("urls.csv.gz", gzip.compress(CSV_BYTES * 50)[:-30], "as CSV (gzip): "),
        ("urls.csv", gzip.compress(CSV_BYTES), "is gzip-compressed data, not CSV text"),
        ("urls.jsonl", gzip.compress(CSV_BYTES), "is gzip-compressed data, not JSONL text"),
        ("urls.tsv", PARQUET_BYTES, "is a Parquet file, not TSV text"),
        ("urls.csv", "url,caption\nhttp://a/1,caf\u00e9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
        (
            "urls.csv",
            "".join(
                ["url,caption\n"]
                + [f"http://a/{i},c {i}\n" for i in range(ASCII_ROWS)]
                + ["http://a/x,caf\u00e9\n"]
            ).encode("latin-1"),
            "is not UTF-8 text (In CSV column #1",
        ),
        (
            "urls.tsv",
            "".join(
                ["url\tcaption\n"]
                + [f"http://a/{i}\tc {i}\n" for i in range(ASCII_ROWS)]
                + ["http://a/x\tcaf\u00e9\n"]
            ).encode("latin-1"),
            "is not UTF-8 text (In CSV column #1",
        ),
        (
            "urls.jsonl",
            b'{"url": "http://a/1", "caption": "caf\xe9"}\n',
            "is not UTF-8 text (byte 0xe9 at offset 37)",
        ),
        (
            "urls.jsonl",
            encode(make_rows(ASCII_ROWS), "jsonl") + b'{"url": "http://a/x", "caption": "caf\xe9"}\n',
            f"row {ASCII_ROWS} of",
        ),
        (
            "urls.csv",
            "url,caption\nhttp://a/1,x\n".encode("utf-16"),
            "is UTF-16 or UTF-32 text, not CSV text",
        ),
        ("urls.csv", b"url,caption\nhttp://a/1,x\x00y\n", "holds NUL bytes"),
    ],
)
@pytest.mark.parametrize("cache_text", [True, False])
def test_content_that_is_not_its_format_is_one_sentence(tmp_path, name, data, fragment, cache_text):
    path = tmp_path / name
    path.write_bytes(data)
    message = plan_error(config(path), cache_text)
    assert fragment in message
    if fragment.startswith("row "):
        assert "is not UTF-8 text (byte 0xe9 at offset 37)" in message


@pytest.mark.parametrize("first_column", ["PK", "PAR1", "BZh9", "7z"])
def test_text_that_merely_starts_like_a_binary_format_is_read(tmp_path, first_column):
    rows = [{first_column: "x", "url": f"http://a/{i}", "caption": f"c{i}"} for i in range(3)]
    for fmt in ("csv", "tsv"):
        _, [shard] = read_all(config(write(tmp_path / f"urls.{fmt}", rows, fmt)))
        assert (
            shard["url"].to_pylist() == [r["url"] for r in rows]
            and shard[first_column].to_pylist() == ["x"] * 3
        )


def test_explicit_format_that_the_bytes_contradict_is_one_sentence(tmp_path):
    path = tmp_path / "export_2024"
    path.write_bytes(CSV_BYTES)
    assert "not a Parquet file" in plan_error(config(path, input_format="parquet"), True)
    path.write_bytes(zip_bytes())
    assert "is a zip archive, not CSV text" in plan_error(config(path, input_format="csv"), True)


def test_parquet_copy_made_by_an_older_reader_or_with_a_broken_marker_is_made_again(tmp_path):
    path = write(tmp_path / "late.jsonl", rows_with_late_keys(1200, 0, 1100), "jsonl")
    cfg = config(path)
    plan_shards(cfg)
    marker = Path(cfg.output) / INPUT_CACHE_DIR / "00000.json"
    old = json.loads(marker.read_text())
    # What the reader before the copy was versioned wrote: columns from the first 1000 rows only.
    del old["source"]["reader"]
    old["columns"], old["column_types"] = ["caption", "url"], ["string", "string"]
    marker.write_text(json.dumps(old))
    assert plan_shards(cfg)[0].slices[0].file.columns == ("caption", "url", "late")
    marker.write_text("{not json")
    assert plan_shards(cfg)[0].slices[0].file.columns == ("caption", "url", "late")


# ---------------------------------------------------------------------------------------------------------
# Column- and row-group-aware reading


@pytest.mark.parametrize("samples_per_shard", [1, 7, 10, 1000])
def test_shard_keys_computed_by_arrow_are_shard_key(samples_per_shard):
    from pipelines.ingest.reader import shard_keys

    rows = list(range(0, 3000, 7)) + [
        99_999 * samples_per_shard,
        123_456 * samples_per_shard + 5 % samples_per_shard,
    ]
    assert shard_keys(pa.array(rows, pa.int64()), samples_per_shard).to_pylist() == [
        shard_key(i, samples_per_shard) for i in rows
    ]


@pytest.mark.parametrize("cache_text", [True, False])
def test_url_reads_give_the_rows_of_full_reads_in_every_format(tmp_path, cache_text):
    from pipelines.ingest.reader import read_shard_urls

    folder = tmp_path / "in"
    write(folder / "a.csv", make_rows(7), "csv")
    write(folder / "b.tsv.gz", make_rows(5, start=7), "tsv", gz=True)
    write(folder / "c.jsonl", mixed_jsonl_rows(9, start=12), "jsonl")
    write(folder / "d.parquet", make_rows(5, start=21), "parquet")
    cfg = config(folder, samples_per_shard=4)
    specs = plan_shards(cfg, cache_text=cache_text)
    for spec in specs:
        urls = read_shard_urls(cfg, spec)
        assert urls.column_names == ["row_index", "key", "url"]
        assert urls.equals(read_shard(cfg, spec).select(["row_index", "key", "url"]))


def test_url_reads_read_only_the_url_column_of_parquet(tmp_path):
    from pipelines.ingest import input_formats
    from pipelines.ingest.reader import read_shard_urls

    path = write(tmp_path / "urls.parquet", make_rows(10), "parquet")
    cfg = config(path, samples_per_shard=4)
    (spec,) = plan_shards(cfg)[1:2]
    read = []
    original = input_formats._read_parquet_rows
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(input_formats, "_read_parquet_rows", lambda *a: read.append(a) or original(*a))
        read_shard_urls(cfg, spec)
    assert [columns for *_, columns in read] == [("url",)]


def one_row_group(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=len(rows))
    return path


@pytest.mark.parametrize("samples_per_shard", [3, 10])
def test_parquet_of_one_huge_row_group_is_regrouped_once_and_gives_the_same_shards(
    tmp_path, samples_per_shard
):
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "a.parquet", make_rows(5), "parquet")  # row groups of 2 rows: read in place
    one_row_group(folder / "b.parquet", make_rows(97, start=5))
    cfg = config(folder, samples_per_shard=samples_per_shard)
    in_place, regrouped = plan_shards(cfg, cache_text=False), plan_shards(cfg)
    files = {p.file.uri.rsplit("/", 1)[-1]: p.file for s in regrouped for p in s.slices}
    assert files["a.parquet"].cached is None and files["b.parquet"].largest_row_group == samples_per_shard
    assert {p.file.largest_row_group for s in in_place for p in s.slices} == {2, 97}
    copy = files["b.parquet"].cached
    assert copy == os.path.join(cfg.output, INPUT_CACHE_DIR, "00001.parquet")
    groups = pq.ParquetFile(copy).metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [
        min(samples_per_shard, 97 - i) for i in range(0, 97, samples_per_shard)
    ]
    assert [(s.shard_id, s.first_row_index, s.num_rows) for s in regrouped] == [
        (s.shard_id, s.first_row_index, s.num_rows) for s in in_place
    ]
    for a, b in zip(regrouped, in_place, strict=True):
        assert read_shard(cfg, a).equals(read_shard(cfg, b))
    # The next plan reuses the copy; a changed source is copied again.
    stamp = os.stat(copy).st_mtime_ns
    assert plan_shards(cfg) == regrouped and os.stat(copy).st_mtime_ns == stamp
    one_row_group(folder / "b.parquet", make_rows(50, start=5))
    replanned = plan_shards(cfg)
    assert sum(s.num_rows for s in replanned) == 55
    urls = pa.concat_tables([read_shard(cfg, s) for s in replanned])["url"].to_pylist()
    assert urls == [r["url"] for r in make_rows(55)]


def test_parquet_row_groups_up_to_the_regroup_factor_are_read_in_place(tmp_path):
    from pipelines.ingest.reader import REGROUP_FACTOR

    path = one_row_group(tmp_path / "urls.parquet", make_rows(REGROUP_FACTOR * 5))
    assert all(
        p.file.cached is None for s in plan_shards(config(path, samples_per_shard=5)) for p in s.slices
    )
    assert not os.path.exists(os.path.join(OUTPUT["uri"], INPUT_CACHE_DIR))
