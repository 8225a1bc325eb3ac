"""Tests for pipelines/ingest/resizer.py: decoding of every format we accept, EXIF orientation, alpha,
bit depth, refusals, and parity of sizes and pixels with img2dataset's Resizer."""

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

from pipelines.ingest.resizer import Resizer, ResizerConfig, output_size

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


LOSSLESS = ResizerConfig(resize_mode="no", encode_format="png")


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
        result = Resizer(ResizerConfig(image_size=100, resize_mode=mode, encode_format="png"))(raw)
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
    for config in (LOSSLESS, ResizerConfig(image_size=8, resize_mode="keep_ratio", encode_format="png")):
        pixels = decode_output(Resizer(config)(raw))
        assert np.abs(pixels - np.array(RED)).max() <= 3


def test_format_pillow_does_not_know_is_decoded_by_opencv():
    # Radiance HDR: float pixels in linear light, read by OpenCV only.
    hdr = np.zeros((12, 16, 3), np.float32)
    hdr[..., 2] = 1.0  # BGR: red
    ok, raw = cv2.imencode(".hdr", hdr)
    assert ok
    result = Resizer(LOSSLESS)(raw.tobytes())
    pixels = decode_output(result)
    assert (result.width, result.height) == (16, 12)
    assert np.abs(pixels - np.array(RED)).max() <= 2


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, then IEND: no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


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
    reduced = Resizer(ResizerConfig(image_size=200, resize_mode=mode, encode_format="png"))(raw)
    full = Resizer(
        ResizerConfig(image_size=200, resize_mode=mode, encode_format="png", reduced_decode=False)
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
        result = Resizer(ResizerConfig(image_size=100, resize_mode="keep_ratio", encode_format=fmt))(raw)
        assert result.format == fmt and result.image.startswith(magic[fmt])
        assert (result.width, result.height) == (133, 100)
    small = Resizer(ResizerConfig(image_size=100, resize_mode="keep_ratio", encode_quality=20))(raw)
    large = Resizer(ResizerConfig(image_size=100, resize_mode="keep_ratio", encode_quality=95))(raw)
    assert len(small.image) < len(large.image)


def test_invalid_config_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="resize_mode"):
        ResizerConfig(resize_mode="stretch")
    with pytest.raises(ValueError, match="compression level"):
        ResizerConfig(encode_format="png", encode_quality=95)
    with pytest.raises(ValueError, match="encode_format"):
        ResizerConfig(encode_format="gif")
    with pytest.raises(ValueError, match="interpolation"):
        ResizerConfig(downscale_interpolation="fancy")
