"""Tests for pipelines/ingest/dedup.py: first occurrence by row_index wins whatever the row order or batching,
URL and content deduplication, null keys never matched, and the hash-partitioned Ray Data form equal to the
pure form on thousands of rows with many duplicates."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipelines.ingest.dedup import (
    DUPLICATES_SCHEMA,
    apply_duplicates,
    collect_duplicates,
    find_duplicates,
    find_duplicates_on_ray,
    first_occurrence,
    hash_partition,
    mark_content_duplicates,
    mark_url_duplicates,
)
from tests.paths import REPO


def key_of(row_index: int) -> str:
    return f"{row_index // 1000:05d}{row_index % 1000:03d}"


def test_first_occurrence_is_the_smallest_row_index_not_the_first_position():
    keys = ["a", "b", "a", "a", "b", "c"]
    rows = [7, 3, 2, 9, 1, 5]
    assert first_occurrence(keys, rows).tolist() == [2, 1, 2, 2, 1, 5]


def test_null_and_empty_keys_are_never_duplicates_of_each_other():
    keys = [None, None, "", "", float("nan"), "x", "x"]
    rows = [0, 1, 2, 3, 4, 5, 6]
    assert first_occurrence(keys, rows).tolist() == [0, 1, 2, 3, 4, 5, 5]
    assert first_occurrence(pa.array([None, None, "y", "y"]), [4, 3, 2, 1]).tolist() == [4, 3, 1, 1]


def test_first_occurrence_refuses_repeated_row_indices():
    with pytest.raises(ValueError, match="unique"):
        first_occurrence(["a", "b"], [1, 1])
    with pytest.raises(ValueError, match="2 keys but 3"):
        first_occurrence(["a", "b"], [1, 2, 3])


def test_first_occurrence_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    keys = np.array([f"k{i}" for i in rng.integers(0, 50, 500)], dtype=object)
    keys[rng.random(500) < 0.1] = None
    rows = np.arange(500)
    reference = dict(zip(rows.tolist(), first_occurrence(keys, rows).tolist()))
    for _ in range(5):
        order = rng.permutation(500)
        shuffled = first_occurrence(keys[order], rows[order])
        assert dict(zip(rows[order].tolist(), shuffled.tolist())) == reference
    # Sanity: there are duplicates, and each points at the first row with its key.
    duplicates = {r: k for r, k in reference.items() if r != k}
    assert len(duplicates) > 300
    for row, kept in duplicates.items():
        assert keys[kept] == keys[row] and kept == min(r for r in rows if keys[r] == keys[row])


def url_table() -> pa.Table:
    urls = ["http://a", "http://b", "http://a", None, None, "http://b", "http://c", "http://a", ""]
    status = [None, None, None, None, None, None, "failed_to_download", None, None]
    rows = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    return pa.table(
        {
            "row_index": pa.array(rows, pa.int64()),
            "key": [key_of(r) for r in rows],
            "url": urls,
            "caption": [f"caption {r}" for r in rows],
            "status": pa.array(status, pa.string()),
        }
    )


def test_url_duplicates_name_the_kept_row_and_nulls_and_failures_are_left_alone():
    out = mark_url_duplicates(url_table()).to_pylist()
    assert [row["status"] for row in out] == [None, None, "duplicate", None, None, "duplicate", "failed_to_download", "duplicate", None]  # fmt: skip
    assert out[2]["error_message"] == "duplicate url: the same as row_index 0 (key 00000000), which is kept"
    assert out[5]["error_message"] == "duplicate url: the same as row_index 1 (key 00000001), which is kept"
    assert out[7]["error_message"] == "duplicate url: the same as row_index 0 (key 00000000), which is kept"
    assert all(out[i]["error_message"] is None for i in (0, 1, 3, 4, 6, 8))
    # Every other column is carried through unchanged.
    assert [row["caption"] for row in out] == url_table()["caption"].to_pylist()


def test_a_failed_row_is_not_a_first_occurrence():
    table = pa.table(
        {
            "row_index": pa.array([0, 1, 2], pa.int64()),
            "url": ["http://a", "http://a", "http://a"],
            "status": ["failed_to_download", None, None],
        }
    )
    assert find_duplicates(table, "url").to_pylist() == [
        {"row_index": 2, "kept_row_index": 1, "kept_key": None}
    ]


def test_url_dedup_works_before_any_status_exists():
    table = pa.table({"row_index": pa.array([4, 2, 9], pa.int64()), "url": ["u", "u", "v"]})
    out = mark_url_duplicates(table).to_pylist()
    assert [row["status"] for row in out] == ["duplicate", None, None]
    assert out[0]["error_message"] == "duplicate url: the same as row_index 2, which is kept"


def content_table() -> pa.Table:
    sha = ["s1", "s2", "s1", None, None, "s1", "s2", "s3", "s3"]
    status = ["success", "success", "success", "success", "success", "failed_to_decode", "success", "failed_to_decode", "success"]  # fmt: skip
    rows = list(range(len(sha)))
    return pa.table(
        {
            "row_index": pa.array(rows, pa.int64()),
            "key": [key_of(r) for r in rows],
            "status": status,
            "error_message": [None if s == "success" else "cannot decode image" for s in status],
            "sha256": pa.array(sha, pa.string()),
            "image": [None if s != "success" else f"bytes {r}".encode() for r, s in zip(rows, status)],
        }
    )


def test_content_duplicates_only_among_success_rows_and_lose_their_image():
    out = mark_content_duplicates(content_table()).to_pylist()
    assert [row["status"] for row in out] == [
        "success", "success", "duplicate", "success", "success", "failed_to_decode", "duplicate",
        "failed_to_decode", "success",
    ]  # fmt: skip
    assert out[2]["error_message"] == (
        "duplicate image bytes (sha256): the same as row_index 0 (key 00000000), which is kept"
    )
    assert out[6]["error_message"].endswith("row_index 1 (key 00000001), which is kept")
    assert out[2]["image"] is None and out[6]["image"] is None
    assert out[0]["image"] == b"bytes 0" and out[8]["image"] == b"bytes 8"
    # A failed row with the same sha keeps its own status and message; null sha rows are all kept.
    assert out[5]["error_message"] == "cannot decode image"
    assert out[3]["status"] == out[4]["status"] == "success"


def test_result_does_not_depend_on_row_order_or_batching():
    rng = np.random.default_rng(1)
    n = 2000
    table = random_rows(n, rng)
    reference = mark_content_duplicates(table).sort_by("row_index")
    everything = find_duplicates(table, "sha256")
    for _ in range(3):
        shuffled = table.take(rng.permutation(n))
        assert mark_content_duplicates(shuffled).sort_by("row_index").equals(reference)
        # Batches of a shuffled table, each marked from the list found over the whole input.
        bounds = np.sort(rng.choice(np.arange(1, n), 6, replace=False))
        batches = [shuffled.slice(a, b - a) for a, b in zip([0, *bounds], [*bounds, n])]
        marked = pa.concat_tables(apply_duplicates(b, everything, "content") for b in batches)
        assert marked.sort_by("row_index").equals(reference)
    assert reference["status"].to_pylist().count("duplicate") > 500


def test_hash_partition_puts_equal_keys_together_and_is_stable():
    keys = ["http://a", "http://b", "http://a", "s" * 64]
    parts = hash_partition(keys, 16)
    assert parts[0] == parts[2]
    assert ((parts >= 0) & (parts < 16)).all()
    # Every process on every node must agree; Python's own str hash would differ with PYTHONHASHSEED.
    script = f"from pipelines.ingest.dedup import hash_partition; print(hash_partition({keys!r}, 1_000_003).tolist())"
    for seed in ("1", "2"):
        printed = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True, cwd=REPO,
        ).stdout  # fmt: skip
        assert printed.strip() == str(hash_partition(keys, 1_000_003).tolist())
    assert len(set(hash_partition([f"u{i}" for i in range(1000)], 8).tolist())) == 8


def random_rows(n: int, rng: np.random.Generator) -> pa.Table:
    """Rows with many repeated URLs and contents, some nulls and some failures."""
    urls = np.array([f"http://host/{i}.jpg" for i in rng.integers(0, n // 4, n)], dtype=object)
    urls[rng.random(n) < 0.05] = None
    shas = np.array([f"{i:064x}" for i in rng.integers(0, n // 3, n)], dtype=object)
    status = np.where(rng.random(n) < 0.2, "failed_to_download", "success").astype(object)
    shas[status != "success"] = None
    shas[rng.random(n) < 0.03] = None
    rows = np.arange(n)
    return pa.table(
        {
            "row_index": pa.array(rows, pa.int64()),
            "key": [key_of(r) for r in rows],
            "url": pa.array(urls.tolist(), pa.string()),
            "status": pa.array(status.tolist(), pa.string()),
            "sha256": pa.array(shas.tolist(), pa.string()),
        }
    )


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    # address="local": a fresh one-CPU cluster for this module, never the shared stack's Ray.
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_ray_hash_partitioned_dedup_equals_the_pure_form(local_ray):
    rng = np.random.default_rng(2)
    table = random_rows(4000, rng)
    shuffled = table.take(rng.permutation(table.num_rows))
    ds = local_ray.data.from_arrow(shuffled).repartition(7)
    found = {}
    for kind, column in (("url", "url"), ("content", "sha256")):
        expected = find_duplicates(table, column)
        found[kind] = collect_duplicates(find_duplicates_on_ray(ds, kind, num_partitions=5))
        assert found[kind].schema == DUPLICATES_SCHEMA
        assert found[kind].num_rows > 1000
        assert found[kind].equals(expected), kind
    # Applying the distributed lists gives the same rows as the in-memory marking.
    assert apply_duplicates(table, found["url"], "url").equals(mark_url_duplicates(table))
    assert apply_duplicates(table, found["content"], "content").equals(mark_content_duplicates(table))


def test_a_table_without_duplicates_gives_an_empty_list_and_is_left_as_is():
    table = pa.table({"row_index": pa.array(range(50), pa.int64()), "url": [f"u{i}" for i in range(50)]})
    found = find_duplicates(table, "url")
    assert found.num_rows == 0 and found.schema == DUPLICATES_SCHEMA
    assert mark_url_duplicates(table)["status"].null_count == 50


def test_arrow_string_keys_give_what_python_keys_give():
    rng = np.random.default_rng(1)
    values = [f"http://e/{i}" for i in rng.integers(0, 300, 3000)]
    for i in rng.choice(3000, 400, replace=False):
        values[i] = None if i % 2 else ""
    rows = rng.permutation(3000) + 7
    python = first_occurrence(np.array(values, dtype=object), rows)
    chunked = pa.chunked_array([pa.array(values[:1234]), pa.array(values[1234:])])
    assert first_occurrence(chunked, rows).tolist() == python.tolist()
    assert first_occurrence(pa.array(values), rows).tolist() == python.tolist()
    # find_duplicates over the Arrow table: the same duplicates, named by the kept row's key.
    table = pa.table(
        {"row_index": pa.array(rows, pa.int64()), "key": [key_of(r) for r in rows], "url": chunked}
    )
    found = find_duplicates(table, "url")
    expected = sorted((r, k) for r, k in zip(rows.tolist(), python.tolist()) if r != k)
    assert list(zip(found["row_index"].to_pylist(), found["kept_row_index"].to_pylist())) == expected
    assert found["kept_key"].to_pylist() == [key_of(k) for _, k in expected]
