"""What an image's bytes say before any decoder runs: its format (from the signature, never the URL or the
Content-Type) and whether decoding it stays within a budget of pixels, memory and CPU. The resizer asks here
first, so that a small hostile file is refused with a reason instead of costing gigabytes or minutes.

Each check reads headers in Python at a cost that does not grow with the image, or scans bytes at C speed,
and bounds the work that the decoder (much of Pillow's header parsing is Python too) would otherwise do:
  JPEG  frame size; marker segments, stray bytes, quantization tables and EXIF entries before the first
        scan; the number of scans of progressive and arithmetic-coded files (each costs a pass over every
        block, whatever its size in bytes: 200 copies of one scan are 282 KB and five seconds at 8192 px).
  PNG   IHDR and animation frame sizes; the number of chunks (Pillow reads each one in Python, before and
        after the pixels) and of compressed metadata chunks; EXIF entries (eXIf, or hex in a text chunk).
        Inflating stops at the image's end: the resizer decodes PNGs with Pillow, which stops there, rather
        than with libpng, which inflates whatever the IDATs hold.
  GIF   the canvas (logical screen grown to the first frame, as Pillow grows it) and the blocks before the
        first frame. Only the first frame is ever read, so frames after it cost nothing.
  WebP  canvas and frame sizes (libwebp allocates the canvas when the file is opened), number of chunks
        (frames included) and EXIF entries.
  TIFF  size, tile and strip sizes (libtiff allocates one tile or strip at a time) and counts, number of tags
        in the image and EXIF directories. Later pages and sub-images are never read.
  BMP   size and palette; run-length files, which Pillow decodes in Python pixel by pixel, are capped lower.
  HDR   the size on the resolution line (OpenCV decodes before it checks anything).
"""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np

# Formats we know how to check before decoding; only these can be allowed. Names as Pillow's `format`.
CHECKED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HDR")
# Radiance HDR is left out by default: it decodes to 12 bytes a pixel, through OpenCV.
DEFAULT_ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# libtiff refuses JPEGs with more scans than this too; encoders write about 10 (progressive) or 1.
DEFAULT_MAX_JPEG_SCANS = 100

# Structural bounds: far above what encoders write, far below what makes a decoder's Python parsing slow.
MAX_JPEG_SEGMENTS = 1024  # marker segments before the first scan (Pillow parses each in Python)
MAX_JPEG_STRAY_BYTES = 16 * 1024  # fill and junk bytes between those segments (Pillow skips them one by one)
MAX_JPEG_QUANTIZATION_BYTES = 32 * 129  # 32 tables of 16-bit values; a decoder uses at most 4
MAX_EXIF_ENTRIES = 1024  # tags in one EXIF (or TIFF) directory, each unpacked in Python by Pillow
MAX_PNG_CHUNKS = 10_000
MAX_PNG_COMPRESSED_METADATA = 16  # zTXt, iTXt and iCCP chunks; Pillow inflates each up to 1 MiB
MAX_GIF_BLOCKS_BEFORE_FRAME = 4096  # extension sub-blocks and stray bytes before the first frame
MAX_WEBP_CHUNKS = 10_000  # an animation's frames are chunks
MAX_TIFF_BLOCKS = 1 << 16  # strips or tiles of the image (Pillow makes a Python tuple for each)
# A tile may hold more pixels than a small image up to this many (a 100x100 image in 256x256 tiles is fine).
TIFF_TILE_SLACK_PIXELS = 1 << 20
MAX_RLE_BMP_PIXELS = 1 << 20  # Pillow decodes RLE BMPs in Python, about a microsecond a pixel
MAX_HDR_HEADER_BYTES = 64 * 1024

_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Huffman-coded sequential frames: every scan spends at least a bit or two on each block it covers, so
# decoding costs no more per byte than any JPEG does and the scans need no counting.
_JPEG_SEQUENTIAL_HUFFMAN = frozenset({0xC0, 0xC1, 0xC3})
# Markers without a length, as Pillow reads them (it walks the header; libjpeg refuses the odd ones).
_JPEG_STANDALONE_MARKERS = frozenset(
    {0xC8, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, *range(0xF0, 0xFE)}
)
_JPEG_FILL = re.compile(rb"\xff+")
_EXIF_POINTER_TAGS = (34665, 34853, 40965)  # Exif, GPS and Interoperability directories
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
_HDR_RESOLUTION = re.compile(rb"-Y\s*\+?(\d+)\s*\+X\s*\+?(\d+)")
_SCAN_WINDOW = 4 << 20


def sniff_format(raw: bytes) -> str | None:
    """The format named by the signature at the start of `raw`: one of CHECKED_FORMATS, the name of a format
    we never decode (ICO, AVIF, ...), or None when no known signature matches."""
    head = raw[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"BM") and len(head) >= 18 and _u32le(head, 14) in _BMP_HEADER_SIZES:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head.startswith((b"#?RADIANCE", b"#?RGBE")):
        return "HDR"
    return _refused_format(head)


def _refused_format(head: bytes) -> str | None:
    """Names for signatures of formats we never decode, so that their refusal says what they are."""
    if head[:4] in (b"II+\x00", b"MM\x00+"):
        return "BigTIFF"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and head[4:6] != b"\x00\x00":
        return "ICO" if head[2] == 1 else "CUR"  # (a TGA can start alike, but never with images to count)
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"):
            return "HEIF"
        if brand in (b"jxl ",):
            return "JPEG XL"
        return None
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    prefixes = {
        b"8BPS": "PSD",
        b"%PDF": "PDF",
        b"%!PS": "PostScript",
        b"\xc5\xd0\xd3\xc6": "EPS",
        b"v/1\x01": "OpenEXR",
        b"qoif": "QOI",
        b"DDS ": "DDS",
        b"icns": "ICNS",
        b"gimp xcf": "XCF",
        b"\x0a\x05\x01": "PCX",
    }
    for prefix, name in prefixes.items():
        if head.startswith(prefix):
            return name
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "PNM"
    if head.startswith((b"PF\n", b"Pf\n", b"PF\r", b"Pf\r")):
        return "PFM"
    return None


def refusal(fmt: str, raw: bytes, max_image_pixels: int, max_jpeg_scans: int) -> str | None:
    """Why the bytes of this (sniffed, allowed) format must not be decoded, in one sentence; None if they may
    be. What the checks do not need (a missing scan, a cut-off pixel stream) is left to the decoder."""
    try:
        return _CHECKS[fmt](raw, max_image_pixels, max_jpeg_scans)
    except (struct.error, IndexError, KeyError, ValueError):
        # A header cut short or malformed where a bound is read. Decoders read such headers in their own
        # ways (Pillow keeps the TIFF tags it got before the cut), so what cannot be checked is refused.
        return _refused(f"the {fmt} header is cut short or malformed where its size is given")


def bomb_message(width: int, height: int, limit: int) -> str:
    return (
        f"refused before decoding, possible decompression bomb: header says {width}x{height} = "
        f"{width * height} pixels, above the limit of {limit}"
    )


def _refused(reason: str) -> str:
    return f"refused before decoding: {reason}"


# --- JPEG -------------------------------------------------------------------------------------------------


def _check_jpeg(raw: bytes, max_pixels: int, max_scans: int) -> str | None:
    size = len(raw)
    pos = 2  # after SOI
    segments = stray = quantization = 0
    frame = None
    while True:
        if pos >= size:
            return None  # no scan: the decoder reports the truncation
        if raw[pos] != 0xFF:
            marker_at = raw.find(b"\xff", pos)
            if marker_at < 0:
                return None
            stray += marker_at - pos
            pos = marker_at
        fill_end = _JPEG_FILL.match(raw, pos).end()  # type: ignore[union-attr]
        stray += fill_end - pos - 1
        pos = fill_end
        if stray > MAX_JPEG_STRAY_BYTES:
            return _refused(f"the JPEG has more than {MAX_JPEG_STRAY_BYTES} stray bytes between its headers")
        if pos >= size:
            return None
        marker = raw[pos]
        pos += 1
        if marker == 0x00:  # an escaped 0xFF outside any scan: junk, skipped like the rest
            stray += 2
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            return None  # end of image before any scan
        if marker < 0xC0:
            return None  # not a marker to Pillow or libjpeg: both refuse the file
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return _refused(
                f"the JPEG has more than {MAX_JPEG_SEGMENTS} marker segments before its first scan"
            )
        length = (raw[pos] << 8) | raw[pos + 1]
        if marker in _JPEG_SOF_MARKERS:
            height, width = struct.unpack_from(">HH", raw, pos + 3)
            if width * height > max_pixels:
                return bomb_message(width, height, max_pixels)
            frame = marker
        elif marker == 0xDB:
            quantization += length
            if quantization > MAX_JPEG_QUANTIZATION_BYTES:
                return _refused(
                    f"the JPEG holds more than {MAX_JPEG_QUANTIZATION_BYTES} bytes of quantization tables"
                )
        elif marker == 0xE1 and raw.startswith(b"Exif\x00\x00", pos + 2):
            reason = _exif_refusal(raw, pos + 8, pos + length)
            if reason is not None:
                return reason
        elif marker == 0xDA:
            break
        pos += length
    if frame is None or frame in _JPEG_SEQUENTIAL_HUFFMAN:
        return None
    scans = _count_pair(raw, pos - 2, 0xFF, 0xDA)
    if scans > max_scans:
        return _refused(f"the JPEG has {scans} scans, above the limit of {max_scans} (max_jpeg_scans)")
    return None


def _count_pair(raw: bytes, start: int, first: int, second: int) -> int:
    """How many times the two bytes `first, second` occur in raw[start:], at C speed and in bounded memory
    (numpy over windows is about three times faster than bytes.count for a two-byte needle)."""
    count = 0
    for begin in range(start, len(raw) - 1, _SCAN_WINDOW):
        window = np.frombuffer(raw, np.uint8, count=min(_SCAN_WINDOW + 1, len(raw) - begin), offset=begin)
        candidates = np.flatnonzero(window[:-1] == first)
        count += int(np.count_nonzero(window[candidates + 1] == second))
    return count


# --- EXIF and TIFF directories ----------------------------------------------------------------------------


def _exif_refusal(raw: bytes, start: int, end: int) -> str | None:
    """Bound the first directory of a TIFF-structured EXIF block at raw[start:end], which Pillow unpacks."""
    if end - start < 8 or raw[start : start + 2] not in (b"II", b"MM"):
        return None
    order = "<" if raw[start] == 0x49 else ">"
    (ifd,) = struct.unpack_from(order + "I", raw, start + 4)
    if start + ifd + 2 > end:
        return None
    (entries,) = struct.unpack_from(order + "H", raw, start + ifd)
    if entries > MAX_EXIF_ENTRIES:
        return _refused(f"its EXIF directory has {entries} entries, above the limit of {MAX_EXIF_ENTRIES}")
    return None


def _tiff_entries(raw: bytes, order: str, ifd: int) -> dict[int, list[tuple[int, int, int]]]:
    """Tag -> [(type, count, position of the value field)] for one directory, whose size is already bounded."""
    (count,) = struct.unpack_from(order + "H", raw, ifd)
    entries: dict[int, list[tuple[int, int, int]]] = {}
    record = struct.Struct(order + "HHI")
    for position in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind, values = record.unpack_from(raw, position)
        entries.setdefault(tag, []).append((kind, values, position + 8))
    return entries


# Integer types (BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG, IFD): Pillow and libtiff accept them all for sizes.
_TIFF_INTEGERS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I"}
_TIFF_SIZE_TAGS = (256, 257, 277, 278, 284, 322, 323, 273, 279, 324, 325, *_EXIF_POINTER_TAGS)


def _tiff_value(raw: bytes, order: str, tags: dict, tag: int, default: int | None) -> int | None:
    """The first value of an integer tag, inline or at its offset."""
    if tag not in tags:
        return default
    ((kind, count, field),) = tags[tag]  # one entry each: _check_tiff refuses repeated size tags
    code = _TIFF_INTEGERS[kind]  # KeyError for a size given as a fraction or text: malformed
    offset = field
    if count * struct.calcsize(code) > 4:
        (offset,) = struct.unpack_from(order + "I", raw, field)
    (value,) = struct.unpack_from(order + code, raw, offset)
    if value < 0:
        raise ValueError(f"tag {tag} is negative")
    return value


def _check_tiff(raw: bytes, max_pixels: int, max_scans: int) -> str | None:
    order = "<" if raw[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", raw, 4)
    (count,) = struct.unpack_from(order + "H", raw, ifd)
    if count > MAX_EXIF_ENTRIES:
        return _refused(f"the TIFF directory has {count} entries, above the limit of {MAX_EXIF_ENTRIES}")
    tags = _tiff_entries(raw, order, ifd)
    repeated = [tag for tag in _TIFF_SIZE_TAGS if len(tags.get(tag, ())) > 1]
    if repeated:
        # Pillow keeps the first of a repeated tag; libtiff may not, so neither may be trusted.
        return _refused(f"the TIFF directory repeats tag {repeated[0]}, which gives a size")
    width = _tiff_value(raw, order, tags, 256, None)
    height = _tiff_value(raw, order, tags, 257, None)
    if width is None or height is None:
        return None
    if width * height > max_pixels:
        return bomb_message(width, height, max_pixels)
    samples = _tiff_value(raw, order, tags, 277, 1) or 1
    if samples > 16:
        return _refused(f"the TIFF has {samples} samples per pixel")
    planes = samples if _tiff_value(raw, order, tags, 284, 1) == 2 else 1

    if 322 in tags or 323 in tags:  # tiled: libtiff allocates one whole tile, whatever the image's size
        tile_width = _tiff_value(raw, order, tags, 322, 0)
        tile_height = _tiff_value(raw, order, tags, 323, 0)
        if not tile_width or not tile_height:
            return _refused(f"the TIFF's tiles are {tile_width}x{tile_height}")
        allowed = min(max_pixels, max(width * height, TIFF_TILE_SLACK_PIXELS))
        if tile_width * tile_height > allowed:
            return _refused(
                f"the TIFF's {tile_width}x{tile_height} tiles are too large for its {width}x{height} image "
                f"(at most {allowed} pixels a tile)"
            )
        blocks = -(-width // tile_width) * -(-height // tile_height) * planes
        kind = "tiles"
    else:
        rows = _tiff_value(raw, order, tags, 278, height) or height
        blocks = -(-height // max(1, min(rows, height))) * planes if height else planes
        kind = "strips"
    if blocks > MAX_TIFF_BLOCKS:
        return _refused(f"the TIFF is cut into {blocks} {kind}, above the limit of {MAX_TIFF_BLOCKS}")
    listed = max((tags[tag][0][1] for tag in (273, 279, 324, 325) if tag in tags), default=0)
    if listed > blocks:
        return _refused(f"the TIFF lists {listed} strips or tiles where its layout has {blocks}")
    for tag in _EXIF_POINTER_TAGS:
        pointer = _tiff_value(raw, order, tags, tag, None)
        if pointer is not None and pointer + 2 <= len(raw):
            (entries,) = struct.unpack_from(order + "H", raw, pointer)
            if entries > MAX_EXIF_ENTRIES:
                return _refused(
                    f"its EXIF directory has {entries} entries, above the limit of {MAX_EXIF_ENTRIES}"
                )
    return None


# --- PNG --------------------------------------------------------------------------------------------------


def _check_png(raw: bytes, max_pixels: int, max_scans: int) -> str | None:
    pos, chunks, compressed = 8, 0, 0
    size = len(raw)
    while pos + 8 <= size:
        (length,) = struct.unpack_from(">I", raw, pos)
        kind = raw[pos + 4 : pos + 8]
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            return _refused(f"the PNG has more than {MAX_PNG_CHUNKS} chunks")
        if kind in (b"IHDR", b"fcTL"):  # Pillow takes the last IHDR, so each must pass; so must frames
            width, height = struct.unpack_from(">II", raw, pos + (8 if kind == b"IHDR" else 12))
            if width * height > max_pixels:
                return bomb_message(width, height, max_pixels)
        if kind in (b"zTXt", b"iTXt", b"iCCP"):
            compressed += 1
            if compressed > MAX_PNG_COMPRESSED_METADATA:
                return _refused(
                    f"the PNG has more than {MAX_PNG_COMPRESSED_METADATA} compressed text or profile chunks"
                )
        if kind in (b"tEXt", b"zTXt", b"iTXt") and raw.startswith(_RAW_EXIF_KEYWORD, pos + 8):
            # Pillow reads EXIF from this text (hex, as ImageMagick writes it) when there is no eXIf chunk.
            exif = _raw_profile_exif(kind, raw[pos + 8 + len(_RAW_EXIF_KEYWORD) : pos + 8 + length])
            if exif is not None:
                reason = _exif_refusal(exif, 6 if exif.startswith(b"Exif\x00\x00") else 0, len(exif))
                if reason is not None:
                    return reason
        elif kind == b"eXIf":
            reason = _exif_refusal(raw, pos + 8, min(size, pos + 8 + length))
            if reason is not None:
                return reason
        elif kind == b"IEND":
            break
        pos += 12 + length
    return None


_RAW_EXIF_KEYWORD = b"Raw profile type exif\x00"


def _raw_profile_exif(kind: bytes, data: bytes) -> bytes | None:
    """The EXIF bytes in a "Raw profile type exif" text chunk (after its keyword), as Pillow would read them:
    inflated up to Pillow's 1 MiB cap, then hex after three header lines. None if Pillow would find none."""
    if kind == b"iTXt":
        compressed = data[:1] == b"\x01"
        _, _, data = data[2:].partition(b"\x00")  # language tag
        _, _, data = data.partition(b"\x00")  # translated keyword
    else:
        compressed = kind == b"zTXt"
        data = data[1:] if compressed else data  # compression method
    if compressed:
        try:
            data = zlib.decompressobj().decompress(data, 1 << 20)
        except zlib.error:
            return None
    lines = data.split(b"\n", 3)
    try:
        return bytes.fromhex(lines[3].decode("latin-1")) if len(lines) == 4 else None
    except ValueError:
        return None


# --- GIF --------------------------------------------------------------------------------------------------


def _check_gif(raw: bytes, max_pixels: int, max_scans: int) -> str | None:
    screen_width, screen_height = struct.unpack_from("<HH", raw, 6)
    flags = raw[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    size = len(raw)
    blocks = 0
    while pos < size:
        introducer = raw[pos]
        if introducer == 0x2C:  # the first frame: Pillow grows the canvas to hold it, then allocates
            x, y, frame_width, frame_height = struct.unpack_from("<HHHH", raw, pos + 1)
            width = max(screen_width, x + frame_width)
            height = max(screen_height, y + frame_height)
            if width * height > max_pixels:
                return bomb_message(width, height, max_pixels)
            return None
        if introducer == 0x3B:
            return None
        if introducer == 0x21:
            pos += 2
            while pos < size:
                length = raw[pos]
                pos += 1 + length
                blocks += 1
                if not length:
                    break
                if blocks > MAX_GIF_BLOCKS_BEFORE_FRAME:
                    break
        else:
            pos += 1  # a stray byte, which Pillow skips too
            blocks += 1
        if blocks > MAX_GIF_BLOCKS_BEFORE_FRAME:
            return _refused(
                f"the GIF has more than {MAX_GIF_BLOCKS_BEFORE_FRAME} blocks before its first frame"
            )
    return None


# --- WebP -------------------------------------------------------------------------------------------------


def _check_webp(raw: bytes, max_pixels: int, max_scans: int) -> str | None:
    pos, chunks = 12, 0
    size = min(len(raw), 8 + _u32le(raw, 4))  # libwebp reads no further than the RIFF size
    while pos + 8 <= size:
        fourcc = raw[pos : pos + 4]
        (length,) = struct.unpack_from("<I", raw, pos + 4)
        data = pos + 8
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            return _refused(f"the WebP has more than {MAX_WEBP_CHUNKS} chunks (frames included)")
        dimensions = None
        if fourcc == b"VP8X" and length >= 10:
            dimensions = 1 + _u24le(raw, data + 4), 1 + _u24le(raw, data + 7)
        elif fourcc == b"ANMF" and length >= 16:
            dimensions = 1 + _u24le(raw, data + 6), 1 + _u24le(raw, data + 9)
        elif fourcc == b"VP8 " and length >= 10 and raw[data + 3 : data + 6] == b"\x9d\x01\x2a":
            width, height = struct.unpack_from("<HH", raw, data + 6)
            dimensions = width & 0x3FFF, height & 0x3FFF
        elif fourcc == b"VP8L" and length >= 5 and raw[data] == 0x2F:
            (bits,) = struct.unpack_from("<I", raw, data + 1)
            dimensions = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        elif fourcc == b"EXIF":
            start = data + 6 if raw.startswith(b"Exif\x00\x00", data) else data
            reason = _exif_refusal(raw, start, min(size, data + length))
            if reason is not None:
                return reason
        if dimensions is not None and dimensions[0] * dimensions[1] > max_pixels:
            return bomb_message(*dimensions, max_pixels)
        pos = data + length + (length & 1)
    return None


# --- BMP, HDR ---------------------------------------------------------------------------------------------


def _check_bmp(raw: bytes, max_pixels: int, max_scans: int) -> str | None:
    header = _u32le(raw, 14)
    if header == 12:
        width, height, _, bits = struct.unpack_from("<HHHH", raw, 18)
        compression = colors = 0
    else:
        width, height, _, bits, compression = struct.unpack_from("<IIHHI", raw, 18)
        (colors,) = struct.unpack_from("<I", raw, 46)
        if raw[25] == 0xFF:  # negative: stored top-down
            height = 2**32 - height
    if width * height > max_pixels:
        return bomb_message(width, height, max_pixels)
    if compression in (1, 2) and width * height > MAX_RLE_BMP_PIXELS:
        return _refused(
            f"the BMP is run-length encoded at {width}x{height}, and such files are decoded in Python, "
            f"so at most {MAX_RLE_BMP_PIXELS} pixels are accepted"
        )
    if bits <= 8 and colors > 1 << bits:
        return _refused(f"the {bits}-bit BMP claims a palette of {colors} colours")
    return None


def _check_hdr(raw: bytes, max_pixels: int, max_scans: int) -> str | None:
    end = raw.find(b"\n\n", 0, MAX_HDR_HEADER_BYTES)
    if end < 0:
        return _refused(f"the Radiance HDR header does not end within {MAX_HDR_HEADER_BYTES} bytes")
    # OpenCV reads the header in lines of at most 127 bytes and may end it sooner than the blank line (at a
    # line that starts with NUL, say), then sscanf()s "-Y %d +X %d" from the next line. Every such pattern
    # up to the line after the blank one must pass, whichever OpenCV ends up reading.
    sizes = _HDR_RESOLUTION.findall(raw, 0, end + 2 + 256)
    if not sizes:
        return _refused("the Radiance HDR header has no -Y rows +X columns line")
    height, width = max(sizes, key=lambda size: int(size[0]) * int(size[1]))
    if int(width) * int(height) > max_pixels:
        return bomb_message(int(width), int(height), max_pixels)
    return None


def _u32le(raw: bytes, offset: int) -> int:
    return struct.unpack_from("<I", raw, offset)[0]


def _u24le(raw: bytes, offset: int) -> int:
    return raw[offset] | raw[offset + 1] << 8 | raw[offset + 2] << 16


_CHECKS = {
    "JPEG": _check_jpeg,
    "PNG": _check_png,
    "GIF": _check_gif,
    "WEBP": _check_webp,
    "BMP": _check_bmp,
    "TIFF": _check_tiff,
    "HDR": _check_hdr,
}
