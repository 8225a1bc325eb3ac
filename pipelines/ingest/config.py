"""The ingest job's one typed configuration: loaded from YAML, overridden from the command line, validated
before any work starts, and dumped back to YAML verbatim (written beside the output and logged to MLflow).
Defaults follow img2dataset where it has the same knob.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]
Interpolation = Literal["nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"]
# Per output format: the range of encode_quality and its default. PNG's "quality" is its zlib level (0-9).
ENCODE_QUALITY_RANGES = {"jpg": (0, 100, 95), "webp": (1, 100, 95), "png": (0, 9, 3)}
# Pillow's own decompression-bomb limit.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one sentence naming the field and the fix."""


class _Section(BaseModel):
    # A misspelt key must fail loudly rather than silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class DownloadConfig(_Section):
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

    @field_validator("user_agent_token")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() or c in ",:;()" for c in value):
            raise ValueError("must be one word without spaces or ,:;()")
        return value


class ClipScoreConfig(_Section):
    """Keep a pair only if its image-text cosine similarity under a CLIP model reaches the threshold."""

    checkpoint: str  # URI of a checkpoint in the project's format
    model: str = "ViT-B-32"
    threshold: float = Field(0.3, ge=-1.0, le=1.0)  # LAION-400M kept pairs with ViT-B/32 similarity >= 0.3
    batch_size: int = Field(256, gt=0)
    use_gpu: bool = False


class FiltersConfig(_Section):
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


class DedupConfig(_Section):
    urls: bool = True  # drop rows whose URL appeared earlier in input order
    content: bool = True  # drop images whose bytes (sha256) appeared earlier in input order


class ConcurrencyConfig(_Section):
    """Ray Data knobs; None lets Ray size the stage to the cluster."""

    download_workers: int | None = Field(None, gt=0)
    resize_workers: int | None = Field(None, gt=0)
    write_workers: int | None = Field(None, gt=0)
    batch_size: int = Field(256, gt=0)  # rows per Ray Data batch between stages


class IngestConfig(_Section):
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

    download: DownloadConfig = Field(default_factory=DownloadConfig)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    concurrency: ConcurrencyConfig = Field(default_factory=ConcurrencyConfig)
    mlflow_experiment: str | None = None

    @field_validator("input", "output")
    @classmethod
    def _uri_without_credentials(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        # The config is dumped beside the output and logged to MLflow, so secrets must not live in it.
        if "://" in value and urlsplit(value).password is not None:
            raise ValueError(
                "must not embed credentials; set them in the AWS_* environment variables instead"
            )
        return value

    @field_validator("caption_col", "mlflow_experiment", mode="before")
    @classmethod
    def _empty_means_none(cls, value: Any) -> Any:
        # From the command line, "--caption-col ''" is the way to say "no captions".
        return None if isinstance(value, str) and value.strip() in ("", "null", "none", "None") else value

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
        )

    # -----------------------------------------------------------------------------------------------------
    # YAML in and out

    def to_yaml(self) -> str:
        """The resolved config as YAML, every field included, in declaration order."""
        return yaml.safe_dump(self.model_dump(mode="python"), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str) -> IngestConfig:
        return validate_config(_parse_yaml(text, "the YAML text"))

    @classmethod
    def from_yaml_file(cls, uri: str) -> IngestConfig:
        return validate_config(_read_yaml_file(uri))


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of config fields, not a {type(data).__name__}")
    return data


def _read_yaml_file(uri: str) -> dict[str, Any]:
    from pipelines import storage

    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {uri} does not exist; check the --config path") from None
    return _parse_yaml(text, f"config file {uri}")


def validate_config(data: dict[str, Any]) -> IngestConfig:
    """Build an IngestConfig, turning pydantic's errors into one sentence that names each bad field."""
    try:
        return IngestConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def _explain(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        flag = _FLAG_FOR_FIELD.get(field)
        where = f"{field} (--{flag})" if flag else field or "the config"
        if item["type"] == "missing":
            problems.append(f"{where} is required")
        elif item["type"] == "extra_forbidden":
            problems.append(f"{where} is not a known field (misspelt?)")
        else:
            message = item["msg"].removeprefix("Value error, ")
            if isinstance(item.get("input"), dict):  # a check across fields: the message names them
                problems.append(message)
            else:
                problems.append(f"{where} = {_redacted(item.get('input'))!r}: {message}")
    return "Invalid ingest config: " + "; ".join(problems) + "."


def _redacted(value: Any) -> Any:
    # Error messages reach logs; a URI with an embedded password must not carry it there.
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.password is not None:
            return value.replace(f":{parts.password}@", ":***@", 1)
    return value


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
    ("timeout-s", "download.timeout_s", "total download deadline per URL in seconds"),
    ("max-body-bytes", "download.max_body_bytes", "largest image accepted, in bytes"),
    ("max-redirects", "download.max_redirects", "redirects followed per URL"),
    ("max-retries", "download.max_retries", "retries of transient download failures"),
    ("user-agent-token", "download.user_agent_token", "bot name in the User-Agent"),
    ("max-in-flight", "download.max_in_flight", "concurrent requests per download worker"),
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


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Ingest URL+caption lists into img2dataset-compatible WebDataset shards and Parquet.",
    )
    parser.add_argument(
        "--config", help="YAML file (local or s3://) with the config; options below override it"
    )
    # Unset options stay absent from the namespace, so only what the user typed overrides the YAML.
    for flag, path, help_text in _OPTIONS:
        parser.add_argument(f"--{flag}", dest=path, default=argparse.SUPPRESS, help=help_text)
    for flag, path, help_text in _SWITCHES:
        parser.add_argument(
            f"--{flag}",
            dest=path,
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=help_text,
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any field by its dotted path, e.g. --set download.max_per_host=8 (VALUE is YAML)",
    )
    return parser


def load_config(argv: Sequence[str] | None = None) -> IngestConfig:
    """The validated config from `--config FILE.yaml` (optional) and command-line overrides."""
    args = vars(build_arg_parser().parse_args(argv))
    config_uri = args.pop("config", None)
    overrides = args.pop("overrides")
    data = _read_yaml_file(config_uri) if config_uri else {}
    for path, value in args.items():
        _set_path(data, path, value)
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"--set {item!r} must look like FIELD=VALUE, e.g. --set download.max_retries=3")
        _set_path(data, path.strip(), _parse_yaml_value(text))
    return validate_config(data)


def _parse_yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for name in parents:
        child = node.get(name)
        if not isinstance(child, dict):
            child = {}
            node[name] = child
        node = child
    node[leaf] = value


if __name__ == "__main__":
    print(load_config().to_yaml(), end="")
