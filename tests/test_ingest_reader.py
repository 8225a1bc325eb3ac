"""The ingest reader: every input format, folders and globs, carried columns, the deterministic shard split and
its keys, job-level input errors, and S3 input through the real local stack."""

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.reader import (
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


def config(input_uri, **overrides):
    return IngestConfig(input=str(input_uri), output="/nonexistent/out", **overrides)


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
