"""Ingest stage 1: read URL+caption lists (Parquet, CSV, TSV, JSONL; plain or gzip) from a file, folder or glob,
local or S3, and split them into deterministic shards: shard N holds the input rows whose row_index lies in
[N * samples_per_shard, (N + 1) * samples_per_shard), counting files in sorted path order and rows in file order.
Text files are copied once into Parquet under the output (_input_cache/), so a shard reads only its row groups.
"""

from __future__ import annotations

import codecs
import collections
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
from pipelines.entrypoint import JobError
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
# How much of a file's start is looked at to tell whether its bytes are what its name says.
SNIFF_BYTES = 1 << 16
INSPECT_THREADS = 16
# Text inputs are converted once to Parquet here (inside the output), one file per input file.
INPUT_CACHE_DIR = "_input_cache"
# A JSONL file's cached copy keeps each line's raw bytes: types are inferred per slice, exactly as from the text.
JSONL_LINE_COLUMN = "line"
JSONL_LINES_PER_BATCH = 8192
# Recorded with each cached copy: a copy made by a reader that checked less (JSONL columns from the first
# rows only, CSV quotes unchecked) is made again.
INPUT_CACHE_VERSION = 2

FORMAT_NAMES = {"parquet": "Parquet", "csv": "CSV", "tsv": "TSV", "jsonl": "JSONL"}
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


def _open_stream(uri: str, compression: str | None):
    fs, path = storage.pyarrow_filesystem(uri)
    return fs.open_input_stream(path, compression=compression)


# ---------------------------------------------------------------------------------------------------------
# Telling what a file is: a name says a format, the bytes may say otherwise (a zip named .csv, plain text
# named .gz, a Parquet file that is not one, Latin-1 text). Each mismatch is one sentence, not a parser error.


def _kind_of(head: bytes) -> tuple[str, str] | None:
    """(what the bytes are, what to do) when they start like a format that is not text, else None."""
    return next(((kind, fix) for magic, kind, fix in MAGIC_BYTES if head.startswith(magic)), None)


def _check_content(uri: str, fmt: str, compression: str | None) -> None:
    """Raise InputError (one sentence) when the start of the file is not what its name or input_format says."""
    with _open_stream(uri, None) as stream:
        head = stream.read(SNIFF_BYTES)
    kind = _kind_of(head)
    if compression == "gzip":
        if kind is None or kind[0] != "gzip-compressed data":
            what = kind[0] if kind else "not gzip-compressed data"
            raise InputError(
                f"{uri} is {what}, although its name ends in .gz; name it without .gz or compress it with gzip"
            )
        if fmt == "parquet":
            raise InputError(
                f"{uri} is a gzip-compressed file, and Parquet inputs cannot be compressed as a whole; gunzip it "
                "(Parquet compresses its own pages)"
            )
        with _open_stream(uri, compression) as stream:
            head = stream.read(SNIFF_BYTES)
        kind = _kind_of(head)
    if fmt == "parquet":
        if kind is not None and kind[0] != "a Parquet file":
            raise InputError(f"{uri} is {kind[0]}, not a Parquet file; {kind[1]}")
        if not head.startswith(b"PAR1"):
            what = "empty" if not head else "not a Parquet file (it does not start with the bytes PAR1)"
            raise InputError(f"{uri} is {what}; check the input and its format")
        return
    name = FORMAT_NAMES[fmt]
    if kind is not None:
        raise InputError(f"{uri} is {kind[0]}, not {name} text; {kind[1]}")
    if b"\x00" in head:
        raise InputError(f"{uri} holds NUL bytes, so it is binary data, not {name} text; check the input")
    try:
        # The last character may be cut in two by the end of the sample.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
    except UnicodeDecodeError as e:
        raise InputError(
            f"{uri} is not UTF-8 text (byte {head[e.start]:#04x} at offset {e.start}); re-encode it as UTF-8"
        ) from None


def _error_clause(error: Exception) -> str:
    """The first sentence of a library's error message, printable and short, to end a sentence of ours."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    message = lines[0].split(". ", 1)[0].rstrip(".")
    message = "".join(c if c.isprintable() else "?" for c in message)
    return message[:200] + "..." if len(message) > 200 else message


def _read_failure(uri: str, fmt: str, compression: str | None, error: Exception) -> InputError:
    """A parser's or decompressor's error as one sentence that names the file and the format it was read as."""
    message = _error_clause(error)
    if "invalid UTF8" in message:
        return InputError(f"{uri} is not UTF-8 text ({message}); re-encode it as UTF-8")
    what = FORMAT_NAMES.get(fmt, fmt)
    return InputError(
        f"cannot read {uri} as {what}{' (gzip)' if compression else ''}: {message}; check that it is a "
        f"complete {what} file"
    )


# ---------------------------------------------------------------------------------------------------------
# Streaming the rows of one file


def _csv_parse_options(fmt: str) -> pacsv.ParseOptions:
    if fmt == "tsv":
        # TSV has no quoting: a caption that starts with '"' must not swallow the lines after it.
        return pacsv.ParseOptions(delimiter="\t", quote_char=False)
    return pacsv.ParseOptions(delimiter=",", newlines_in_values=True)


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


@contextlib.contextmanager
def _csv_stream(uri: str, fmt: str, compression: str | None) -> Iterator:
    with _open_stream(uri, compression) as stream:
        if fmt != "csv":
            yield stream  # TSV is read without quoting, so no quote can swallow lines there
            return
        checked = _QuoteCheckedStream(stream, uri)
        try:
            yield checked
        except pa.ArrowInvalid:
            # pyarrow may give up on a block that a runaway quote made one unfinished row before it reads the
            # end of the file; the quote, not pyarrow's symptom, is what to report.
            if checked.in_quotes:
                checked.drain()
            raise


def _csv_header(uri: str, fmt: str, compression: str | None) -> tuple[str, ...]:
    with _csv_stream(uri, fmt, compression) as stream:
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
    with _csv_stream(uri, fmt, compression) as stream:
        yield from pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=_csv_parse_options(fmt),
            convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in columns}),
        )


def _check_unique_columns(uri: str, columns: tuple[str, ...]) -> None:
    """Names compare exactly, as in Arrow, Parquet and JSON: 'url' and 'URL' are two columns, 'url' twice is
    an error (which of the two would be the url?)."""
    repeated = [name for name, count in collections.Counter(columns).items() if count > 1]
    if repeated:
        names = ", ".join(repr(name) for name in repeated)
        raise InputError(f"{uri} has more than one column named {names}; give every column its own name")


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


def inspect_file(uri: str, fmt: str, compression: str | None) -> InputFile:
    """Row count and column names of one file: from Parquet metadata, or by streaming a text file once."""
    if fmt not in FORMAT_NAMES:
        raise InputError(f"unsupported input format {fmt!r}; use parquet, csv, tsv or jsonl")
    try:
        _check_content(uri, fmt, compression)
        if fmt == "parquet":
            fs, path = storage.pyarrow_filesystem(uri)
            with fs.open_input_file(path) as f:
                metadata = pq.ParquetFile(f).metadata
                schema = metadata.schema.to_arrow_schema()
                _check_unique_columns(uri, tuple(schema.names))
                types = tuple(str(t) for t in schema.types)
                return InputFile(uri, fmt, compression, metadata.num_rows, tuple(schema.names), types)
        if fmt in ("csv", "tsv"):
            columns = _csv_header(uri, fmt, compression)
            _check_unique_columns(uri, columns)
            num_rows = sum(batch.num_rows for batch in _csv_batches(uri, fmt, compression, columns))
            return InputFile(uri, fmt, compression, num_rows, columns, ("string",) * len(columns))
        keys = _JsonlColumns()
        num_rows = sum(len(batch) for batch in _jsonl_line_batches(uri, compression, keys))
        return InputFile(uri, fmt, compression, num_rows, *keys.columns())
    except InputError:
        raise
    except (OSError, pa.ArrowException, EOFError) as e:
        raise _read_failure(uri, fmt, compression, e) from None


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
        raise InputError(f"cannot read rows {piece.start}-{end} of {f.uri}: {_error_clause(e)}") from None
    raise InputError(f"unsupported input format {f.format!r}; use parquet, csv, tsv or jsonl")


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
    that a slice's types are inferred from its own rows exactly as from the text (every row is parsed on the
    way, for the file's columns: every key of every row). A JSON marker beside the copy, written last,
    records the source (URI, size, modification time, INPUT_CACHE_VERSION): a later call for the same source
    reuses the copy without reading the source, and an unfinished conversion is done again. The file is
    streamed batch by batch into a local scratch file, never held in memory whole.
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
            "reader": INPUT_CACHE_VERSION,
        }
    except (OSError, pa.ArrowException) as e:
        raise _read_failure(uri, fmt, compression, e) from None
    if storage.exists(marker_uri):
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):  # unreadable: made again
            marker = json.loads(storage.read_bytes(marker_uri))
            if marker.get("source") == source and storage.exists(parquet_uri):
                columns, types = tuple(marker["columns"]), tuple(marker["column_types"])
                return InputFile(uri, fmt, compression, int(marker["num_rows"]), columns, types, parquet_uri)
        # Another source (the input changed): the copy is stale until the new marker is written.
        storage.delete(marker_uri)
    with tempfile.TemporaryDirectory(prefix="input-cache-") as scratch:
        local = Path(scratch) / "rows.parquet"
        try:
            _check_content(uri, fmt, compression)
            if fmt in ("csv", "tsv"):
                columns = _csv_header(uri, fmt, compression)
                _check_unique_columns(uri, columns)
                schema = pa.schema([(name, pa.string()) for name in columns])
                batches = _csv_batches(uri, fmt, compression, columns)
                num_rows = _write_row_groups(batches, schema, local, rows_per_group)
                types = ("string",) * len(columns)
            elif fmt == "jsonl":
                schema = pa.schema([(JSONL_LINE_COLUMN, pa.binary())])
                keys = _JsonlColumns()
                batches = (
                    pa.record_batch([pa.array(lines, pa.binary())], schema=schema)
                    for lines in _jsonl_line_batches(uri, compression, keys)
                )
                num_rows = _write_row_groups(batches, schema, local, rows_per_group)
                columns, types = keys.columns()
            else:
                raise InputError(f"unsupported text input format {fmt!r}; use csv, tsv or jsonl")
        except InputError:
            raise
        except (OSError, pa.ArrowException, EOFError) as e:
            raise _read_failure(uri, fmt, compression, e) from None
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
