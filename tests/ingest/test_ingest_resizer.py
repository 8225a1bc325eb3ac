"""Tests for pipelines/ingest/resizer.py: decoding of every format we accept, EXIF orientation, alpha,
bit depth, refusals (formats not allowed, and hostile headers caught by image_headers before decoding), and
parity of sizes and pixels with img2dataset's Resizer."""

import hashlib
import io
import os
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from pipelines.ingest import image_headers
from pipelines.ingest.resizer import Resizer, ResizerConfig, output_size
from tests import image_bombs as bombs
from tests.image_bombs import png_header_only

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
cv2.setNumThreads(1)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def decode_output(result) -> np.ndarray:
    """Output bytes -> HxWx3 RGB, decoded by OpenCV independently of the code under test."""
    assert result.status == "success", result.error_message
    bgr = cv2.imdecode(np.frombuffer(result.image, np.uint8), cv2.IMREAD_UNCHANGED)
    assert bgr.ndim == 3 and bgr.shape[2] == 3 and bgr.dtype == np.uint8
    assert (result.width, result.height) == (bgr.shape[1], bgr.shape[0])
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.int32)


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields plus grain, so that resampling differences show up as they would on photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(max(2, height // 32), max(2, width // 32), 3)).astype(np.float32)
    pixels = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    pixels += rng.normal(0, 4, size=pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def quadrants(width: int, height: int) -> np.ndarray:
    """An image whose every flip and rotation looks different: four coloured quadrants, sides unequal."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2, : width // 2] = RED
    pixels[: height // 2, width // 2 :] = GREEN
    pixels[height // 2 :, : width // 2] = BLUE
    pixels[height // 2 :, width // 2 :] = WHITE
    return pixels


LOSSLESS = ResizerConfig(resize_mode="no", output_format="png")


@pytest.mark.parametrize(
    "fmt, mode, params",
    [
        ("JPEG", "RGB", {"quality": 95}),
        ("JPEG", "L", {"quality": 95}),
        ("PNG", "RGB", {}),
        ("PNG", "L", {}),
        ("WEBP", "RGB", {"lossless": True}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {}),
        ("TIFF", "RGB", {"compression": "tiff_lzw"}),
    ],
)
def test_every_format_decodes_to_rgb_of_the_right_size(fmt, mode, params):
    source = Image.fromarray(quadrants(64, 48))
    if mode == "L":
        source = source.convert("L")
    elif mode == "P":
        source = source.quantize(4)
    raw = encoded(source, fmt, **params)
    result = Resizer(LOSSLESS)(raw)
    pixels = decode_output(result)
    assert (result.width, result.height, result.original_width, result.original_height) == (64, 48, 64, 48)
    assert result.format == "png" and result.error_message is None
    # Exactly what Pillow decodes, and close to what was encoded (JPEG blurs the quadrant edges).
    reference = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int32)
    assert np.array_equal(pixels, reference)
    expected = np.asarray(source.convert("RGB"), dtype=np.int32)
    assert np.abs(pixels - expected).mean() < (5.0 if fmt == "JPEG" else 0.01)


# The transpose that stores an upright image so that EXIF orientation N brings it back upright.
STORED_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def jpeg_with_orientation(upright: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(upright)
    if STORED_FOR_ORIENTATION[orientation] is not None:
        image = image.transpose(STORED_FOR_ORIENTATION[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = encoded(image, "JPEG", quality=95, exif=exif.tobytes())
    # Pillow's own exif_transpose as a referee: the stored image really is upright once the tag is applied.
    check = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(raw))), dtype=np.int32)
    assert np.abs(check - upright.astype(np.int32)).mean() < 3.0
    return raw


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_image_with_swapped_sides(orientation):
    upright = quadrants(96, 48)
    raw = jpeg_with_orientation(upright, orientation)
    stored = Image.open(io.BytesIO(raw)).size
    assert stored == ((48, 96) if orientation >= 5 else (96, 48))
    result = Resizer(LOSSLESS)(raw)
    pixels = decode_output(result)
    assert (result.width, result.height) == (96, 48)
    assert (result.original_width, result.original_height) == (96, 48)
    assert np.abs(pixels - upright.astype(np.int32)).mean() < 3.0


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_with_reduced_decode_resizes_the_upright_image(orientation):
    # Large enough that the JPEG is decoded at 1/4 or 1/8 scale: the draft must be asked in the stored frame.
    upright = quadrants(1600, 800)
    raw = jpeg_with_orientation(upright, orientation)
    for mode, size in [
        ("keep_ratio", (200, 100)),
        ("keep_ratio_largest", (100, 50)),
        ("center_crop", (100, 100)),
    ]:
        result = Resizer(ResizerConfig(image_size=100, resize_mode=mode, output_format="png"))(raw)
        pixels = decode_output(result)
        assert (result.width, result.height) == size
        expected = cv2.resize(
            upright, (size[0] if mode != "center_crop" else 200, size[1]), interpolation=cv2.INTER_AREA
        )
        if mode == "center_crop":
            expected = expected[:, 50:150]
        assert np.abs(pixels - expected.astype(np.int32)).mean() < 3.0


def test_alpha_is_flattened_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)  # transparent black everywhere...
    rgba[:4, :, :] = (255, 0, 0, 255)  # ...except an opaque red top half
    rgba[4:, :4, :] = (255, 0, 0, 128)  # and half-transparent red bottom-left
    for image in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba[..., [0, 3]], "LA")):
        result = Resizer(LOSSLESS)(encoded(image, "PNG"))
        pixels = decode_output(result)
        opaque, half = (255, 0, 0), (255, 127, 127)
        if image.mode == "LA":
            opaque, half = (255, 255, 255), (255, 255, 255)
        assert tuple(pixels[0, 0]) == opaque
        assert np.abs(pixels[6, 1] - np.array(half)).max() <= 1
        assert tuple(pixels[6, 6]) == WHITE


def test_palette_with_transparency_becomes_white_where_transparent():
    indices = np.zeros((10, 10), np.uint8)
    indices[:, 5:] = 1
    palette = Image.fromarray(indices, "P")
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    for fmt in ("PNG", "GIF"):
        raw = encoded(palette, fmt, transparency=0)
        pixels = decode_output(Resizer(LOSSLESS)(raw))
        assert tuple(pixels[0, 0]) == WHITE, fmt
        assert tuple(pixels[0, 9]) == BLUE, fmt


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 10), color) for color in (RED, GREEN, BLUE)]
    raw = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(raw)).n_frames == 3
    pixels = decode_output(Resizer(LOSSLESS)(raw))
    assert pixels.shape == (10, 20, 3)
    assert np.abs(pixels - np.array(RED)).max() <= 2


def test_sixteen_bit_images_become_eight_bit_rgb():
    gray16 = np.full((6, 10), 65535, np.uint16)
    gray16[:, 5:] = 32896  # 128 * 257
    ok, png = cv2.imencode(".png", gray16)
    assert ok and Image.open(io.BytesIO(png.tobytes())).mode.startswith("I")
    pixels = decode_output(Resizer(LOSSLESS)(png.tobytes()))
    assert tuple(pixels[0, 0]) == WHITE and tuple(pixels[0, 9]) == (128, 128, 128)

    rgb16 = np.zeros((6, 10, 3), np.uint16)
    rgb16[..., 2] = 65535  # OpenCV is BGR: this is red
    rgb16[..., 1] = 257 * 64
    ok, png = cv2.imencode(".png", rgb16)
    pixels = decode_output(Resizer(LOSSLESS)(png.tobytes()))
    assert tuple(pixels[3, 3]) == (255, 64, 0)

    tiff16 = encoded(Image.fromarray(gray16), "TIFF")
    pixels = decode_output(Resizer(LOSSLESS)(tiff16))
    assert tuple(pixels[0, 0]) == WHITE and tuple(pixels[0, 9]) == (128, 128, 128)


def test_cmyk_jpeg_decodes_to_rgb():
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    raw = encoded(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(raw)).mode == "CMYK"
    for config in (LOSSLESS, ResizerConfig(image_size=8, resize_mode="keep_ratio", output_format="png")):
        pixels = decode_output(Resizer(config)(raw))
        assert np.abs(pixels - np.array(RED)).max() <= 3


def red_hdr(width: int = 16, height: int = 12) -> bytes:
    """A Radiance HDR (float pixels in linear light, read by OpenCV only) that is pure red."""
    hdr = np.zeros((height, width, 3), np.float32)
    hdr[..., 2] = 1.0  # BGR: red
    ok, raw = cv2.imencode(".hdr", hdr)
    assert ok
    return raw.tobytes()


def test_radiance_hdr_is_refused_by_default_and_decoded_by_opencv_when_allowed():
    raw = red_hdr()
    result = Resizer(LOSSLESS)(raw)
    assert result.status == "failed_to_decode"
    assert result.error_message.startswith("format HDR is not allowed")
    allowed = ResizerConfig(resize_mode="no", output_format="png", allowed_formats=("jpeg", "hdr"))
    result = Resizer(allowed)(raw)
    pixels = decode_output(result)
    assert (result.width, result.height) == (16, 12)
    assert np.abs(pixels - np.array(RED)).max() <= 2
    # OpenCV decodes before it checks anything: an allowed HDR is refused from its resolution line.
    for width, height in [(10_000, 10_000), (100_000, 1_000)]:
        header = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {height} +X {width}\n".encode()
        bomb = Resizer(allowed)(header + b"\x02\x02" * 100)
        assert bomb.status == "failed_to_decode" and "decompression bomb" in bomb.error_message, bomb
        assert f"{width}x{height}" in bomb.error_message


def test_decompression_bomb_is_refused_from_the_header_before_decoding():
    # A small file claiming a huge size. Had it been decoded, the missing pixel data would give another error.
    for width, height in [(20_000, 20_000), (100_000, 100_000)]:
        raw = png_header_only(width, height)
        assert len(raw) < 100
        result = Resizer()(raw)
        assert result.status == "failed_to_decode" and result.image is None
        assert "decompression bomb" in result.error_message
    # Our limit is ours: a header below Pillow's limit but above ours is refused with the numbers in the message.
    result = Resizer(ResizerConfig(max_image_pixels=10_000))(png_header_only(200, 100))
    assert "decompression bomb" in result.error_message and "20000" in result.error_message
    # And a valid image over a tight limit too, while under it the same bytes decode.
    raw = encoded(Image.new("RGB", (64, 48), RED), "JPEG")
    assert Resizer(ResizerConfig(max_image_pixels=3000))(raw).status == "failed_to_decode"
    assert Resizer(ResizerConfig(max_image_pixels=3072))(raw).status == "success"


def test_bad_bytes_fail_to_decode_with_a_reason_and_never_raise():
    jpeg = encoded(Image.fromarray(photo_like(200, 150)), "JPEG", quality=90)
    png = encoded(Image.fromarray(photo_like(200, 150)), "PNG")
    cases = {
        "html": b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>",
        "html with leading whitespace": b"\n\n  <html><body>Access denied</body></html>",
        "empty": b"",
        "garbage": np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "truncated png": png[: len(png) // 2],
        "jpeg header only": jpeg[:200],
        "text": b"hello world, this is not an image",
    }
    for name, raw in cases.items():
        result = Resizer(ResizerConfig(image_size=64, resize_mode="keep_ratio"))(raw)
        assert result.status == "failed_to_decode", name
        assert result.error_message, name
        assert result.image is None and result.width is None and result.original_width is None, name
        assert result.sha256 == hashlib.sha256(raw).hexdigest(), name
    assert "HTML" in Resizer()(cases["html"]).error_message
    assert "empty" in Resizer()(cases["empty"]).error_message


def test_sha256_is_of_the_original_bytes():
    raw = encoded(Image.fromarray(photo_like(300, 200)), "JPEG", quality=90)
    result = Resizer(ResizerConfig(image_size=64))(raw)
    assert result.status == "success"
    assert result.sha256 == hashlib.sha256(raw).hexdigest()
    assert result.sha256 != hashlib.sha256(result.image).hexdigest()
    assert result.to_dict()["sha256"] == result.sha256 and set(result.to_dict()) >= {
        "status",
        "image",
        "format",
    }


INPUT_SIZES = [
    (100, 80),
    (256, 256),
    (257, 300),
    (640, 480),
    (480, 640),
    (1000, 300),
    (300, 1000),
    (31, 700),
    (1700, 1200),
]
MODES = ["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]


@pytest.fixture(scope="module")
def img2dataset_resizer_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # img2dataset still imports imghdr
        from img2dataset.resizer import Resizer as Img2datasetResizer

    return Img2datasetResizer


@pytest.mark.filterwarnings(
    "ignore:value is deprecated:DeprecationWarning"
)  # albumentations, called by img2dataset
@pytest.mark.parametrize("size", INPUT_SIZES)
def test_sizes_and_pixels_match_img2dataset(size, img2dataset_resizer_class):
    raw = encoded(Image.fromarray(photo_like(*size)), "JPEG", quality=95)
    for mode in MODES:
        for only_if_bigger in (False, True):
            ours = Resizer(
                ResizerConfig(image_size=128, resize_mode=mode, resize_only_if_bigger=only_if_bigger)
            )
            result = ours(raw)
            theirs = img2dataset_resizer_class(128, mode, only_if_bigger)
            their_bytes, width, height, original_width, original_height, error = theirs(io.BytesIO(raw))
            case = (size, mode, only_if_bigger)
            assert error is None
            assert (result.width, result.height) == (width, height), case
            assert (result.original_width, result.original_height) == (original_width, original_height), case
            assert output_size(*size, ours.config) == (width, height), case
            their_pixels = cv2.cvtColor(
                cv2.imdecode(np.frombuffer(their_bytes, np.uint8), 1), cv2.COLOR_BGR2RGB
            )
            difference = np.abs(decode_output(result) - their_pixels.astype(np.int32)).mean()
            # Same decoder and resize when we decode at full size: equal up to JPEG re-encoding. When we
            # shrink a JPEG in the DCT, close (this content has much detail near the output's Nyquist limit).
            side = min(size) if mode in ("keep_ratio", "center_crop") else max(size)
            reduced_decode = mode != "no" and side >= 2 * 128
            assert difference < (2.5 if reduced_decode else 0.5), (case, difference)


@pytest.mark.parametrize("mode", ["keep_ratio", "keep_ratio_largest", "center_crop", "border"])
@pytest.mark.parametrize("size", [(2400, 1000), (1700, 1200), (1001, 777)])
def test_reduced_decode_is_close_to_full_decode_then_resize(mode, size):
    # 1700 and 1001 are not multiples of 8: the reduced decode ends in partial pixels that must be honoured.
    source = photo_like(*size, seed=1)
    raw = encoded(Image.fromarray(source), "JPEG", quality=92)
    reduced = Resizer(ResizerConfig(image_size=200, resize_mode=mode, output_format="png"))(raw)
    full = Resizer(
        ResizerConfig(image_size=200, resize_mode=mode, output_format="png"), reduced_decode=False
    )(raw)
    assert (reduced.width, reduced.height) == (full.width, full.height)
    reduced_pixels, full_pixels = decode_output(reduced), decode_output(full)
    difference = np.abs(reduced_pixels - full_pixels)
    # Not the same path (the reduced decode really happened), yet the same picture.
    assert 0 < difference.mean() < 1.5, difference.mean()
    assert np.percentile(difference, 99) <= 12
    if mode in ("keep_ratio", "keep_ratio_largest"):
        # Against a high-quality referee (Lanczos from the full decode), the reduced path is no worse than
        # OpenCV's area resize from the full decode, which is img2dataset's default.
        decoded = Image.open(io.BytesIO(raw)).convert("RGB")
        referee = np.asarray(
            decoded.resize((full.width, full.height), Image.Resampling.LANCZOS), dtype=np.int32
        )
        assert np.abs(reduced_pixels - referee).mean() <= np.abs(full_pixels - referee).mean() + 0.25


def test_output_formats_and_quality():
    raw = encoded(Image.fromarray(photo_like(400, 300)), "JPEG", quality=95)
    magic = {"jpg": b"\xff\xd8\xff", "png": b"\x89PNG", "webp": b"RIFF"}
    for fmt in magic:
        result = Resizer(ResizerConfig(image_size=100, resize_mode="keep_ratio", output_format=fmt))(raw)
        assert result.format == fmt and result.image.startswith(magic[fmt])
        assert (result.width, result.height) == (133, 100)
    small = Resizer(ResizerConfig(image_size=100, resize_mode="keep_ratio", encode_quality=20))(raw)
    large = Resizer(ResizerConfig(image_size=100, resize_mode="keep_ratio", encode_quality=95))(raw)
    assert len(small.image) < len(large.image)


def test_invalid_config_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="resize_mode"):
        ResizerConfig(resize_mode="stretch")
    with pytest.raises(ValueError, match="compression level"):
        ResizerConfig(output_format="png", encode_quality=95)
    with pytest.raises(ValueError, match="output_format"):
        ResizerConfig(output_format="gif")
    with pytest.raises(ValueError, match="interpolation"):
        ResizerConfig(downscale_interpolation="fancy")


# --- formats and hostile headers, refused before any decoder runs ------------------------------------------


def assert_refused(result, *fragments, case=None):
    assert result.status == "failed_to_decode", (case, result.status, result.error_message)
    assert result.image is None and result.width is None, case
    message = result.error_message
    assert message.startswith(("refused before decoding", "format ")), (case, message)
    assert message.count(". ") == 0 and "\n" not in message, (case, message)  # one sentence
    for fragment in fragments:
        assert fragment in message, (case, message)


@pytest.mark.parametrize(
    "name, raw",
    [
        ("ICO", bombs.ico_holding(encoded(Image.new("RGB", (16, 16), RED), "PNG"))),
        ("CUR", b"\x00\x00\x02\x00\x01\x00" + bytes(40)),
        ("PSD", b"8BPS\x00\x01" + bytes(40)),
        ("AVIF", b"\x00\x00\x00\x1cftypavif" + bytes(40)),
        ("HEIF", b"\x00\x00\x00\x18ftypheic" + bytes(40)),
        ("BigTIFF", b"II+\x00\x08\x00\x00\x00" + bytes(40)),
        ("PDF", b"%PDF-1.7\n" + bytes(40)),
        ("HDR", red_hdr()),
    ],
)
def test_formats_outside_the_allow_list_fail_with_their_name(name, raw):
    # Told from the bytes: Pillow would open the icon (decoding its embedded PNG while doing so).
    assert image_headers.sniff_format(raw) == name
    assert_refused(Resizer()(raw), f"format {name} is not allowed", "JPEG, PNG, WEBP, GIF, BMP, TIFF")


def test_allow_list_is_configurable_and_never_trusts_the_other_formats():
    jpeg = encoded(Image.new("RGB", (20, 10), RED), "JPEG")
    png = encoded(Image.new("RGB", (20, 10), RED), "PNG")
    only_png = Resizer(ResizerConfig(allowed_formats=("png",)))
    assert only_png(png).status == "success"
    assert_refused(only_png(jpeg), "format JPEG is not allowed (allowed_formats: PNG)")
    # A format Pillow could guess without a signature (TGA) is no format we know.
    tga = encoded(Image.new("RGB", (20, 10), RED), "TGA")
    assert Image.open(io.BytesIO(tga)).format == "TGA"
    result = Resizer()(tga)
    assert result.status == "failed_to_decode" and "signature of no image format" in result.error_message
    with pytest.raises(ValueError, match="allowed_formats"):
        ResizerConfig(allowed_formats=("JPEG", "ICO"))
    with pytest.raises(ValueError, match="allowed_formats"):
        ResizerConfig(allowed_formats=())


@pytest.mark.parametrize("extra_scans", [100, 300])
def test_progressive_jpeg_with_repeated_scans_is_refused_by_the_scan_budget(extra_scans):
    raw = bombs.progressive_jpeg_with_repeated_scans(256, extra_scans)
    scans = raw.count(b"\xff\xda")
    assert scans > 100
    assert_refused(Resizer()(raw), f"has {scans} scans", "limit of 100 (max_jpeg_scans)")
    # The budget is what refuses it: with room for its scans the same bytes decode.
    assert Resizer(ResizerConfig(max_jpeg_scans=scans, image_size=64))(raw).status == "success"
    assert_refused(Resizer(ResizerConfig(max_jpeg_scans=scans - 1))(raw), f"limit of {scans - 1}")


def test_ordinary_progressive_and_baseline_jpegs_pass_the_scan_budget():
    source = Image.fromarray(photo_like(300, 200))
    for params in ({"progressive": True}, {"progressive": True, "subsampling": 0}, {}):
        raw = encoded(source, "JPEG", quality=90, **params)
        assert Resizer(ResizerConfig(image_size=64, max_jpeg_scans=12))(raw).status == "success", params
    # Baseline scans are not counted: each costs its own bytes, so a budget of one scan still decodes them.
    assert Resizer(ResizerConfig(max_jpeg_scans=1))(encoded(source, "JPEG")).status == "success"


def exif_with_entries(count: int) -> bytes:
    """A little-endian TIFF-structured EXIF block whose first directory has `count` SHORT entries."""
    entries = b"".join(struct.pack("<HHI", 40000 + i, 3, 1) + b"\x00\x00\x00\x00" for i in range(count))
    return b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", count) + entries + b"\x00\x00\x00\x00"


def jpeg_with_exif_entries(count: int) -> bytes:
    raw = encoded(Image.new("RGB", (16, 16), RED), "JPEG")
    block = b"Exif\x00\x00" + exif_with_entries(count)
    return raw[:2] + b"\xff\xe1" + struct.pack(">H", len(block) + 2) + block + raw[2:]


def test_jpeg_headers_that_make_pillow_loop_in_python_are_refused():
    good = encoded(Image.new("RGB", (16, 16), RED), "JPEG")
    cases = {
        "segments": (bombs.jpeg_with_header_segments(5000), "more than 1024 marker segments"),
        "quantization tables": (bombs.jpeg_with_quantization_tables(100), "bytes of quantization tables"),
        "stray bytes": (good[:2] + b"\xff\xfe\x00\x02" + b"\x00" * 20_000 + good[2:], "stray bytes"),
        "fill bytes": (good[:2] + b"\xff" * 20_000 + good[2:], "stray bytes"),
        "exif entries": (jpeg_with_exif_entries(2000), "EXIF directory has 2000 entries"),
        "frame size": (
            good[:2] + b"\xff\xc0\x00\x11\x08\xc3\x50\xc3\x50\x03" + bytes(9) + good[2:],
            "50000x50000",
        ),
    }
    for name, (raw, fragment) in cases.items():
        assert_refused(Resizer()(raw), fragment, case=name)
    # The same kinds of segments in ordinary numbers are fine.
    for raw in (
        bombs.jpeg_with_header_segments(50),
        bombs.jpeg_with_quantization_tables(2),
        jpeg_with_exif_entries(40),
    ):
        assert Resizer()(raw).status == "success"


def png_with_chunk(kind: bytes, data: bytes) -> bytes:
    head, idat, end = bombs.png_small()
    return head + bombs.png_chunk(kind, data) + idat + end


def raw_profile_exif(exif: bytes, compressed: bool = False) -> bytes:
    """A PNG text chunk holding EXIF as ImageMagick writes it, which Pillow reads when there is no eXIf."""
    hexdata = exif.hex()
    text = f"\nexif\n{len(exif):8d}\n" + "\n".join(hexdata[i : i + 72] for i in range(0, len(hexdata), 72))
    if compressed:
        return bombs.png_chunk(b"zTXt", b"Raw profile type exif\x00\x00" + zlib.compress(text.encode()))
    return bombs.png_chunk(b"tEXt", b"Raw profile type exif\x00" + text.encode())


def test_png_headers_past_the_limits_are_refused():
    head, idat, end = bombs.png_small()
    animation = bombs.png_chunk(b"acTL", struct.pack(">II", 1, 0))
    frame = bombs.png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 30_000, 30_000, 0, 0, 1, 10, 0, 0))
    cases = {
        "declared size": (png_header_only(30_000, 30_000), "30000x30000"),
        "second IHDR": (head + bombs.png_ihdr(12_000, 8_000) + idat + end, "12000x8000"),
        "chunks after the pixels": (bombs.png_with_many_chunks(20_000), "more than 10000 chunks"),
        "chunks before the pixels": (
            bombs.png_with_many_chunks(20_000, before_idat=True),
            "more than 10000 chunks",
        ),
        "empty IDATs": (head + bombs.png_chunk(b"IDAT", b"") * 20_000 + idat + end, "more than 10000 chunks"),
        "compressed text": (bombs.png_with_compressed_text(17), "compressed text or profile chunks"),
        "exif entries": (png_with_chunk(b"eXIf", exif_with_entries(5000)), "EXIF directory has 5000 entries"),
        "exif in text": (head + raw_profile_exif(exif_with_entries(5000)) + idat + end, "5000 entries"),
        "exif in compressed text": (
            head + raw_profile_exif(exif_with_entries(5000), compressed=True) + idat + end,
            "5000 entries",
        ),
        "animation frame": (head + animation + frame + idat + end, "30000x30000"),
    }
    for name, (raw, fragment) in cases.items():
        assert_refused(Resizer()(raw), fragment, case=name)
    for raw in (
        bombs.png_with_many_chunks(100),
        bombs.png_with_compressed_text(2),
        png_with_chunk(b"eXIf", exif_with_entries(20)),
    ):
        assert Resizer()(raw).status == "success"
    # An ordinary EXIF in a text chunk still orients the image.
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = encoded(Image.fromarray(quadrants(96, 48)).transpose(Image.Transpose.ROTATE_90), "PNG")
    for compressed in (False, True):
        raw = stored[:33] + raw_profile_exif(exif.tobytes(), compressed) + stored[33:]
        result = Resizer(LOSSLESS)(raw)
        assert np.abs(decode_output(result) - quadrants(96, 48).astype(np.int32)).mean() < 1


def test_png_decode_stops_at_the_end_of_the_image():
    # A GB of zeros after the pixels of a 16x16 image: Pillow stops at the image's end (libpng would inflate
    # it all), so this is an ordinary 16x16 image.
    result = Resizer(LOSSLESS)(bombs.png_with_extra_compressed_data(1024))
    assert (result.status, result.width, result.height) == ("success", 16, 16)


def test_gif_canvas_and_header_blocks_are_bounded_and_later_frames_never_read():
    # The canvas grows to the first frame (Pillow allocates it, and a disposal buffer, while opening).
    assert_refused(Resizer()(bombs.gif((1, 1), [(0, 0, 13_000, 13_000)], disposal=2)), "13000x13000")
    assert_refused(Resizer()(bombs.gif((16, 16), [(60_000, 60_000, 16, 16)])), "60016x60016")
    assert_refused(Resizer()(bombs.gif_with_comment_blocks(5000)), "more than 4096 blocks")
    assert Resizer()(bombs.gif_with_comment_blocks(100)).status == "success"
    # Only the first frame is decoded: 20,000 frames after it, or a huge one, cost nothing.
    many = bombs.gif((16, 16), [(0, 0, 16, 16)] * 20_000)
    result = Resizer(LOSSLESS)(many)
    assert (result.status, result.width, result.height) == ("success", 16, 16)
    later_bomb = bombs.gif((16, 16), [(0, 0, 16, 16), (0, 0, 60_000, 60_000)])
    assert Resizer(LOSSLESS)(later_bomb).status == "success"


def test_webp_canvas_frames_and_chunks_are_bounded():
    assert_refused(Resizer()(bombs.webp_animation((20_000, 20_000), 1)), "20000x20000")
    assert_refused(
        Resizer(ResizerConfig(max_image_pixels=1_000_000))(bombs.webp_animation((2000, 2000), 1)), "2000x2000"
    )
    assert_refused(Resizer()(bombs.webp_animation((16, 16), 12_000)), "more than 10000 chunks")
    result = Resizer(LOSSLESS)(bombs.webp_animation((16, 16), 50))
    assert (result.status, result.width, result.height) == ("success", 16, 16)
    lossy = encoded(Image.fromarray(photo_like(64, 48)), "WEBP", quality=80)
    assert Resizer(ResizerConfig(max_image_pixels=64 * 48))(lossy).status == "success"
    assert_refused(Resizer(ResizerConfig(max_image_pixels=64 * 48 - 1))(lossy), "64x48")


def test_tiff_tiles_strips_and_directories_are_bounded_before_decoding():
    four_k_tile = zlib.compress(bytes(4096 * 4096 * 3), 1)
    cases = {
        # libtiff allocates a whole tile: 16x16 pixels in a 4096x4096 tile decoded to 48 MB and "success".
        "tile beyond a small image": (
            bombs.tiff(16, 16, tile=(4096, 4096), block_data=four_k_tile),
            "4096x4096 tiles",
        ),
        "tile beyond the pixel limit": (bombs.tiff(20_000, 20_000, tile=(16_384, 16_384)), "20000x20000"),
        "zero tile": (bombs.tiff(16, 16, tile=(0, 16)), "tiles are 0x16"),
        "more strips listed than the layout has": (
            bombs.tiff(16, 16, rows_per_strip=1, blocks=70_000, compression=1, block_data=bytes(48)),
            "lists 70000 strips or tiles where its layout has 16",
        ),
        "too many strips": (
            bombs.tiff(16, 80_000, rows_per_strip=1, blocks=1, compression=1),
            "80000 strips",
        ),
        "too many tags": (bombs.tiff(16, 16, extra_entries=2000), "has 2010 entries"),
    }
    for name, (raw, fragment) in cases.items():
        assert_refused(Resizer()(raw), fragment, case=name)
    # Pillow keeps the first of a repeated tag; something else may keep the second.
    repeated = bombs.tiff(16, 16, tile=(16, 16)).replace(
        struct.pack("<HHI", 323, 4, 1), struct.pack("<HHI", 322, 4, 1)
    )
    assert_refused(Resizer()(repeated), "repeats tag 322")
    # Tiles larger than a small image, within reason, and many strips of a tall image are ordinary.
    small = Image.fromarray(photo_like(100, 60))
    for params in (
        {"tile": (256, 256)},
        {"compression": "tiff_deflate"},
        {"compression": "tiff_lzw", "strip_size": 300},
    ):
        raw = encoded(small, "TIFF", **params)
        result = Resizer(LOSSLESS)(raw)
        assert (result.status, result.width, result.height) == ("success", 100, 60), params


def test_bmp_size_run_length_and_palette_are_bounded():
    assert_refused(Resizer()(bombs.bmp_rle8(20_000, 20_000, b"\x00\x01")), "20000x20000")
    # Pillow decodes run-length BMPs in Python, a row's padding byte by byte: 8 KB would cost seconds.
    assert_refused(Resizer()(bombs.bmp_rle8_row_padding_bomb(2000, 2000)), "run-length encoded at 2000x2000")
    small = Resizer(LOSSLESS)(bombs.bmp_rle8_row_padding_bomb(64, 64))
    assert (small.status, small.width, small.height) == ("success", 64, 64)
    palette_bomb = bytearray(encoded(Image.new("P", (16, 16)), "BMP"))
    palette_bomb[46:50] = struct.pack("<I", 65536)
    assert_refused(Resizer()(bytes(palette_bomb)), "palette of 65536 colours")


def test_cut_short_headers_are_refused_not_guessed_at():
    # Pillow keeps the TIFF tags it read before a cut; a check that cannot read a size refuses.
    tiled = bombs.tiff(16, 16, tile=(16_384, 16_384))
    assert_refused(Resizer()(tiled[:-20]), "TIFF header is cut short or malformed")
    assert_refused(Resizer()(b"GIF89a\x10\x00\x10\x00\x00\x00\x00\x2c\x00"), "GIF header is cut short")


def test_flattening_alpha_on_white_is_exact_and_costs_little_beyond_its_output():
    import tracemalloc

    from pipelines.ingest.resizer import _flatten_on_white

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (4001, 500, 4), dtype=np.uint8)  # rows not a multiple of the block
    alpha = rgba[..., 3:4].astype(np.float64) / 255
    expected = np.floor(rgba[..., :3] * alpha + 255 * (1 - alpha) + 0.5).astype(np.uint8)
    tracemalloc.start()
    flat = _flatten_on_white(rgba)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.array_equal(flat, expected)
    # The output is 3 bytes a pixel; a whole-canvas uint16 computation peaked at about 26.
    assert peak < 6 * rgba.shape[0] * rgba.shape[1], peak
