"""Ingest decode + resize, in step 3 (stage): decode downloaded bytes, make them upright 8-bit RGB, resize and
re-encode them.
Resize modes and output sizes follow img2dataset's; JPEGs being shrunk are decoded at reduced size
(libjpeg DCT scaling through Pillow's draft mode), which is where most of the speed comes from.
Before any decoder sees the bytes, their format must be allowed and their headers must pass the checks in
image_headers (size, scans, tiles, chunks): a hostile file fails with a reason instead of costing
gigabytes or minutes.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field, field_validator, model_validator

from pipelines.config import Section
from pipelines.formats.shards import FAILED_TO_DECODE, SUCCESS
from pipelines.ingest import image_headers

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
# Same names as img2dataset's interpolation options.
INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "bilinear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
    "lanczos4": cv2.INTER_LANCZOS4,
}
Interpolation = Literal[tuple(INTERPOLATIONS)]
# Output format -> (OpenCV encoder extension, quality parameter, its range, default).
# As in img2dataset, a PNG's "quality" is its zlib compression level.
# In the order the config's error messages list them.
ENCODERS = {
    "jpg": (".jpg", cv2.IMWRITE_JPEG_QUALITY, (0, 100), 95),
    "png": (".png", cv2.IMWRITE_PNG_COMPRESSION, (0, 9), 3),
    "webp": (".webp", cv2.IMWRITE_WEBP_QUALITY, (1, 100), 95),
}
OutputFormat = Literal[tuple(ENCODERS)]
# Told from the bytes' signature (never the URL or Content-Type): the formats whose headers image_headers
# checks before decoding.
ImageFormat = Literal[image_headers.CHECKED_FORMATS]
# Pillow's own default limit, made explicit so that it is ours to configure.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# EXIF orientation -> the transpose that makes the stored pixels upright. 5-8 swap width and height.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# We refuse oversized images ourselves from the header size, with our own limit and message; Pillow's
# warning for the same thing would only repeat it in the logs of every worker.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ResizerConfig(Section):
    """How images are decoded, resized and encoded; names and defaults as in img2dataset. These knobs sit at
    the top level of the ingest config, which takes them by inheriting this class."""

    image_size: int = Field(256, gt=0)
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: Interpolation = "lanczos"
    downscale_interpolation: Interpolation = "area"
    output_format: OutputFormat = "jpg"
    # None: the format's default (95 for jpg and webp, compression level 3 for png), stored once resolved so
    # that the dumped config says exactly what ran.
    encode_quality: int | None = None
    # Images whose header claims more pixels than this are refused before any pixel is decoded. A decode
    # costs about 3 (JPEG) to 36 (WebP with alpha, flattened on white) bytes a pixel at its peak.
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, gt=0)
    # Anything else fails to decode, with the format's name ("format ICO is not allowed").
    allowed_formats: list[ImageFormat] = Field(
        default_factory=lambda: list(image_headers.DEFAULT_ALLOWED_FORMATS), min_length=1
    )
    # Scans a progressive or arithmetic-coded JPEG may have: each costs a pass over every block.
    max_jpeg_scans: int = Field(image_headers.DEFAULT_MAX_JPEG_SCANS, gt=0)

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _format_names(cls, value: Any) -> Any:
        # "--allowed-formats jpeg,png" from the command line; names in any case.
        if isinstance(value, str):
            value = [part for part in value.replace(" ", ",").split(",") if part]
        if isinstance(value, list | tuple):
            return [item.upper() if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _encode_quality_in_range(self) -> ResizerConfig:
        low, high = ENCODERS[self.output_format][2]
        if self.encode_quality is None:
            object.__setattr__(self, "encode_quality", ENCODERS[self.output_format][3])
        elif not low <= self.encode_quality <= high:
            what = "compression level" if self.output_format == "png" else "quality"
            raise ValueError(
                f"encode_quality {self.encode_quality} is out of range: the {what} for {self.output_format} "
                f"must be in [{low}, {high}]"
            )
        return self


@dataclass
class ResizeResult:
    """One image through the resizer. On failure `image` and the sizes are None and `error_message` says why."""

    status: str  # SUCCESS or FAILED_TO_DECODE
    error_message: str | None
    image: bytes | None
    width: int | None
    height: int | None
    original_width: int | None  # upright, i.e. after EXIF orientation
    original_height: int | None
    sha256: str  # of the bytes as downloaded, whatever the outcome
    format: str  # extension of `image`: jpg, png or webp

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def resized_size(width: int, height: int, config: ResizerConfig) -> tuple[int, int] | None:
    """(width, height) the whole image is scaled to before any crop or pad, or None when it is left as is."""
    if config.resize_mode == "no":
        return None
    if config.resize_mode in ("keep_ratio", "center_crop"):
        side = min(width, height)
    else:
        side = max(width, height)
    if config.resize_only_if_bigger and side <= config.image_size:
        return None
    # The same arithmetic as albumentations' Smallest/LongestMaxSize that img2dataset calls, so sizes match.
    scale = config.image_size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _shrinks(width: int, height: int, config: ResizerConfig) -> bool:
    side = min(width, height) if config.resize_mode in ("keep_ratio", "center_crop") else max(width, height)
    return side > config.image_size


def output_size(width: int, height: int, config: ResizerConfig) -> tuple[int, int]:
    """(width, height) of the encoded output for an upright input of this size."""
    size = resized_size(width, height, config)
    if size is None:
        return width, height
    if config.resize_mode in ("center_crop", "border"):
        return config.image_size, config.image_size
    return size


class Resizer:
    """Callable: raw downloaded bytes -> ResizeResult. Never raises on bad data."""

    def __init__(self, config: ResizerConfig | None = None, reduced_decode: bool = True):
        self.config = config or ResizerConfig()
        # Decode JPEGs at 1/2, 1/4 or 1/8 scale when the output is smaller anyway; off only to compare.
        self.reduced_decode = reduced_decode
        extension, quality_flag, _, _ = ENCODERS[self.config.output_format]
        self._extension = extension
        self._encode_params = [int(quality_flag), int(self.config.encode_quality)]

    def __call__(self, raw: bytes) -> ResizeResult:
        sha256 = hashlib.sha256(raw).hexdigest()
        try:
            return self._resize(raw, sha256)
        except Exception as error:  # a bad image is data, whatever the library raised
            return self._failure(sha256, f"cannot decode image: {type(error).__name__}: {error}")

    def _failure(self, sha256: str, message: str) -> ResizeResult:
        return ResizeResult(
            FAILED_TO_DECODE, message, None, None, None, None, None, sha256, self.config.output_format
        )

    def _resize(self, raw: bytes, sha256: str) -> ResizeResult:
        config = self.config
        if not raw:
            return self._failure(sha256, "empty body: 0 bytes received")
        fmt = image_headers.sniff_format(raw)
        if fmt is None:
            return self._failure(sha256, _unknown_format_message(raw))
        if fmt not in config.allowed_formats:
            return self._failure(
                sha256, f"format {fmt} is not allowed (allowed_formats: {', '.join(config.allowed_formats)})"
            )
        refusal = image_headers.refusal(fmt, raw, config.max_image_pixels, config.max_jpeg_scans)
        if refusal is not None:
            return self._failure(sha256, refusal)
        if fmt == "HDR":
            return self._decode_with_opencv(raw, sha256)
        try:
            # Only the plugin of the format the signature named, so no other plugin gets to guess.
            image = Image.open(io.BytesIO(raw), formats=(fmt,))
        except Image.DecompressionBombError as error:
            return self._failure(sha256, f"refused before decoding, possible decompression bomb: {error}")
        except UnidentifiedImageError:
            return self._failure(sha256, f"cannot decode image: Pillow cannot read this {fmt} file's header")

        stored_width, stored_height = image.size
        if stored_width * stored_height > config.max_image_pixels:
            return self._failure(sha256, _bomb_message(stored_width, stored_height, config.max_image_pixels))

        orientation = _exif_orientation(image)
        rotated = orientation in (5, 6, 7, 8)
        width, height = (stored_height, stored_width) if rotated else (stored_width, stored_height)
        target = resized_size(width, height, config)
        draft_box = None
        if (
            target is not None
            and _shrinks(width, height, config)
            and self.reduced_decode
            and image.format in ("JPEG", "MPO")
        ):
            # draft() works in the stored frame and keeps both sides >= the request, so the side the
            # resize mode needs stays at least as large as the final output.
            stored_target = (target[1], target[0]) if rotated else target
            drafted = image.draft(image.mode, stored_target)
            if drafted is not None and image.size != (stored_width, stored_height):
                draft_box = drafted[1]
        if draft_box is None and _opencv_decodes_alike(image, raw):
            # Full-size decode: OpenCV hands back its array without the copy that exporting from Pillow
            # costs (a third of the time on a 3000x2000 JPEG), and it is the very decode img2dataset does.
            pixels = cv2.imdecode(
                np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
            )
            if pixels is not None and pixels.shape[:2] == (stored_height, stored_width):
                return self._finish(_orient(pixels, orientation), width, height, sha256)
            # Otherwise Pillow decodes it below and says what is wrong.
        image.load()
        if draft_box is not None:
            # The last row and column of 8x8 blocks decode to partial pixels (e.g. 1700 px at 1/8 is 212.5
            # px), which OpenCV's resize cannot express and which would shift detail by up to half an output
            # pixel. Pillow's resize takes that fractional source box; its antialiased bicubic lands closer to
            # OpenCV's area resize of the full image than area (a second box filter) does here.
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            image = image.resize(stored_target, Image.Resampling.BICUBIC, box=draft_box)
        if orientation in _UPRIGHT:
            image = image.transpose(_UPRIGHT[orientation])
        return self._finish(_to_bgr(image), width, height, sha256)

    def _decode_with_opencv(self, raw: bytes, sha256: str) -> ResizeResult:
        """Radiance HDR, which Pillow does not read. OpenCV has no header-only read and decodes before it
        checks anything, so it only ever sees bytes whose size image_headers has already checked. Its own
        limits (OPENCV_IO_MAX_IMAGE_PIXELS, read once when OpenCV loads) come from the config through the
        staging workers' environment: see job.opencv_limits."""
        decoded = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
        if decoded is None or decoded.size == 0:
            return self._failure(
                sha256, f"cannot decode image: OpenCV cannot read these {len(raw)} HDR bytes"
            )
        height, width = decoded.shape[:2]
        return self._finish(_opencv_to_bgr(decoded), width, height, sha256)

    def _finish(self, pixels: np.ndarray, width: int, height: int, sha256: str) -> ResizeResult:
        """Upright BGR pixels (possibly decoded at reduced size) -> resized, cropped or padded, encoded."""
        config = self.config
        target = resized_size(width, height, config)
        if target is not None:
            # Up or down is decided on the original size, as img2dataset does, not on the reduced decode.
            if _shrinks(width, height, config):
                interpolation = INTERPOLATIONS[config.downscale_interpolation]
            else:
                interpolation = INTERPOLATIONS[config.upscale_interpolation]
            if (pixels.shape[1], pixels.shape[0]) != target:
                pixels = cv2.resize(pixels, target, interpolation=interpolation)
            side = config.image_size
            if config.resize_mode == "center_crop":
                top, left = (target[1] - side) // 2, (target[0] - side) // 2
                pixels = pixels[top : top + side, left : left + side]
            elif config.resize_mode == "border":
                top, left = (side - target[1]) // 2, (side - target[0]) // 2
                bottom, right = side - target[1] - top, side - target[0] - left
                pixels = cv2.copyMakeBorder(
                    pixels, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(255, 255, 255)
                )
        out_height, out_width = pixels.shape[:2]
        ok, encoded = cv2.imencode(self._extension, pixels, self._encode_params)
        if not ok:
            return self._failure(
                sha256, f"decoded but cannot encode {out_width}x{out_height} as {config.output_format}"
            )
        return ResizeResult(
            SUCCESS,
            None,
            encoded.tobytes(),
            out_width,
            out_height,
            width,
            height,
            sha256,
            config.output_format,
        )


_bomb_message = image_headers.bomb_message


def _unknown_format_message(raw: bytes) -> str:
    head = raw[:64].lstrip()
    if head.startswith(b"<"):
        # Servers answer dead links with HTML pages; SVG is XML text that we do not rasterise.
        return f"not an image: the body is HTML/XML text ({len(raw)} bytes, starts {head[:20]!r})"
    return f"not an image: these {len(raw)} bytes start {raw[:8]!r}, the signature of no image format we read"


def _exif_orientation(image: Image.Image) -> int:
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block should not cost us the image
        return 1
    return orientation if isinstance(orientation, int) else 1


def _opencv_decodes_alike(image: Image.Image, raw: bytes) -> bool:
    """Whether OpenCV's IMREAD_COLOR gives the same pixels as the Pillow path would, errors included."""
    if image.mode not in ("RGB", "L") or image.has_transparency_data:
        return False
    if image.format == "JPEG":
        # libjpeg only warns about a missing end of image and OpenCV then returns grey-filled pixels;
        # Pillow raises, so truncated files go to Pillow.
        return raw.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    # Not PNG: libpng inflates every IDAT byte even when the image is full (a 1 MB file can hold a GB of
    # zeros after its pixels), where Pillow stops at the image's end.
    return image.format == "WEBP"


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation to an OpenCV array, as _UPRIGHT does for Pillow images."""
    if orientation == 2:
        return cv2.flip(pixels, 1)
    if orientation == 3:
        return cv2.rotate(pixels, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(pixels, 0)
    if orientation == 5:
        return cv2.transpose(pixels)
    if orientation == 6:
        return cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.rotate(cv2.transpose(pixels), cv2.ROTATE_180)
    if orientation == 8:
        return cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return pixels


def _to_bgr(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 BGR (OpenCV's order); alpha is flattened on white, 16-bit scaled to 8."""
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image)
        gray = np.rint(gray.astype(np.float32) / 257.0).clip(0, 255).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if image.mode == "F":
        image = image.convert("L")
    if image.has_transparency_data:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        return cv2.cvtColor(_flatten_on_white(np.asarray(rgba)), cv2.COLOR_RGB2BGR)
    if image.mode == "L":
        return cv2.cvtColor(np.asarray(image), cv2.COLOR_GRAY2BGR)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)


# Rows flattened at a time: the uint16 temporaries of a whole large canvas would cost ~30 bytes a pixel.
_FLATTEN_ROWS = 256


def _flatten_on_white(rgba: np.ndarray) -> np.ndarray:
    # rgb * a/255 + 255 * (1 - a/255), rounded, in integers: the sum never exceeds 255*255 so uint16 holds it.
    out = np.empty((*rgba.shape[:2], 3), np.uint8)
    for top in range(0, rgba.shape[0], _FLATTEN_ROWS):
        block = rgba[top : top + _FLATTEN_ROWS]
        alpha = block[..., 3:4].astype(np.uint16)
        rgb = block[..., :3].astype(np.uint16)
        out[top : top + _FLATTEN_ROWS] = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out


def _opencv_to_bgr(decoded: np.ndarray) -> np.ndarray:
    """OpenCV's IMREAD_UNCHANGED output (gray/BGR/BGRA, 8/16-bit or float) -> HxWx3 uint8 BGR."""
    if decoded.dtype == np.uint16:
        decoded = np.rint(decoded / 257.0).astype(np.uint8)
    elif decoded.dtype != np.uint8:
        # Float formats such as HDR hold linear light around [0, 1]. In place: HDR is 12 bytes a pixel.
        np.clip(decoded, 0.0, 1.0, out=decoded)
        decoded *= 255.0
        decoded += 0.5
        decoded = decoded.astype(np.uint8)
    if decoded.ndim == 2:
        return cv2.cvtColor(decoded, cv2.COLOR_GRAY2BGR)
    if decoded.shape[2] == 4:
        return _flatten_on_white(decoded)
    return decoded
