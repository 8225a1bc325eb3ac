"""Ingest step 1, plan: read URL+caption lists (Parquet, CSV, TSV, JSONL; plain or gzip) from a file, folder or
glob, local or S3, and split them into deterministic shards: shard N holds the input rows whose row_index lies in
[N * samples_per_shard, (N + 1) * samples_per_shard), counting files in sorted path order and rows in file order.
Text files, and Parquet files whose row groups are far larger than a shard, are copied once into Parquet of
shard-sized row groups under the output (_input_cache/), so a shard reads only its own rows when step 3 reads
it back (read_shard), and URL dedup only their url column (read_shard_urls).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import failpoints, storage
from pipelines.formats.shards import shard_name
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.input_formats import (
    FORMATS,
    InputError,
    InputFile,
    TextFormat,
    error_clause,
    format_named,
    format_of_name,
)

# The columns the reader makes, then the ones later stages add. A carried input column with one of these
# names is renamed source_<name> so that it can never be mistaken for (or overwrite) ours.
CANONICAL_COLUMNS = ("row_index", "shard_id", "key", "url", "caption")
OUTPUT_COLUMNS = (
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
    "clip_score",
    "image",
    "image_ext",
)
RESERVED_COLUMNS = frozenset(CANONICAL_COLUMNS + OUTPUT_COLUMNS)
SOURCE_PREFIX = "source_"

INSPECT_THREADS = 16
# Text inputs are converted once to Parquet here (inside the output), one file per input file.
INPUT_CACHE_DIR = "_input_cache"
# Recorded with each cached copy: a copy made by a reader that checked less (JSONL columns from the first
# rows only, CSV quotes unchecked) is made again.
INPUT_CACHE_VERSION = 2
# A Parquet input is read in place when its row groups hold at most this many shards' rows, and copied once
# into shard-sized row groups when they hold more. Parquet decodes whole row groups (pyarrow cannot start in
# the middle of one), so a shard in place reads every row group it overlaps: with one row group of 1M rows
# and 10k-row shards, each of the file's 100 shards would read all 1M rows, 100 times the file in all. The copy
# reads the file once and writes it once; from then on each shard reads at most two groups of its own size.
REGROUP_FACTOR = 4


@dataclass(frozen=True)
class FileSlice:
    """Rows [start, start + num_rows) of one input file."""

    file: InputFile
    start: int
    num_rows: int


@dataclass(frozen=True)
class ShardSpec:
    """Everything needed to load one shard's rows, on any worker, without the rest of the input."""

    shard_id: int
    first_row_index: int
    num_rows: int
    slices: tuple[FileSlice, ...]
    # Source columns whose type differs between input files (say Parquet numbers and CSV text): read as text
    # in every shard, so that all shards of a run agree on the schema.
    text_columns: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------
# Keys: img2dataset's scheme, shard number then the row's position in its shard.


def key_digits(samples_per_shard: int) -> int:
    return len(str(samples_per_shard - 1))


def shard_key(row_index: int, samples_per_shard: int) -> str:
    shard_id, position = divmod(row_index, samples_per_shard)
    return f"{shard_name(shard_id)}{position:0{key_digits(samples_per_shard)}d}"


def shard_keys(row_index: pa.Array, samples_per_shard: int) -> pa.Array:
    """shard_key of every row_index, computed by Arrow (a Python call per row costs seconds per million)."""
    spp = pa.scalar(samples_per_shard, pa.int64())
    shard_id = pc.divide(row_index, spp)
    position = pc.subtract(row_index, pc.multiply(shard_id, spp))
    # shard_name's zero padding to 5 digits, which a larger shard number outgrows, as f"{n:05d}" does.
    shard_part = pc.utf8_lpad(pc.cast(shard_id, pa.string()), width=len(shard_name(0)), padding="0")
    position_part = pc.utf8_lpad(
        pc.cast(position, pa.string()), width=key_digits(samples_per_shard), padding="0"
    )
    return pc.binary_join_element_wise(shard_part, position_part, "")


# ---------------------------------------------------------------------------------------------------------
# Finding the input files


def _is_hidden(relative_path: str) -> bool:
    # Markers and side files that Spark, Hadoop and editors leave next to data (_SUCCESS, .crc, .DS_Store).
    return any(part.startswith((".", "_")) for part in relative_path.split("/"))


def _glob_regex(pattern: str) -> re.Pattern:
    """Shell-style glob: * and ? stay inside one path segment, ** spans segments, [...] is a class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def list_input_files(input_uri: str, input_format: str = "auto") -> list[tuple[str, str, str | None]]:
    """(uri, format, compression) of every input file, sorted by path. Raises InputError if there are none."""
    wanted = "any supported format (.parquet, .csv, .tsv, .jsonl, optionally .gz)"
    if input_format != "auto":
        wanted = f"format {input_format} (.{input_format} or .{input_format}.gz)"
    uri = storage.listing_root(input_uri)
    if any(c in uri for c in "*?["):
        segments = uri.split("/")
        fixed = list(itertools.takewhile(lambda s: not any(c in s for c in "*?["), segments))
        root = "/".join(fixed)
        matcher = _glob_regex(uri)
        candidates = [e.uri for e in storage.list_files(root) if matcher.match(e.uri)]
        kind = "glob"
    else:
        root = uri
        candidates = [e.uri for e in storage.list_files(root)]
        kind = "folder"
        if not candidates:
            if not storage.is_s3(uri) and Path(uri).is_dir():
                raise InputError(f"no input files of {wanted} in the folder {input_uri}; check input")
            if not storage.exists(uri):
                raise InputError(f"input {input_uri} does not exist; check the input path or URI")
            # A single file: its format may come from the config when its name does not tell.
            detected, compression = format_of_name(uri)
            fmt = detected if input_format == "auto" else input_format
            if fmt is None:
                raise InputError(
                    f"cannot tell the format of {input_uri} from its name; set input_format to "
                    "parquet, csv, tsv or jsonl"
                )
            return [(uri, fmt, compression)]
    files = []
    for candidate in candidates:
        if _is_hidden(candidate[len(root) :].lstrip("/")):
            continue
        detected, compression = format_of_name(candidate)
        if detected is not None and input_format in ("auto", detected):
            files.append((candidate, detected, compression))
    if not files:
        raise InputError(
            f"no input files of {wanted} match the {kind} {input_uri}; check input and input_format"
        )
    return sorted(files)


# ---------------------------------------------------------------------------------------------------------
# Reading one input file


def inspect_file(uri: str, fmt: str, compression: str | None) -> InputFile:
    """Row count and column names of one file: from Parquet metadata, or by streaming a text file once."""
    file_format = format_named(fmt)
    try:
        file_format.check_content(uri, compression)
        return file_format.inspect(uri, compression)
    except InputError:
        raise
    except (OSError, pa.ArrowException, EOFError) as e:
        raise file_format.read_failure(uri, compression, e) from None


def read_slice(piece: FileSlice, columns: tuple[str, ...] | None = None) -> pa.Table:
    """The source rows of one file slice, with the file's own column names; only `columns` (those of them the
    file has) when given."""
    f = piece.file
    try:
        return format_named(f.format).read_rows(f, piece.start, piece.num_rows, columns)
    except InputError:
        raise
    except (OSError, pa.ArrowException, EOFError) as e:
        end = piece.start + piece.num_rows
        raise InputError(f"cannot read rows {piece.start}-{end} of {f.uri}: {error_clause(e)}") from None


# ---------------------------------------------------------------------------------------------------------
# Text files as Parquet: a text file can only be read from its start, so reading every shard's slice straight
# from it would cost work that grows with the square of its size. One pass copies it into row groups instead.


def cache_uri(output_uri: str, index: int) -> str:
    """Where the Parquet copy of the index-th input file (in input order) lives inside the output."""
    return storage.join(output_uri, INPUT_CACHE_DIR, f"{index:05d}.parquet")


def _marker_uri(parquet_uri: str) -> str:
    return parquet_uri.removesuffix(".parquet") + ".json"


def cache_text_file(
    uri: str, fmt: str, compression: str | None, parquet_uri: str, rows_per_group: int
) -> InputFile:
    """Copy a CSV/TSV/JSONL file (plain or gzip) once into Parquet at parquet_uri and describe it.

    The copy's layout is its format's (TextFormat.copy_as_parquet): the rows as read_slice reads them from
    the text, every row parsed on the way for the file's columns. See _cached_copy for when a copy is reused.
    """
    text_format = FORMATS.get(fmt)
    if not isinstance(text_format, TextFormat):
        raise InputError(f"unsupported text input format {fmt!r}; use csv, tsv or jsonl")

    def copy(local: Path) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        text_format.check_content(uri, compression)
        return text_format.copy_as_parquet(uri, compression, local, rows_per_group)

    return _cached_copy(uri, fmt, compression, parquet_uri, rows_per_group, copy)


def regroup_parquet_file(f: InputFile, parquet_uri: str, rows_per_group: int) -> InputFile:
    """Copy a Parquet input whose row groups are far larger than a shard once into row groups of
    rows_per_group rows at parquet_uri; its shards are then read from the copy (see REGROUP_FACTOR)."""
    parquet = FORMATS["parquet"]

    def copy(local: Path) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        return parquet.copy_regrouped(f.uri, local, rows_per_group), f.columns, f.column_types

    return _cached_copy(f.uri, f.format, f.compression, parquet_uri, rows_per_group, copy)


def _cached_copy(uri: str, fmt: str, compression: str | None, parquet_uri: str, rows_per_group: int, copy):
    """The InputFile of `uri` read from its Parquet copy at parquet_uri, made by copy(local_path) unless a
    finished copy of the same source is there.

    A JSON marker beside the copy, written last, records the source (URI, size, modification time,
    INPUT_CACHE_VERSION): a later call for the same source reuses the copy without reading the source, and an
    unfinished copy is made again. The copy is streamed batch by batch into a local scratch file, never held in
    memory whole.
    """
    file_format = FORMATS[fmt]
    marker_uri = _marker_uri(parquet_uri)
    try:
        fs, path = storage.pyarrow_filesystem(uri)
        info = fs.get_file_info(path)
        source = {
            "uri": uri,
            "format": fmt,
            "compression": compression,
            "size": info.size,
            "mtime_ns": info.mtime_ns,
            "reader": INPUT_CACHE_VERSION,
        }
    except (OSError, pa.ArrowException) as e:
        raise file_format.read_failure(uri, compression, e) from None
    if storage.exists(marker_uri):
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):  # unreadable: made again
            marker = json.loads(storage.read_bytes(marker_uri))
            if marker.get("source") == source and storage.exists(parquet_uri):
                columns, types = tuple(marker["columns"]), tuple(marker["column_types"])
                return InputFile(
                    uri,
                    fmt,
                    compression,
                    int(marker["num_rows"]),
                    columns,
                    types,
                    parquet_uri,
                    rows_per_group,
                )
        # Another source (the input changed): the copy is stale until the new marker is written.
        storage.delete(marker_uri)
    with tempfile.TemporaryDirectory(prefix="input-cache-") as scratch:
        local = Path(scratch) / "rows.parquet"
        try:
            num_rows, columns, types = copy(local)
        except InputError:
            raise
        except (OSError, pa.ArrowException, EOFError) as e:
            raise file_format.read_failure(uri, compression, e) from None
        storage.publish_file(local, parquet_uri)
    failpoints.reach("plan.input_cached")  # the copy is published, its marker not yet written
    marker = {
        "source": source,
        "num_rows": num_rows,
        "columns": list(columns),
        "column_types": list(types),
        "row_group_rows": rows_per_group,
    }
    storage.write_bytes(marker_uri, json.dumps(marker, indent=1).encode())
    return InputFile(uri, fmt, compression, num_rows, columns, types, parquet_uri, rows_per_group)


# ---------------------------------------------------------------------------------------------------------
# Canonical columns


def _as_text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A string column; values that are not strings become their text, nulls stay null."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_string(column.type):
        return column
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowException, NotImplementedError):
        return pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())


def carried_name(name: str, taken: set[str]) -> str:
    """An input column's name in the output: source_<name> when it would collide with ours."""
    while name in RESERVED_COLUMNS or name in taken:
        name = SOURCE_PREFIX + name
    return name


def to_canonical(raw: pa.Table, cfg: IngestConfig, first_row_index: int) -> pa.Table:
    """row_index, shard_id, key, url, caption, then every other input column (renamed on collision)."""
    n = raw.num_rows
    row_index = pa.array(range(first_row_index, first_row_index + n), pa.int64())
    spp = cfg.samples_per_shard
    columns: dict[str, pa.Array] = {
        "row_index": row_index,
        "shard_id": pc.divide(row_index, pa.scalar(spp, pa.int64())),
        "key": shard_keys(row_index, spp),
        # A file that lacks the column in some rows (JSONL) gives nulls; the downloader fails those rows.
        "url": _as_text(raw[cfg.url_col]) if cfg.url_col in raw.column_names else pa.nulls(n, pa.string()),
        "caption": (
            _as_text(raw[cfg.caption_col])
            if cfg.caption_col is not None and cfg.caption_col in raw.column_names
            else pa.nulls(n, pa.string())
        ),
    }
    taken: set[str] = set()
    for name in raw.column_names:
        if name in (cfg.url_col, cfg.caption_col):
            continue
        out_name = carried_name(name, taken)
        taken.add(out_name)
        columns[out_name] = raw[name]
    return pa.table(columns)


# ---------------------------------------------------------------------------------------------------------
# Planning and reading shards


def _check_columns(f: InputFile, cfg: IngestConfig) -> None:
    if f.num_rows == 0:
        return
    needed = [("url_col", cfg.url_col)] + ([("caption_col", cfg.caption_col)] if cfg.caption_col else [])
    for field, name in needed:
        if name not in f.columns:
            shown = ", ".join(f.columns[:20]) + (", ..." if len(f.columns) > 20 else "")
            fix = f"set {field} to one of them" + (
                " or caption_col to null" if field == "caption_col" else ""
            )
            raise InputError(
                f"input file {f.uri} has no column {name!r} ({field}); its columns are [{shown}]: {fix}"
            )


def inspect_input(cfg: IngestConfig, cache_text: bool = True) -> list[InputFile]:
    """Every input file with its row count, in input order; checks the url/caption columns exist.

    cache_text: copy each text file once into Parquet under the output (see cache_text_file), so that its
    slices are read by row group, and likewise each Parquet file whose row groups hold more than
    REGROUP_FACTOR shards (regroup_parquet_file); without it every slice streams its text file from the start
    and reads its Parquet file's row groups in place.
    """
    found = list_input_files(cfg.input, cfg.input_format)

    spp = cfg.samples_per_shard

    def inspect(index: int, uri: str, fmt: str, compression: str | None) -> InputFile:
        if cache_text and isinstance(FORMATS.get(fmt), TextFormat):
            return cache_text_file(uri, fmt, compression, cache_uri(cfg.output, index), spp)
        f = inspect_file(uri, fmt, compression)
        if cache_text and f.largest_row_group > REGROUP_FACTOR * spp:
            return regroup_parquet_file(f, cache_uri(cfg.output, index), spp)
        return f

    with concurrent.futures.ThreadPoolExecutor(min(INSPECT_THREADS, len(found))) as pool:
        files = list(pool.map(lambda item: inspect(item[0], *item[1]), enumerate(found)))
    for f in files:
        _check_columns(f, cfg)
    if sum(f.num_rows for f in files) == 0:
        raise InputError(f"input {cfg.input} has no rows ({len(files)} file(s), all empty); check the input")
    return files


def plan_shards(cfg: IngestConfig, cache_text: bool = True) -> list[ShardSpec]:
    """Split the whole input into shards of samples_per_shard rows (the last may be smaller).

    Only row counts are gathered (Parquet metadata; one streaming pass over text files, which also copies
    them into Parquet under the output unless cache_text is False), never all rows.
    """
    files = inspect_input(cfg, cache_text)
    spp = cfg.samples_per_shard
    types_seen: dict[str, set[str]] = {}
    for f in files:
        for name, type_name in itertools.zip_longest(f.columns, f.column_types, fillvalue="null"):
            if type_name != "null":
                types_seen.setdefault(name, set()).add(type_name)
    text_columns = tuple(sorted(name for name, seen in types_seen.items() if len(seen) > 1))
    total = sum(f.num_rows for f in files)
    specs = []
    file_iter = iter(f for f in files if f.num_rows)
    current = next(file_iter)
    used = 0  # rows of `current` already given to earlier shards
    for shard_id in range(-(-total // spp)):
        first = shard_id * spp
        size = min(spp, total - first)
        slices, needed = [], size
        while needed:
            if used == current.num_rows:
                current, used = next(file_iter), 0
            take = min(needed, current.num_rows - used)
            slices.append(FileSlice(current, used, take))
            used += take
            needed -= take
        specs.append(ShardSpec(shard_id, first, size, tuple(slices), text_columns))
    return specs


def read_shard(cfg: IngestConfig, spec: ShardSpec) -> pa.Table:
    """The shard's rows with the canonical columns; slices from different files are stacked in order."""
    return _read_shard(cfg, spec, None)


def read_shard_urls(cfg: IngestConfig, spec: ShardSpec) -> pa.Table:
    """row_index, key and url of the shard's rows: what URL dedup needs. Only the url column is read from the
    input (Parquet reads a column's pages alone), not the captions and carried columns that make up most of a
    URL list's bytes."""
    return _read_shard(cfg, spec, (cfg.url_col,)).select(["row_index", "key", "url"])


def _read_shard(cfg: IngestConfig, spec: ShardSpec, columns: tuple[str, ...] | None) -> pa.Table:
    tables, row = [], spec.first_row_index
    for piece in spec.slices:
        raw = read_slice(piece, columns)
        for name in set(spec.text_columns) & set(raw.column_names):
            raw = raw.set_column(raw.schema.get_field_index(name), name, _as_text(raw[name]))
        tables.append(to_canonical(raw, cfg, row))
        row += piece.num_rows
    table = _stack(tables)
    if table.num_rows != spec.num_rows:
        raise InputError(
            f"shard {spec.shard_id} expected {spec.num_rows} rows but read {table.num_rows}; "
            "the input changed since planning, so plan the shards again"
        )
    return table


def _stack(tables: list[pa.Table]) -> pa.Table:
    """Concatenate the slices of a shard; files may disagree on a carried column's type."""
    if len(tables) == 1:
        return tables[0]
    with contextlib.suppress(pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.concat_tables(tables, promote_options="permissive")
    # e.g. a number column from Parquet next to the same column as text from a CSV: keep both as text.
    types: dict[str, set[pa.DataType]] = {}
    for table in tables:
        for field in table.schema:
            if not pa.types.is_null(field.type):
                types.setdefault(field.name, set()).add(field.type)
    conflicting = {name for name, seen in types.items() if len(seen) > 1}
    as_text = []
    for table in tables:
        for name in conflicting & set(table.column_names):
            table = table.set_column(table.schema.get_field_index(name), name, _as_text(table[name]))
        as_text.append(table)
    return pa.concat_tables(as_text, promote_options="permissive")
