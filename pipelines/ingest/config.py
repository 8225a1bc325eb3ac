"""The ingest job's one typed configuration: loaded from YAML, overridden from the command line, validated
before any work starts, and dumped back to YAML verbatim (written beside the output and logged to MLflow).
Defaults follow img2dataset where it has the same knob.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config import (
    Section,
    add_config_arguments,
    check_uri,
    data_from_args,
    parse_yaml,
    validate,
)

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
Interpolation = Literal["nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"]
# Per output format: the range of encode_quality and its default. PNG's "quality" is its zlib level (0-9).
ENCODE_QUALITY_RANGES = {"jpg": (0, 100, 95), "webp": (1, 100, 95), "png": (0, 9, 3)}
# Pillow's own decompression-bomb limit.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# The formats whose headers pipelines.ingest.image_headers checks before decoding; the default leaves out
# HDR (12 bytes a pixel, through OpenCV). Same lists as image_headers', which the tests hold equal.
ImageFormat = Literal["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HDR"]
DEFAULT_ALLOWED_FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]
DEFAULT_MAX_JPEG_SCANS = 100
DEFAULT_MAX_BYTES_IN_FLIGHT = 1 << 30


class DownloadConfig(Section):
    """HTTP fetching; mirrors pipelines.ingest.downloader.DownloaderConfig."""

    timeout_s: float = Field(30.0, gt=0, le=300)  # total deadline per URL, retries included
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_redirects: int = Field(5, ge=0)
    max_retries: int = Field(2, ge=0)
    user_agent_token: str = "clip-ray-ingest"
    respect_x_robots_tag: bool = True
    # Loopback/private targets stay refused unless set (tests, intranet mirrors); cloud metadata always is.
    allow_private_networks: bool = False
    max_in_flight: int = Field(256, gt=0)  # concurrent requests per download worker
    max_per_host: int = Field(16, ge=0)  # 0 = no per-host limit
    # Bytes of bodies a download worker holds at once, streaming or downloaded but not yet decoded; at
    # least max_body_bytes. Downloads wait for room rather than fail.
    max_bytes_in_flight: int = Field(DEFAULT_MAX_BYTES_IN_FLIGHT, gt=0)

    @field_validator("user_agent_token")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() or c in ",:;()" for c in value):
            raise ValueError("must be one word without spaces or ,:;()")
        return value

    @model_validator(mode="after")
    def _budget_holds_a_body(self) -> DownloadConfig:
        if self.max_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                f"download.max_bytes_in_flight ({self.max_bytes_in_flight}) is below download.max_body_bytes "
                f"({self.max_body_bytes}); it must hold at least one body of the largest size accepted"
            )
        return self


class ClipScoreConfig(Section):
    """Keep a pair only if its image-text cosine similarity under a CLIP model reaches the threshold."""

    checkpoint: str  # URI of a checkpoint in the project's format
    model: str = "ViT-B-32"
    threshold: float = Field(0.3, ge=-1.0, le=1.0)  # LAION-400M kept pairs with ViT-B/32 similarity >= 0.3
    batch_size: int = Field(256, gt=0)
    use_gpu: bool = False

    @field_validator("checkpoint")
    @classmethod
    def _uri_without_credentials(cls, value: str) -> str:
        return check_uri(value)


class FiltersConfig(Section):
    min_image_size: int = Field(0, ge=0)  # on the shorter side of the original image, as img2dataset
    max_image_area: float = Field(math.inf, gt=0)
    max_aspect_ratio: float = Field(math.inf, ge=1.0)
    min_caption_chars: int = Field(0, ge=0)
    max_caption_chars: int | None = Field(None, ge=0)
    min_caption_words: int = Field(0, ge=0)
    clip_score: ClipScoreConfig | None = None

    @model_validator(mode="after")
    def _caption_range(self) -> FiltersConfig:
        if self.max_caption_chars is not None and self.max_caption_chars < self.min_caption_chars:
            raise ValueError(
                f"filters.max_caption_chars ({self.max_caption_chars}) is below "
                f"filters.min_caption_chars ({self.min_caption_chars})"
            )
        return self


class DedupConfig(Section):
    urls: bool = True  # drop rows whose URL appeared earlier in input order
    content: bool = True  # drop images whose bytes (sha256) appeared earlier in input order


class ConcurrencyConfig(Section):
    """Ray Data knobs; None lets Ray size the stage to the cluster."""

    download_workers: int | None = Field(None, gt=0)
    resize_workers: int | None = Field(None, gt=0)
    write_workers: int | None = Field(None, gt=0)
    batch_size: int = Field(256, gt=0)  # rows per Ray Data batch between stages


class IngestConfig(Section):
    input: str  # file, folder or glob; local path or s3://
    output: str  # folder; local path or s3://
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    url_col: str = "url"
    caption_col: str | None = "caption"  # None: the input has no captions
    samples_per_shard: int = Field(10_000, gt=0)
    # "incremental" skips shards already committed in the output; "overwrite" clears the output first.
    incremental_mode: Literal["incremental", "overwrite"] = "incremental"

    image_size: int = Field(256, gt=0)
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: Interpolation = "lanczos"
    downscale_interpolation: Interpolation = "area"
    output_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int | None = None  # None: the format's default (95 for jpg/webp, level 3 for png)
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, gt=0)
    # Told from the bytes' signature; anything else fails to decode ("format ICO is not allowed").
    allowed_formats: list[ImageFormat] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_FORMATS), min_length=1
    )
    max_jpeg_scans: int = Field(DEFAULT_MAX_JPEG_SCANS, gt=0)  # progressive/arithmetic JPEGs: a pass per scan

    download: DownloadConfig = Field(default_factory=DownloadConfig)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    concurrency: ConcurrencyConfig = Field(default_factory=ConcurrencyConfig)
    mlflow_experiment: str | None = None

    @field_validator("input", "output")
    @classmethod
    def _uri_without_credentials(cls, value: str) -> str:
        return check_uri(value)

    @field_validator("caption_col", "mlflow_experiment", mode="before")
    @classmethod
    def _empty_means_none(cls, value: Any) -> Any:
        # From the command line, "--caption-col ''" is the way to say "no captions".
        return None if isinstance(value, str) and value.strip() in ("", "null", "none", "None") else value

    @field_validator("allowed_formats", mode="before")
    @classmethod
    def _format_names(cls, value: Any) -> Any:
        # "--allowed-formats jpeg,png" from the command line; names in any case.
        if isinstance(value, str):
            value = [part for part in value.replace(" ", ",").split(",") if part]
        if isinstance(value, list | tuple):
            return [item.upper() if isinstance(item, str) else item for item in value]
        return value

    @field_validator("url_col")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a column")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> IngestConfig:
        low, high, default = ENCODE_QUALITY_RANGES[self.output_format]
        if self.encode_quality is None:
            # Store the resolved value so that the dumped config says exactly what ran.
            object.__setattr__(self, "encode_quality", default)
        elif not low <= self.encode_quality <= high:
            what = "compression level" if self.output_format == "png" else "quality"
            raise ValueError(
                f"encode_quality {self.encode_quality} is out of range: the {what} for {self.output_format} "
                f"must be in [{low}, {high}]"
            )
        if self.url_col == self.caption_col:
            raise ValueError(f"url_col and caption_col are both {self.url_col!r}; they must differ")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("input and output are the same location; the output needs its own folder")
        return self

    # -----------------------------------------------------------------------------------------------------
    # The stage configs the job hands to the per-sample code.

    def downloader_config(self):
        from pipelines.ingest.downloader import DownloaderConfig

        return DownloaderConfig(**self.download.model_dump())

    def resizer_config(self):
        from pipelines.ingest.resizer import ResizerConfig

        return ResizerConfig(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            resize_only_if_bigger=self.resize_only_if_bigger,
            upscale_interpolation=self.upscale_interpolation,
            downscale_interpolation=self.downscale_interpolation,
            encode_format=self.output_format,
            encode_quality=self.encode_quality,
            max_image_pixels=self.max_image_pixels,
            allowed_formats=tuple(self.allowed_formats),
            max_jpeg_scans=self.max_jpeg_scans,
        )

    # -----------------------------------------------------------------------------------------------------
    # YAML in and out

    @classmethod
    def load(cls, argv: Sequence[str] | None = None) -> IngestConfig:
        """The validated config from `--config FILE.yaml` (optional) and command-line overrides."""
        return validate_config(data_from_args(build_arg_parser().parse_args(argv), _SET_EXAMPLE))

    @classmethod
    def from_yaml(cls, text: str) -> IngestConfig:
        return validate_config(parse_yaml(text, "the YAML text"))


def validate_config(data: dict[str, Any]) -> IngestConfig:
    """Build an IngestConfig, turning pydantic's errors into one sentence that names each bad field."""
    return validate(IngestConfig, data, "ingest config", _FLAG_FOR_FIELD)


# ---------------------------------------------------------------------------------------------------------
# Command line: flat options that override the YAML.

# (flag, dotted field path, help). Values are parsed by pydantic, so errors name the config field.
_OPTIONS = (
    ("input", "input", "input URL list: file, folder or glob; local path or s3://"),
    ("output", "output", "output folder: local path or s3://"),
    ("input-format", "input_format", "auto|parquet|csv|tsv|jsonl (auto: from the extension, .gz allowed)"),
    ("url-col", "url_col", "name of the URL column"),
    ("caption-col", "caption_col", "name of the caption column; '' for inputs without captions"),
    ("samples-per-shard", "samples_per_shard", "rows per output shard"),
    ("incremental-mode", "incremental_mode", "incremental|overwrite"),
    ("image-size", "image_size", "output image size in pixels"),
    ("resize-mode", "resize_mode", "no|border|keep_ratio|keep_ratio_largest|center_crop"),
    ("upscale-interpolation", "upscale_interpolation", "interpolation when enlarging"),
    ("downscale-interpolation", "downscale_interpolation", "interpolation when shrinking"),
    ("output-format", "output_format", "jpg|png|webp"),
    ("encode-quality", "encode_quality", "jpg/webp quality or png compression level"),
    ("max-image-pixels", "max_image_pixels", "refuse images with more pixels than this"),
    ("allowed-formats", "allowed_formats", "formats decoded, e.g. JPEG,PNG,WEBP (from the bytes' signature)"),
    ("max-jpeg-scans", "max_jpeg_scans", "refuse progressive JPEGs with more scans than this"),
    ("timeout-s", "download.timeout_s", "total download deadline per URL in seconds"),
    ("max-body-bytes", "download.max_body_bytes", "largest image accepted, in bytes"),
    ("max-redirects", "download.max_redirects", "redirects followed per URL"),
    ("max-retries", "download.max_retries", "retries of transient download failures"),
    ("user-agent-token", "download.user_agent_token", "bot name in the User-Agent"),
    ("max-in-flight", "download.max_in_flight", "concurrent requests per download worker"),
    ("max-bytes-in-flight", "download.max_bytes_in_flight", "bytes of undecoded bodies per download worker"),
    ("min-image-size", "filters.min_image_size", "drop images whose shorter side is smaller"),
    ("max-image-area", "filters.max_image_area", "drop images with a larger area"),
    ("max-aspect-ratio", "filters.max_aspect_ratio", "drop images more elongated than this"),
    ("min-caption-chars", "filters.min_caption_chars", "drop captions shorter than this"),
    ("max-caption-chars", "filters.max_caption_chars", "drop captions longer than this"),
    ("min-caption-words", "filters.min_caption_words", "drop captions with fewer words"),
    ("clip-score-checkpoint", "filters.clip_score.checkpoint", "enable the CLIP-score filter with this"),
    ("clip-score-threshold", "filters.clip_score.threshold", "minimum image-text cosine similarity"),
    ("download-workers", "concurrency.download_workers", "Ray workers downloading"),
    ("resize-workers", "concurrency.resize_workers", "Ray workers resizing"),
    ("write-workers", "concurrency.write_workers", "Ray workers writing shards"),
    ("batch-size", "concurrency.batch_size", "rows per Ray Data batch"),
    ("mlflow-experiment", "mlflow_experiment", "MLflow experiment to log the run to"),
)
_SWITCHES = (
    ("allow-private-networks", "download.allow_private_networks", "allow loopback/private download targets"),
    ("respect-x-robots-tag", "download.respect_x_robots_tag", "skip images whose X-Robots-Tag opts out"),
    ("resize-only-if-bigger", "resize_only_if_bigger", "never enlarge images"),
    ("dedup-urls", "dedup.urls", "drop repeated URLs"),
    ("dedup-content", "dedup.content", "drop repeated image bytes"),
    ("clip-score-use-gpu", "filters.clip_score.use_gpu", "score on a GPU"),
)
_FLAG_FOR_FIELD = {path: flag for flag, path, _ in _OPTIONS + _SWITCHES}
_SET_EXAMPLE = "download.max_per_host=8"


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Ingest URL+caption lists into img2dataset-compatible WebDataset shards and Parquet.",
    )
    add_config_arguments(parser, _OPTIONS, _SWITCHES, _SET_EXAMPLE)
    return parser


if __name__ == "__main__":
    print(IngestConfig.load().to_yaml(), end="")
