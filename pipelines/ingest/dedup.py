"""Ingest deduplication: exact URL duplicates (decided before download, so they are never fetched) and exact
content duplicates (same sha256 of the downloaded bytes). The first occurrence in input order (`row_index`)
wins, so the outcome depends on neither timing nor partitioning; on a cluster, rows are hash-partitioned by key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import Section
from pipelines.formats.shards import DUPLICATE, SUCCESS

# What each kind of deduplication compares, and how its message names it.
KEY_COLUMNS = {"url": "url", "content": "sha256"}
KEY_DESCRIPTIONS = {"url": "url", "content": "image bytes (sha256)"}

# One row per duplicate: which row it is and which row was kept in its place.
DUPLICATES_SCHEMA = pa.schema(
    [("row_index", pa.int64()), ("kept_row_index", pa.int64()), ("kept_key", pa.string())]
)


class DedupConfig(Section):
    """The `dedup` section of the ingest config."""

    urls: bool = True  # drop rows whose URL appeared earlier in input order
    content: bool = True  # drop images whose bytes (sha256) appeared earlier in input order


def _object_array(values: Any) -> np.ndarray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pylist()
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


def _arrow_strings(keys: Any) -> pa.Array | pa.ChunkedArray | None:
    """Keys held as an Arrow string column, as they are (chunks are not joined: that would copy them); None
    for keys of any other kind, which take the Python-object path."""
    if not isinstance(keys, (pa.Array, pa.ChunkedArray)) or not (
        pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)
    ):
        return None
    return keys


def present_keys(keys: Any) -> np.ndarray:
    """Mask of keys that identify something. Null and empty keys never make two rows duplicates."""
    strings = _arrow_strings(keys)
    if strings is not None:
        present = pc.and_kleene(pc.is_valid(strings), pc.not_equal(strings, ""))
        return present.fill_null(False).to_numpy(zero_copy_only=False)
    keys = _object_array(keys)
    return ~pd.isna(keys) & (keys != "")


def first_occurrence(
    keys: Sequence | np.ndarray | pa.Array | pa.ChunkedArray, row_indices: Sequence[int] | np.ndarray
) -> np.ndarray:
    """For each row, the row_index of the first row (smallest row_index) with the same key.

    A row is a duplicate exactly when the result differs from its own row_index. Rows with a null or empty
    key are their own first occurrence. The result does not depend on the order the rows come in.
    """
    if _arrow_strings(keys) is None:
        keys = _object_array(keys)
    row_indices = np.asarray(row_indices, dtype=np.int64)
    if len(keys) != len(row_indices):
        raise ValueError(f"{len(keys)} keys but {len(row_indices)} row indices")
    if len(np.unique(row_indices)) != len(row_indices):
        raise ValueError("row_index values must be unique: they are the rows' positions in the input")
    strings = _arrow_strings(keys)
    if strings is not None:
        return _first_occurrence_of_strings(strings, row_indices)
    kept = row_indices.copy()
    present = present_keys(keys)
    if present.any():
        frame = pd.DataFrame({"key": keys[present], "row_index": row_indices[present]})
        kept[present] = frame.groupby("key", sort=False)["row_index"].transform("min").to_numpy()
    return kept


def _first_occurrence_of_strings(keys: pa.Array | pa.ChunkedArray, row_indices: np.ndarray) -> np.ndarray:
    """first_occurrence for an Arrow string column: Arrow's hash table numbers the distinct keys and numpy
    takes each number's smallest row_index, so no key becomes a Python object (20M URLs would cost ~2 GB)."""
    # The chunks of an encoded ChunkedArray share one dictionary (the last chunk's is the whole of it).
    encoded = pc.dictionary_encode(keys)
    chunks = encoded.chunks if isinstance(encoded, pa.ChunkedArray) else [encoded]
    codes = [chunk.indices.fill_null(-1).to_numpy(zero_copy_only=False) for chunk in chunks]
    codes = np.concatenate(codes).astype(np.int64) if codes else np.empty(0, np.int64)
    present = present_keys(keys)
    codes = codes[present]
    first = np.full(len(chunks[-1].dictionary) if chunks else 0, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, codes, row_indices[present])
    kept = row_indices.copy()
    kept[present] = first[codes]
    return kept


def candidate_mask(table: pa.Table, key_column: str) -> np.ndarray:
    """Rows that take part in deduplication: not failed yet (status null or success) and with a key."""
    mask = present_keys(table[key_column])
    if "status" in table.column_names:
        status = table["status"]
        candidate = pc.or_kleene(pc.is_null(status), pc.equal(status, SUCCESS)).fill_null(False)
        mask &= candidate.to_numpy(zero_copy_only=False)
    return mask


def find_duplicates(table: pa.Table, key_column: str) -> pa.Table:
    """The duplicates among a table's candidate rows, as a DUPLICATES_SCHEMA table sorted by row_index.

    Needs columns `row_index` and `key_column`; uses `status` and `key` when present.
    """
    mask = candidate_mask(table, key_column)
    # Usually every row takes part (URL dedup before any download): no copy of the table then.
    candidates = table if mask.all() else table.filter(pa.array(mask, type=pa.bool_()))
    row_index = candidates["row_index"].to_numpy().astype(np.int64)
    kept = first_occurrence(candidates[key_column], row_index)
    duplicate = kept != row_index
    if "key" in candidates.column_names:
        order = np.argsort(row_index, kind="stable")
        kept_key = candidates["key"].take(order[np.searchsorted(row_index[order], kept[duplicate])])
        kept_key = kept_key.cast(pa.string())
    else:
        kept_key = pa.nulls(int(duplicate.sum()), pa.string())
    found = pa.table(
        {
            "row_index": pa.array(row_index[duplicate], pa.int64()),
            "kept_row_index": pa.array(kept[duplicate], pa.int64()),
            "kept_key": kept_key,
        },
        schema=DUPLICATES_SCHEMA,
    )
    return found.sort_by("row_index")


def duplicate_message(kind: str, kept_row_index: int, kept_key: str | None) -> str:
    kept = f"row_index {kept_row_index}" + (f" (key {kept_key})" if kept_key is not None else "")
    return f"duplicate {KEY_DESCRIPTIONS[kind]}: the same as {kept}, which is kept"


def apply_duplicates(table: pa.Table, duplicates: pa.Table, kind: str) -> pa.Table:
    """Mark the rows of `table` listed in `duplicates` (any superset of them, e.g. the whole run's list) with
    status "duplicate" and a message naming the kept row. Content duplicates also lose their image bytes."""
    if kind not in KEY_COLUMNS:
        raise ValueError(f"kind must be one of {list(KEY_COLUMNS)}, got {kind!r}")
    n = table.num_rows
    row_index = table["row_index"].to_numpy().astype(np.int64)
    listed = duplicates.sort_by("row_index")
    listed_rows = listed["row_index"].to_numpy().astype(np.int64)
    position = np.searchsorted(listed_rows, row_index)
    found = position < len(listed_rows)
    found[found] = listed_rows[position[found]] == row_index[found]

    status = _object_array(table["status"]) if "status" in table.column_names else np.full(n, None, object)
    error_message = (
        _object_array(table["error_message"])
        if "error_message" in table.column_names
        else np.full(n, None, object)
    )
    hits = np.flatnonzero(found)
    # Only this table's entries of the list are read, so a whole run's list costs a search, not a copy.
    kept = listed.select(["kept_row_index", "kept_key"]).take(pa.array(position[hits], pa.int64()))
    for i, kept_row_index, kept_key in zip(
        hits, kept["kept_row_index"].to_pylist(), kept["kept_key"].to_pylist()
    ):
        status[i] = DUPLICATE
        error_message[i] = duplicate_message(kind, kept_row_index, kept_key)

    table = _set_column(table, "status", pa.array(list(status), pa.string()))
    table = _set_column(table, "error_message", pa.array(list(error_message), pa.string()))
    if kind == "content" and "image" in table.column_names:
        image = table["image"]
        table = _set_column(table, "image", pc.if_else(pa.array(found), pa.scalar(None, image.type), image))
    return table


def _set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def mark_url_duplicates(table: pa.Table) -> pa.Table:
    """Within one table: every later row with the URL of an earlier one becomes a duplicate (not downloaded)."""
    return apply_duplicates(table, find_duplicates(table, KEY_COLUMNS["url"]), "url")


def mark_content_duplicates(table: pa.Table) -> pa.Table:
    """Within one table: every later success row with the sha256 of an earlier one becomes a duplicate."""
    return apply_duplicates(table, find_duplicates(table, KEY_COLUMNS["content"]), "content")


# ---------------------------------------------------------------------------------------------------------
# Across a cluster. All rows with the same key hash to the same partition, so each partition finds the first
# occurrences of its keys alone, and the union over partitions is exactly what the whole table gives.


def hash_partition(keys: Any, num_partitions: int) -> np.ndarray:
    """Partition number per key. pandas' hash is seeded with a fixed key, so every process agrees on it
    (Python's hash() of a str is salted per process and would scatter equal keys)."""
    hashes = pd.util.hash_array(_object_array(keys), categorize=False)
    return (hashes % np.uint64(num_partitions)).astype(np.int64)


def _keyed_candidates(batch: pa.Table, key_column: str, num_partitions: int) -> pa.Table:
    candidates = batch.filter(pa.array(candidate_mask(batch, key_column), type=pa.bool_()))
    columns = ["row_index", key_column] + (["key"] if "key" in candidates.column_names else [])
    candidates = candidates.select(columns)
    return candidates.append_column(
        "partition", pa.array(hash_partition(candidates[key_column], num_partitions), pa.int64())
    )


def _duplicates_in_partition(partition: pa.Table, key_column: str) -> pa.Table:
    return find_duplicates(partition, key_column)


def find_duplicates_on_ray(ds, kind: str, num_partitions: int = 64):
    """A Ray Dataset of DUPLICATES_SCHEMA rows for the whole dataset `ds` (columns row_index, the kind's key,
    and optionally status and key): candidates are hash-partitioned by key and each partition is deduplicated
    on its own. Feed the result, whole or split by shard, to apply_duplicates."""
    if kind not in KEY_COLUMNS:
        raise ValueError(f"kind must be one of {list(KEY_COLUMNS)}, got {kind!r}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    key_column = KEY_COLUMNS[kind]
    keyed = ds.map_batches(
        _keyed_candidates,
        batch_format="pyarrow",
        fn_kwargs={"key_column": key_column, "num_partitions": num_partitions},
    )
    return keyed.groupby("partition", num_partitions=num_partitions).map_groups(
        _duplicates_in_partition, batch_format="pyarrow", fn_kwargs={"key_column": key_column}
    )


def collect_duplicates(duplicates_ds) -> pa.Table:
    """The rows of find_duplicates_on_ray's result as one table sorted by row_index."""
    import ray

    tables = [table.cast(DUPLICATES_SCHEMA) for table in ray.get(duplicates_ds.to_arrow_refs())]
    if not tables:
        return DUPLICATES_SCHEMA.empty_table()
    return pa.concat_tables(tables).sort_by("row_index")
