"""The input formats of URL lists, Parquet, CSV, TSV and JSONL (plain or gzip): for each, how its bytes are
checked, its columns and rows counted, a slice of its rows read, and (for text) a copy made in Parquet.
FORMATS maps an input_format name to its format; the reader dispatches through it."""

from __future__ import annotations

import abc
import codecs
import collections
import contextlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.entrypoint import JobError

READ_CHUNK_BYTES = 1 << 20
CSV_BLOCK_BYTES = 1 << 22
# How much of a file's start is looked at to tell whether its bytes are what its name says.
SNIFF_BYTES = 1 << 16
# A JSONL file's cached copy keeps each line's raw bytes: types are inferred per slice, exactly as from the text.
JSONL_LINE_COLUMN = "line"
JSONL_LINES_PER_BATCH = 8192

# Leading bytes of what a misnamed input file often turns out to be, and what to do about it.
MAGIC_BYTES = (
    (b"PK\x03\x04", "a zip archive", "unzip it"),
    (b"PK\x05\x06", "an empty zip archive", "unzip it"),
    (b"PK\x07\x08", "a zip archive", "unzip it"),
    (b"\x1f\x8b", "gzip-compressed data", "name it with a .gz suffix or gunzip it"),
    # After its magic a Parquet file holds a Thrift struct whose first field header is 0x15 (a header row
    # such as "PAR1,url" is text).
    (b"PAR1\x15", "a Parquet file", "name it .parquet"),
    (b"\xfd7zXZ\x00", "xz-compressed data", "decompress it"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "decompress it"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it"),
    (b"\xff\xfe", "UTF-16 or UTF-32 text", "re-encode it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text", "re-encode it as UTF-8"),
)


class InputError(JobError, ValueError):
    """The input cannot be read as configured; the message says what to fix."""


@dataclass(frozen=True)
class InputFile:
    uri: str
    format: str  # parquet | csv | tsv | jsonl
    compression: str | None  # "gzip" or None
    num_rows: int
    columns: tuple[str, ...]  # source column names (for JSONL: every row's keys, in order of appearance)
    column_types: tuple[str, ...] = ()  # their Arrow types as text, "null" where unknown
    # A Parquet copy of a text file, or of a Parquet file with oversized row groups (reader.cache_text_file,
    # reader.regroup_parquet_file); when set, slices are read from it, not from `uri`.
    cached: str | None = None
    # Rows in the largest row group of the Parquet file slices are read from (the copy when there is one;
    # 0 for text read as text).
    largest_row_group: int = 0


# ---------------------------------------------------------------------------------------------------------
# The formats. Telling what a file is: a name says a format, the bytes may say otherwise (a zip named .csv,
# plain text named .gz, a Parquet file that is not one, Latin-1 text). Each mismatch is one sentence, not a
# parser error.


@dataclass(frozen=True)
class InputFormat(abc.ABC):
    """One input format; the reader calls check_content, then inspect or read_rows, and turns the OSError,
    ArrowException or EOFError they raise into one sentence (read_failure)."""

    name: str  # as input_format names it
    title: str  # as sentences name it
    extensions: tuple[str, ...]  # of its file names, before an optional .gz

    def check_content(self, uri: str, compression: str | None) -> None:
        """Raise InputError (one sentence) when the file's start is not what its name or input_format says."""
        head = _head(uri, None)
        if compression == "gzip":
            _check_gzip(uri, head)
            head = _head(uri, compression)
        self._check_head(uri, head)

    @abc.abstractmethod
    def _check_head(self, uri: str, head: bytes) -> None:
        """Raise InputError when the file's (decompressed) start is not this format."""

    @abc.abstractmethod
    def inspect(self, uri: str, compression: str | None) -> InputFile:
        """Row count and column names of one file."""

    @abc.abstractmethod
    def read_rows(
        self, f: InputFile, start: int, num_rows: int, columns: tuple[str, ...] | None = None
    ) -> pa.Table:
        """Rows [start, start + num_rows) of a file, with the file's own column names; with `columns`, only
        those of them that the file has."""

    def read_failure(self, uri: str, compression: str | None, error: Exception) -> InputError:
        """A parser's or decompressor's error as one sentence naming the file and the format it was read as."""
        message = error_clause(error)
        if "invalid UTF8" in message:
            return InputError(f"{uri} is not UTF-8 text ({message}); re-encode it as UTF-8")
        return InputError(
            f"cannot read {uri} as {self.title}{' (gzip)' if compression else ''}: {message}; check that it is a "
            f"complete {self.title} file"
        )


@dataclass(frozen=True)
class ParquetFormat(InputFormat):
    """Read in place: row counts from the metadata, a slice from the row groups that overlap it."""

    def check_content(self, uri: str, compression: str | None) -> None:
        if compression == "gzip":
            _check_gzip(uri, _head(uri, None))
            raise InputError(
                f"{uri} is a gzip-compressed file, and Parquet inputs cannot be compressed as a whole; gunzip it "
                "(Parquet compresses its own pages)"
            )
        super().check_content(uri, compression)

    def _check_head(self, uri: str, head: bytes) -> None:
        kind = _kind_of(head)
        if kind is not None and kind[0] != "a Parquet file":
            raise InputError(f"{uri} is {kind[0]}, not a Parquet file; {kind[1]}")
        if not head.startswith(b"PAR1"):
            what = "empty" if not head else "not a Parquet file (it does not start with the bytes PAR1)"
            raise InputError(f"{uri} is {what}; check the input and its format")

    def inspect(self, uri: str, compression: str | None) -> InputFile:
        fs, path = storage.pyarrow_filesystem(uri)
        with fs.open_input_file(path) as f:
            metadata = pq.ParquetFile(f).metadata
            schema = metadata.schema.to_arrow_schema()
            _check_unique_columns(uri, tuple(schema.names))
            types = tuple(str(t) for t in schema.types)
            largest = max((metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)), default=0)
            return InputFile(
                uri, self.name, compression, metadata.num_rows, tuple(schema.names), types, None, largest
            )

    def read_rows(
        self, f: InputFile, start: int, num_rows: int, columns: tuple[str, ...] | None = None
    ) -> pa.Table:
        return _read_parquet_rows(f.cached or f.uri, start, num_rows, _present(f, columns))

    def copy_regrouped(self, uri: str, path: Path, rows_per_group: int) -> int:
        """Stream a Parquet file into local Parquet at `path` in row groups of rows_per_group rows, its rows,
        columns and types unchanged; returns the number of rows."""
        fs, source = storage.pyarrow_filesystem(uri)
        with fs.open_input_file(source) as handle:
            parquet = pq.ParquetFile(handle)
            batches = parquet.iter_batches(batch_size=min(rows_per_group, 65_536))
            return _write_row_groups(batches, parquet.schema_arrow, path, rows_per_group)


@dataclass(frozen=True)
class TextFormat(InputFormat):
    """UTF-8 text, which can only be read from its start: copy_as_parquet copies a file into row groups in one
    pass (see reader.cache_text_file), and read_rows reads a slice from that copy when the file has one."""

    def _check_head(self, uri: str, head: bytes) -> None:
        kind = _kind_of(head)
        if kind is not None:
            raise InputError(f"{uri} is {kind[0]}, not {self.title} text; {kind[1]}")
        if b"\x00" in head:
            raise InputError(
                f"{uri} holds NUL bytes, so it is binary data, not {self.title} text; check the input"
            )
        try:
            # The last character may be cut in two by the end of the sample.
            codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
        except UnicodeDecodeError as e:
            raise InputError(
                f"{uri} is not UTF-8 text (byte {head[e.start]:#04x} at offset {e.start}); re-encode it as UTF-8"
            ) from None

    @abc.abstractmethod
    def copy_as_parquet(
        self, uri: str, compression: str | None, path: Path, rows_per_group: int
    ) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        """Stream the file into local Parquet in groups of rows_per_group rows: (num_rows, columns, types)."""


@dataclass(frozen=True)
class DelimitedTextFormat(TextFormat):
    """CSV or TSV, every column read as text: CSV has no types, and guessing them from the first block would
    make a later block fail to convert (or make shards of one file disagree on a column's type)."""

    delimiter: str
    # TSV has no quoting: a caption that starts with '"' must not swallow the lines after it.
    quoted: bool

    def inspect(self, uri: str, compression: str | None) -> InputFile:
        columns = self._header(uri, compression)
        _check_unique_columns(uri, columns)
        num_rows = sum(batch.num_rows for batch in self._batches(uri, compression, columns))
        return InputFile(uri, self.name, compression, num_rows, columns, ("string",) * len(columns))

    def read_rows(
        self, f: InputFile, start: int, num_rows: int, columns: tuple[str, ...] | None = None
    ) -> pa.Table:
        if f.cached is not None:
            # Already every column as text, in the order of the header.
            return _read_parquet_rows(f.cached, start, num_rows, _present(f, columns))
        end = start + num_rows
        batches, seen = [], 0
        for batch in self._batches(f.uri, f.compression, f.columns):
            lo, hi = max(start - seen, 0), min(end - seen, batch.num_rows)
            if hi > lo:
                batches.append(batch.slice(lo, hi - lo))
            seen += batch.num_rows
            if seen >= end:
                break
        schema = pa.schema([(name, pa.string()) for name in f.columns])
        table = pa.Table.from_batches(batches, schema=schema)
        return table if columns is None else table.select(list(_present(f, columns)))

    def copy_as_parquet(
        self, uri: str, compression: str | None, path: Path, rows_per_group: int
    ) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        # String columns, as read_rows reads them from the text.
        columns = self._header(uri, compression)
        _check_unique_columns(uri, columns)
        schema = pa.schema([(name, pa.string()) for name in columns])
        num_rows = _write_row_groups(self._batches(uri, compression, columns), schema, path, rows_per_group)
        return num_rows, columns, ("string",) * len(columns)

    def _parse_options(self) -> pacsv.ParseOptions:
        if self.quoted:
            return pacsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True)
        return pacsv.ParseOptions(delimiter=self.delimiter, quote_char=False)

    @contextlib.contextmanager
    def _stream(self, uri: str, compression: str | None) -> Iterator:
        with _open_stream(uri, compression) as stream:
            if not self.quoted:
                yield stream  # no quote can swallow lines there
                return
            checked = _QuoteCheckedStream(stream, uri, self.delimiter.encode())
            try:
                yield checked
            except pa.ArrowInvalid:
                # pyarrow may give up on a block that a runaway quote made one unfinished row before it reads
                # the end of the file; the quote, not pyarrow's symptom, is what to report.
                if checked.in_quotes:
                    checked.drain()
                raise

    def _header(self, uri: str, compression: str | None) -> tuple[str, ...]:
        with self._stream(uri, compression) as stream:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                parse_options=self._parse_options(),
            )
            return tuple(reader.schema.names)

    def _batches(
        self, uri: str, compression: str | None, columns: tuple[str, ...]
    ) -> Iterator[pa.RecordBatch]:
        with self._stream(uri, compression) as stream:
            yield from pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                parse_options=self._parse_options(),
                convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in columns}),
            )


@dataclass(frozen=True)
class JsonlFormat(TextFormat):
    """One JSON object per line; the file's columns are every row's keys, in order of appearance, so every row
    is parsed when the file is inspected or copied."""

    def inspect(self, uri: str, compression: str | None) -> InputFile:
        keys = _JsonlColumns()
        num_rows = sum(len(batch) for batch in _jsonl_line_batches(uri, compression, keys))
        return InputFile(uri, self.name, compression, num_rows, *keys.columns())

    def read_rows(
        self, f: InputFile, start: int, num_rows: int, columns: tuple[str, ...] | None = None
    ) -> pa.Table:
        if f.cached is not None:
            lines = _read_parquet_rows(f.cached, start, num_rows)[JSONL_LINE_COLUMN].to_pylist()
        else:
            lines = itertools.islice(_jsonl_lines(f.uri, f.compression), start, start + num_rows)
        rows = [_parse_json_line(line, f.uri, start + i) for i, line in enumerate(lines)]
        table = _table_from_json_rows(rows, f.columns)
        # Every line is parsed whole (JSON has no columns to skip); only the wanted keys are kept.
        return table if columns is None else table.select([n for n in table.column_names if n in columns])

    def copy_as_parquet(
        self, uri: str, compression: str | None, path: Path, rows_per_group: int
    ) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        # Each line's bytes, so that a slice's types are inferred from its own rows exactly as from the text.
        schema = pa.schema([(JSONL_LINE_COLUMN, pa.binary())])
        keys = _JsonlColumns()
        batches = (
            pa.record_batch([pa.array(lines, pa.binary())], schema=schema)
            for lines in _jsonl_line_batches(uri, compression, keys)
        )
        num_rows = _write_row_groups(batches, schema, path, rows_per_group)
        return num_rows, *keys.columns()


FORMATS: dict[str, InputFormat] = {
    fmt.name: fmt
    for fmt in (
        ParquetFormat("parquet", "Parquet", (".parquet",)),
        DelimitedTextFormat("csv", "CSV", (".csv",), delimiter=",", quoted=True),
        DelimitedTextFormat("tsv", "TSV", (".tsv",), delimiter="\t", quoted=False),
        JsonlFormat("jsonl", "JSONL", (".jsonl", ".ndjson")),
    )
}


def format_named(name: str) -> InputFormat:
    """The format that input_format (or a file's extension) names."""
    if name not in FORMATS:
        raise InputError(f"unsupported input format {name!r}; use parquet, csv, tsv or jsonl")
    return FORMATS[name]


def format_of_name(uri: str) -> tuple[str | None, str | None]:
    """(format from the extension or None, compression) for a file name such as 'cc3m.tsv.gz'."""
    name = uri.rsplit("/", 1)[-1].lower()
    compression = "gzip" if name.endswith(".gz") else None
    if compression:
        name = name[: -len(".gz")]
    return next((fmt.name for fmt in FORMATS.values() if name.endswith(fmt.extensions)), None), compression


# ---------------------------------------------------------------------------------------------------------
# Shared by the formats


def _open_stream(uri: str, compression: str | None):
    fs, path = storage.pyarrow_filesystem(uri)
    return fs.open_input_stream(path, compression=compression)


def _head(uri: str, compression: str | None) -> bytes:
    with _open_stream(uri, compression) as stream:
        return stream.read(SNIFF_BYTES)


def _check_gzip(uri: str, head: bytes) -> None:
    kind = _kind_of(head)
    if kind is None or kind[0] != "gzip-compressed data":
        what = kind[0] if kind else "not gzip-compressed data"
        raise InputError(
            f"{uri} is {what}, although its name ends in .gz; name it without .gz or compress it with gzip"
        )


def _kind_of(head: bytes) -> tuple[str, str] | None:
    """(what the bytes are, what to do) when they start like a format that is not text, else None."""
    return next(((kind, fix) for magic, kind, fix in MAGIC_BYTES if head.startswith(magic)), None)


def error_clause(error: Exception) -> str:
    """The first sentence of a library's error message, printable and short, to end a sentence of ours."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    message = lines[0].split(". ", 1)[0].rstrip(".")
    message = "".join(c if c.isprintable() else "?" for c in message)
    return message[:200] + "..." if len(message) > 200 else message


def _check_unique_columns(uri: str, columns: tuple[str, ...]) -> None:
    """Names compare exactly, as in Arrow, Parquet and JSON: 'url' and 'URL' are two columns, 'url' twice is
    an error (which of the two would be the url?)."""
    repeated = [name for name, count in collections.Counter(columns).items() if count > 1]
    if repeated:
        names = ", ".join(repr(name) for name in repeated)
        raise InputError(f"{uri} has more than one column named {names}; give every column its own name")


def _present(f: InputFile, columns: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The wanted columns that the file has, in the file's order (None: all of them)."""
    return None if columns is None else tuple(name for name in f.columns if name in columns)


def _read_parquet_rows(
    uri: str, start: int, num_rows: int, columns: tuple[str, ...] | None = None
) -> pa.Table:
    """Rows [start, start + num_rows) of a Parquet file; only the row groups that overlap them are read, and
    of those only `columns` when given."""
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
        wanted = None if columns is None else list(columns)
        if groups:
            table = parquet.read_row_groups(groups, columns=wanted)
        else:
            empty = parquet.schema_arrow.empty_table()
            table = empty if wanted is None else empty.select(wanted)
        return table.slice(start - (first_row or 0), num_rows)


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


# ---------------------------------------------------------------------------------------------------------
# CSV quoting


def _line_breaks(data: bytes, start: int, end: int) -> int:
    """How many line ends (\\n, \\r\\n or a lone \\r) data[start:end] holds."""
    return data.count(b"\n", start, end) + data.count(b"\r", start, end) - data.count(b"\r\n", start, end)


class _QuoteCheckedStream:
    """A CSV byte stream that follows pyarrow's quoting as pyarrow reads it, to catch a quote that never closes.

    pyarrow's rules (cpp/src/arrow/csv/parser.cc): a quote opens a value only at the start of a field, "" inside
    it is one quote, and the next lone quote closes it, after which the field goes on unquoted; with newlines
    in values allowed, an opening quote with no partner swallows every later line into one value, and those
    rows vanish without an error. Two shapes of that are refused: a quote still open at the end of the file,
    and a quoted value that runs over a line break and whose closing quote is followed by something other than
    a comma or a line end (the partner was some later value's opening quote). A quote inside a field (ab"c)
    is text, and so is what follows a one-line quoted value ("ab"c), as pyarrow reads them. Well-formed CSV
    is read as written, a quoted value over several lines included: no check can tell those from lines that
    a stray quote joined when the quotes happen to pair up.
    """

    def __init__(self, stream, uri: str, delimiter: bytes = b","):
        self.stream, self.uri = stream, uri
        self.ends_field = b"\r\n" + delimiter
        # A quoted value from its opening quote (one at a field start: not after a byte other than a delimiter
        # or line end) to its closing quote, or to the end of the data read so far; group 1 is the closing
        # quote, when there is one. The pattern starts with the quote so that the search for it runs in C.
        self.quoted_value = re.compile(rb'"(?<![^\r\n%s]")[^"]*(?:""[^"]*)*("?)' % re.escape(delimiter))
        self.rest_of_value = re.compile(rb'[^"]*(?:""[^"]*)*("?)')
        self.at_start = True
        self.previous: int | None = None  # the last byte read so far; None before the first
        self.line = 1  # the line that the next byte read is on
        self.in_quotes = False
        self.quote_pending = False  # in quotes, and the last byte read is a quote: a close or half of ""
        self.opened_on = 0
        self.spans_lines = False

    def read(self, nbytes: int = -1) -> bytes:
        data = self.stream.read(nbytes)
        self._follow(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self.stream.closed

    def close(self) -> None:
        self.stream.close()

    def drain(self, read_size: int = READ_CHUNK_BYTES) -> None:
        """Follow the rest of the file: raises if a quote open where pyarrow stopped never closes."""
        collections.deque(iter(lambda: self.read(read_size), b""), maxlen=0)  # read to the end

    def _follow(self, data: bytes) -> None:
        if not data:
            if self.in_quotes and not self.quote_pending:
                raise InputError(
                    f"{self.uri} line {self.opened_on}: the quote that opens a value there is never closed, so "
                    "every line after it would be read into that one value; close, double or remove that quote"
                )
            return
        if self.at_start and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]  # pyarrow skips a UTF-8 byte order mark
        self.at_start = False
        if not data:
            return
        if self.previous == 0x0D and data[0] == 0x0A:
            self.line -= 1  # a \r\n cut in two by the end of the previous read was counted twice
        pos = 0
        if self.quote_pending:
            self.quote_pending = False
            if data[0] == 0x22:
                pos = 1  # "" inside quotes
            else:
                self._close(data, 0)
        if self.in_quotes:
            rest = self.rest_of_value.match(data, pos)
            self.spans_lines = self.spans_lines or _line_breaks(data, pos, rest.end()) > 0
            if rest.end() == len(data):
                self.quote_pending = bool(rest.group(1))
                self._count_lines(data)
                return
            self._close(data, rest.end())
            pos = rest.end()
        elif data[0] == 0x22 and self.previous is not None and self.previous not in self.ends_field:
            pos = 1  # a quote inside a field that the previous read ended in
        # One step per quoted value: the C regex skips everything else.
        for value in self.quoted_value.finditer(data, pos):
            start, end = value.span()
            if end == len(data):
                self.in_quotes, self.quote_pending = True, bool(value.group(1))
                self.opened_on = self.line + _line_breaks(data, 0, start)
                self.spans_lines = _line_breaks(data, start, end) > 0
                break
            if data[end] not in self.ends_field and _line_breaks(data, start, end):
                self.in_quotes, self.spans_lines = True, True
                self.opened_on = self.line + _line_breaks(data, 0, start)
                self._close(data, end)
        self._count_lines(data)

    def _count_lines(self, data: bytes) -> None:
        self.line += _line_breaks(data, 0, len(data))
        self.previous = data[-1]

    def _close(self, data: bytes, after: int) -> None:
        """The quote just before data[after] closes the open value."""
        self.in_quotes = False
        if self.spans_lines and data[after] not in self.ends_field:
            closed_on = self.line + _line_breaks(data, 0, after)
            follower = data[after : after + 1].decode("utf-8", "replace")
            raise InputError(
                f"{self.uri} line {self.opened_on}: the quoted value that opens there runs over line breaks to "
                f"line {closed_on}, where its closing quote is followed by {follower!r} instead of a comma or a "
                f"line end, so the quote on line {self.opened_on} is unterminated and the lines between would be "
                "read as one value; close, double or remove that quote"
            )


# ---------------------------------------------------------------------------------------------------------
# JSONL rows


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


class _JsonlColumns:
    """A JSONL file's columns: every key of every row, in order of first appearance, each with its Arrow type
    as text, as inferred from the first batch of rows that holds a value for it ("null" until one does)."""

    def __init__(self) -> None:
        self.types: dict[str, str] = {}

    def add(self, rows: list[dict]) -> None:
        keys = dict.fromkeys(itertools.chain.from_iterable(rows))  # in C: cheap enough for every row
        for name in keys:
            if self.types.get(name, "null") == "null":
                self.types[name] = str(_json_column([row.get(name) for row in rows]).type)

    def columns(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.types), tuple(self.types.values())


def _jsonl_line_batches(uri: str, compression: str | None, columns: _JsonlColumns) -> Iterator[list[bytes]]:
    """The file's lines in batches, each row parsed (so that a bad row fails planning) and its keys recorded."""
    lines, row = _jsonl_lines(uri, compression), 0
    while batch := list(itertools.islice(lines, JSONL_LINES_PER_BATCH)):
        columns.add(
            [_parse_json_line(line, uri, row + i, _CHECKING_JSON_DECODER) for i, line in enumerate(batch)]
        )
        row += len(batch)
        yield batch


class _KeysSeenTwice(dict):
    """A JSON object in which some key appeared more than once (json keeps the last value)."""

    repeated: list[str]


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    twice = _KeysSeenTwice(value)
    twice.repeated = list(
        dict.fromkeys(k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1)
    )
    return twice


# Planning parses every row with this decoder, which notes repeated keys; reading parses the same rows again
# with the plain (faster) one.
_CHECKING_JSON_DECODER = json.JSONDecoder(object_pairs_hook=_json_object)
_JSON_DECODER = json.JSONDecoder()


def _parse_json_line(line: bytes, uri: str, row: int, decoder: json.JSONDecoder = _JSON_DECODER) -> dict:
    try:
        text = line.removeprefix(b"\xef\xbb\xbf").decode("utf-8")  # a byte order mark may open the file
    except UnicodeDecodeError as e:
        raise InputError(
            f"row {row} of {uri} is not UTF-8 text (byte {line[e.start]:#04x} at offset {e.start}); "
            "re-encode the file as UTF-8"
        ) from None
    try:
        value = decoder.decode(text)
    except ValueError as e:
        raise InputError(f"row {row} of {uri} is not valid JSON ({e}); fix or remove that line") from None
    if not isinstance(value, dict):
        raise InputError(
            f"row {row} of {uri} is a JSON {type(value).__name__}, not an object; each line must be one"
        )
    if isinstance(value, _KeysSeenTwice):
        # Readers disagree on which value of a repeated key wins (Python's json keeps the last, others the
        # first), so a url given twice could be vetted as one value and fetched as the other.
        names = ", ".join(repr(name) for name in value.repeated)
        raise InputError(f"row {row} of {uri} has the key {names} more than once; keep one value per key")
    return value


def _table_from_json_rows(rows: list[dict], known_keys: tuple[str, ...]) -> pa.Table:
    names = dict.fromkeys(known_keys)
    for row in rows:
        names.update(dict.fromkeys(row))
    # Never empty: planning checked that the url column is among the known keys.
    return pa.table({name: _json_column([row.get(name) for row in rows]) for name in names})


def _json_column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        # Mixed types in one column (a number here, a string there): keep each value's JSON text.
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string()
        )
