"""The ingest job's one typed configuration, composed of the sections each stage defines: loaded from YAML,
overridden from the command line, validated before any work starts, and dumped back to YAML verbatim
(written beside the output and logged to MLflow). Defaults follow img2dataset where it has the same knob.
"""

from __future__ import annotations

import argparse
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
from pipelines.ingest.dedup import DedupConfig
from pipelines.ingest.downloader import DownloaderConfig
from pipelines.ingest.filters import FilterConfig
from pipelines.ingest.resizer import ResizerConfig


class ConcurrencyConfig(Section):
    """Ray Data knobs; None lets Ray size the stage to the cluster."""

    download_workers: int | None = Field(None, gt=0)


class _InputOutput(Section):
    """The first keys of the ingest config: what to read, how to cut it into shards, where to write. A base of
    IngestConfig only so that the YAML keeps these keys ahead of the resizer's."""

    input: str  # file, folder or glob; local path or s3://
    output: str  # folder; local path or s3://
    input_format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = "auto"
    url_col: str = "url"
    caption_col: str | None = "caption"  # None: the input has no captions
    samples_per_shard: int = Field(10_000, gt=0)
    # "incremental" skips shards already committed in the output; "overwrite" clears the output first.
    incremental_mode: Literal["incremental", "overwrite"] = "incremental"

    @field_validator("input", "output")
    @classmethod
    def _uri_without_credentials(cls, value: str) -> str:
        return check_uri(value)

    @field_validator("url_col")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a column")
        return value


class IngestConfig(ResizerConfig, _InputOutput):
    """Each stage's section, composed: the resizer's knobs at the top level (as in img2dataset), the others
    nested under their stage's name. Each section validates itself; checks across sections live here."""

    download: DownloaderConfig = Field(default_factory=DownloaderConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    concurrency: ConcurrencyConfig = Field(default_factory=ConcurrencyConfig)
    mlflow_experiment: str | None = None

    @field_validator("caption_col", "mlflow_experiment", mode="before")
    @classmethod
    def _empty_means_none(cls, value: Any) -> Any:
        # From the command line, "--caption-col ''" is the way to say "no captions".
        return None if isinstance(value, str) and value.strip() in ("", "null", "none", "None") else value

    @model_validator(mode="after")
    def _cross_field(self) -> IngestConfig:
        if self.url_col == self.caption_col:
            raise ValueError(f"url_col and caption_col are both {self.url_col!r}; they must differ")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("input and output are the same location; the output needs its own folder")
        return self

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
