"""Ingest stage 1: read URL+caption lists (Parquet, CSV, TSV, JSONL; plain or gzip) from a file, folder or glob,
local or S3, and split them into deterministic shards: shard N holds the input rows whose row_index lies in
[N * samples_per_shard, (N + 1) * samples_per_shard), counting files in sorted path order and rows in file order.
Text files are copied once into Parquet under the output (_input_cache/), so a shard reads only its row groups.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines import failpoints, storage
from pipelines.ingest.config import IngestConfig

FORMAT_OF_EXTENSION = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
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

READ_CHUNK_BYTES = 1 << 20
CSV_BLOCK_BYTES = 1 << 22
# JSONL keys are looked for in this many leading rows when checking that the url column exists.
JSONL_SCHEMA_PROBE_ROWS = 1000
INSPECT_THREADS = 16
# Text inputs are converted once to Parquet here (inside the output), one file per input file.
INPUT_CACHE_DIR = "_input_cache"
# A JSONL file's cached copy keeps each line's raw bytes: types are inferred per slice, exactly as from the text.
JSONL_LINE_COLUMN = "line"
JSONL_LINES_PER_BATCH = 8192


class InputError(ValueError):
    """The input cannot be read as configured; the message says what to fix."""


@dataclass(frozen=True)
class InputFile:
    uri: str
    format: str  # parquet | csv | tsv | jsonl
    compression: str | None  # "gzip" or None
    num_rows: int
    columns: tuple[str, ...]  # source column names (for JSONL: the keys seen in the first rows)
    column_types: tuple[str, ...] = ()  # their Arrow types as text, "null" where unknown
    # A Parquet copy of a text file (see cache_text_file); when set, slices are read from it, not from `uri`.
    cached: str | None = None


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
    return f"{shard_id:05d}{position:0{key_digits(samples_per_shard)}d}"


# ---------------------------------------------------------------------------------------------------------
# Finding the input files


def _format_of(uri: str) -> tuple[str | None, str | None]:
    """(format from the extension or None, compression) for a file name such as 'cc3m.tsv.gz'."""
    name = uri.rsplit("/", 1)[-1].lower()
    compression = "gzip" if name.endswith(".gz") else None
    if compression:
        name = name[: -len(".gz")]
    return next((fmt for ext, fmt in FORMAT_OF_EXTENSION.items() if name.endswith(ext)), None), compression


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


def _absolute(uri: str) -> str:
    # Same normalisation as storage.list_files, so that listed paths and patterns compare equal.
    return uri if storage.is_s3(uri) else str(Path(uri).expanduser().absolute())


def list_input_files(input_uri: str, input_format: str = "auto") -> list[tuple[str, str, str | None]]:
    """(uri, format, compression) of every input file, sorted by path. Raises InputError if there are none."""
    wanted = "any supported format (.parquet, .csv, .tsv, .jsonl, optionally .gz)"
    if input_format != "auto":
        wanted = f"format {input_format} (.{input_format} or .{input_format}.gz)"
    uri = _absolute(input_uri)
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
            detected, compression = _format_of(uri)
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
        detected, compression = _format_of(candidate)
        if detected is not None and input_format in ("auto", detected):
            files.append((candidate, detected, compression))
    if not files:
        raise InputError(
            f"no input files of {wanted} match the {kind} {input_uri}; check input and input_format"
        )
    return sorted(files)


# ---------------------------------------------------------------------------------------------------------
# Streaming the rows of one file


def _open_stream(uri: str, compression: str | None):
    fs, path = storage.pyarrow_filesystem(uri)
    return fs.open_input_stream(path, compression=compression)


def _csv_parse_options(fmt: str) -> pacsv.ParseOptions:
    if fmt == "tsv":
        # TSV has no quoting: a caption that starts with '"' must not swallow the lines after it.
        return pacsv.ParseOptions(delimiter="\t", quote_char=False)
    return pacsv.ParseOptions(delimiter=",", newlines_in_values=True)


def _csv_header(uri: str, fmt: str, compression: str | None) -> tuple[str, ...]:
    with _open_stream(uri, compression) as stream:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=_csv_parse_options(fmt),
        )
        return tuple(reader.schema.names)


def _csv_batches(
    uri: str, fmt: str, compression: str | None, columns: tuple[str, ...]
) -> Iterator[pa.RecordBatch]:
    # Every column as text: CSV has no types, and guessing them from the first block would make a later
    # block fail to convert (or make shards of one file disagree on a column's type).
    with _open_stream(uri, compression) as stream:
        yield from pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=_csv_parse_options(fmt),
            convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in columns}),
        )


def _jsonl_lines(uri: str, compression: str | None) -> Iterator[bytes]:
    """Non-blank lines of a JSONL file; a JSON text holds no raw newline, so a line is a row."""
    with _open_stream(uri, compression) as stream:
        rest = b""
        while chunk := stream.read(READ_CHUNK_BYTES):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            yield from (line for line in lines if line.strip())
        if rest.strip():
            yield rest


def inspect_file(uri: str, fmt: str, compression: str | None) -> InputFile:
    """Row count and column names of one file: from Parquet metadata, or by streaming a text file once."""
    try:
        if fmt == "parquet":
            fs, path = storage.pyarrow_filesystem(uri)
            with fs.open_input_file(path) as f:
                metadata = pq.ParquetFile(f).metadata
                schema = metadata.schema.to_arrow_schema()
                types = tuple(str(t) for t in schema.types)
                return InputFile(uri, fmt, compression, metadata.num_rows, tuple(schema.names), types)
        if fmt in ("csv", "tsv"):
            columns = _csv_header(uri, fmt, compression)
            num_rows = sum(batch.num_rows for batch in _csv_batches(uri, fmt, compression, columns))
            return InputFile(uri, fmt, compression, num_rows, columns, ("string",) * len(columns))
        if fmt == "jsonl":
            probe: list[dict] = []
            num_rows = 0
            for num_rows, line in enumerate(_jsonl_lines(uri, compression), start=1):
                if num_rows <= JSONL_SCHEMA_PROBE_ROWS:
                    probe.append(_parse_json_line(line, uri, num_rows - 1))
            schema = _table_from_json_rows(probe, ()).schema
            return InputFile(
                uri, fmt, compression, num_rows, tuple(schema.names), tuple(map(str, schema.types))
            )
    except InputError:
        raise
    except (OSError, pa.ArrowException, EOFError) as e:
        raise InputError(f"cannot read {uri} as {fmt}{' (gzip)' if compression else ''}: {e}") from None
    raise InputError(f"unsupported input format {fmt!r}; use parquet, csv, tsv or jsonl")


def _parse_json_line(line: bytes, uri: str, row: int) -> dict:
    try:
        value = json.loads(line)
    except ValueError as e:
        raise InputError(f"row {row} of {uri} is not valid JSON ({e}); fix or remove that line") from None
    if not isinstance(value, dict):
        raise InputError(
            f"row {row} of {uri} is a JSON {type(value).__name__}, not an object; each line must be one"
        )
    return value


def _read_parquet_rows(uri: str, start: int, num_rows: int) -> pa.Table:
    """Rows [start, start + num_rows) of a Parquet file; only the row groups that overlap them are read."""
    end = start + num_rows
    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        groups, group_start, first_row = [], 0, None
        for i in range(parquet.metadata.num_row_groups):
            group_rows = parquet.metadata.row_group(i).num_rows
            if group_start < end and group_start + group_rows > start:
                groups.append(i)
                first_row = group_start if first_row is None else first_row
            group_start += group_rows
        table = parquet.read_row_groups(groups) if groups else parquet.schema_arrow.empty_table()
        return table.slice(start - (first_row or 0), num_rows)


def read_slice(piece: FileSlice) -> pa.Table:
    """The source rows of one file slice, with the file's own column names."""
    f = piece.file
    end = piece.start + piece.num_rows
    try:
        if f.format == "parquet":
            return _read_parquet_rows(f.uri, piece.start, piece.num_rows)
        if f.cached is not None and f.format in ("csv", "tsv"):
            # Already every column as text, in the order of the header.
            return _read_parquet_rows(f.cached, piece.start, piece.num_rows)
        if f.cached is not None and f.format == "jsonl":
            lines = _read_parquet_rows(f.cached, piece.start, piece.num_rows)[JSONL_LINE_COLUMN].to_pylist()
            rows = [_parse_json_line(line, f.uri, piece.start + i) for i, line in enumerate(lines)]
            return _table_from_json_rows(rows, f.columns)
        if f.format in ("csv", "tsv"):
            batches, seen = [], 0
            for batch in _csv_batches(f.uri, f.format, f.compression, f.columns):
                lo, hi = max(piece.start - seen, 0), min(end - seen, batch.num_rows)
                if hi > lo:
                    batches.append(batch.slice(lo, hi - lo))
                seen += batch.num_rows
                if seen >= end:
                    break
            schema = pa.schema([(name, pa.string()) for name in f.columns])
            return pa.Table.from_batches(batches, schema=schema)
        if f.format == "jsonl":
            lines = itertools.islice(_jsonl_lines(f.uri, f.compression), piece.start, end)
            rows = [_parse_json_line(line, f.uri, piece.start + i) for i, line in enumerate(lines)]
            return _table_from_json_rows(rows, f.columns)
    except InputError:
        raise
    except (OSError, pa.ArrowException, EOFError) as e:
        raise InputError(f"cannot read rows {piece.start}-{end} of {f.uri}: {e}") from None
    raise InputError(f"unsupported input format {f.format!r}; use parquet, csv, tsv or jsonl")


def _table_from_json_rows(rows: list[dict], known_keys: tuple[str, ...]) -> pa.Table:
    names = dict.fromkeys(known_keys)
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            # Mixed types in one column (a number here, a string there): keep each value's JSON text.
            columns[name] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string()
            )
    # Never empty: planning checked that the url column is among the known keys.
    return pa.table(columns)


# ---------------------------------------------------------------------------------------------------------
# Text files as Parquet: a text file can only be read from its start, so reading every shard's slice straight
# from it would cost work that grows with the square of its size. One pass copies it into row groups instead.


def cache_uri(output_uri: str, index: int) -> str:
    """Where the Parquet copy of the index-th input file (in input order) lives inside the output."""
    return storage.join(output_uri, INPUT_CACHE_DIR, f"{index:05d}.parquet")


def _marker_uri(parquet_uri: str) -> str:
    return parquet_uri.removesuffix(".parquet") + ".json"


def _write_row_groups(
    batches: Iterator[pa.RecordBatch], schema: pa.Schema, path: Path, rows_per_group: int
) -> int:
    """Stream batches into a Parquet file whose row groups hold rows_per_group rows (the last fewer)."""
    num_rows = 0
    with pq.ParquetWriter(path, schema) as out:
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for batch in batches:
            pending.append(batch)
            pending_rows += batch.num_rows
            num_rows += batch.num_rows
            while pending_rows >= rows_per_group:
                table = pa.Table.from_batches(pending, schema)
                out.write_table(table.slice(0, rows_per_group), row_group_size=rows_per_group)
                rest = table.slice(rows_per_group)
                pending, pending_rows = rest.to_batches(), rest.num_rows
        if pending_rows:
            out.write_table(pa.Table.from_batches(pending, schema), row_group_size=rows_per_group)
    return num_rows


def cache_text_file(
    uri: str, fmt: str, compression: str | None, parquet_uri: str, rows_per_group: int
) -> InputFile:
    """Copy a CSV/TSV/JSONL file (plain or gzip) once into Parquet at parquet_uri and describe it.

    CSV/TSV become string columns, as read_slice reads them from the text; JSONL keeps each line's bytes, so
    that a slice's columns and types are inferred from its own rows exactly as from the text. A JSON marker
    beside the copy, written last, records the source (URI, size, modification time): a later call for the
    same source reuses the copy without reading the source, and an unfinished conversion is done again.
    The file is streamed batch by batch into a local scratch file, never held in memory whole.
    """
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
        }
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"cannot read {uri}: {e}") from None
    if storage.exists(marker_uri):
        marker = json.loads(storage.read_bytes(marker_uri))
        if marker.get("source") == source and storage.exists(parquet_uri):
            columns, types = tuple(marker["columns"]), tuple(marker["column_types"])
            return InputFile(uri, fmt, compression, marker["num_rows"], columns, types, parquet_uri)
        # Another source (the input changed): the copy is stale until the new marker is written.
        storage.delete(marker_uri)
    with tempfile.TemporaryDirectory(prefix="input-cache-") as scratch:
        local = Path(scratch) / "rows.parquet"
        try:
            if fmt in ("csv", "tsv"):
                columns = _csv_header(uri, fmt, compression)
                schema = pa.schema([(name, pa.string()) for name in columns])
                batches = _csv_batches(uri, fmt, compression, columns)
                num_rows = _write_row_groups(batches, schema, local, rows_per_group)
                types = ("string",) * len(columns)
            elif fmt == "jsonl":
                schema = pa.schema([(JSONL_LINE_COLUMN, pa.binary())])
                probe: list[dict] = []

                def line_batches() -> Iterator[pa.RecordBatch]:
                    lines = _jsonl_lines(uri, compression)
                    while chunk := list(itertools.islice(lines, JSONL_LINES_PER_BATCH)):
                        # Column names come from the leading rows, as inspect_file finds them.
                        for line in chunk[: max(JSONL_SCHEMA_PROBE_ROWS - len(probe), 0)]:
                            probe.append(_parse_json_line(line, uri, len(probe)))
                        yield pa.record_batch([pa.array(chunk, pa.binary())], schema=schema)

                num_rows = _write_row_groups(line_batches(), schema, local, rows_per_group)
                probe_schema = _table_from_json_rows(probe, ()).schema
                columns, types = tuple(probe_schema.names), tuple(map(str, probe_schema.types))
            else:
                raise InputError(f"unsupported text input format {fmt!r}; use csv, tsv or jsonl")
        except InputError:
            raise
        except (OSError, pa.ArrowException, EOFError) as e:
            raise InputError(f"cannot read {uri} as {fmt}{' (gzip)' if compression else ''}: {e}") from None
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
    return InputFile(uri, fmt, compression, num_rows, columns, types, parquet_uri)


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
        "key": pa.array(
            [shard_key(i, spp) for i in range(first_row_index, first_row_index + n)], pa.string()
        ),
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
    slices are read by row group; without it every slice streams its text file from the start.
    """
    found = list_input_files(cfg.input, cfg.input_format)

    def inspect(index: int, uri: str, fmt: str, compression: str | None) -> InputFile:
        if cache_text and fmt != "parquet":
            return cache_text_file(uri, fmt, compression, cache_uri(cfg.output, index), cfg.samples_per_shard)
        return inspect_file(uri, fmt, compression)

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
    tables, row = [], spec.first_row_index
    for piece in spec.slices:
        raw = read_slice(piece)
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
