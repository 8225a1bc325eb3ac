"""The ingest config: YAML + command-line overrides, validation messages, YAML round trip, the stages' own
sections composed into it, and img2dataset's defaults."""

import inspect
import math
import os

import pytest
import yaml

from pipelines.config import ConfigError
from pipelines.ingest import image_headers
from pipelines.ingest.config import IngestConfig, build_arg_parser
from pipelines.ingest.dedup import DedupConfig
from pipelines.ingest.downloader import DownloaderConfig
from pipelines.ingest.filters import FilterConfig
from pipelines.ingest.resizer import Resizer, ResizerConfig

REQUIRED = ["--input", "in/urls.parquet", "--output", "out"]


def test_defaults_follow_img2dataset():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    theirs = inspect.signature(img2dataset.download).parameters
    cfg = IngestConfig.load(REQUIRED)
    assert cfg.image_size == theirs["image_size"].default == 256
    assert cfg.resize_mode == theirs["resize_mode"].default == "border"
    assert cfg.resize_only_if_bigger is theirs["resize_only_if_bigger"].default is False
    assert cfg.samples_per_shard == theirs["number_sample_per_shard"].default == 10_000
    assert cfg.encode_quality == theirs["encode_quality"].default == 95
    assert cfg.output_format == theirs["encode_format"].default == "jpg"
    assert cfg.url_col == theirs["url_col"].default
    assert cfg.upscale_interpolation == theirs["upscale_interpolation"].default
    assert cfg.downscale_interpolation == theirs["downscale_interpolation"].default
    assert cfg.filters.min_image_size == theirs["min_image_size"].default == 0
    assert cfg.filters.max_aspect_ratio == theirs["max_aspect_ratio"].default == math.inf
    assert cfg.filters.max_image_area == theirs["max_image_area"].default == math.inf
    assert cfg.download.timeout_s == 30 and cfg.download.respect_x_robots_tag
    assert not cfg.download.allow_private_networks
    assert cfg.dedup.urls and cfg.dedup.content and cfg.filters.clip_score is None


def test_yaml_then_command_line_overrides(tmp_path):
    config_file = tmp_path / "ingest.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "input": "s3://bucket/cc3m/*.tsv.gz",
                "output": "s3://bucket/cc3m-shards",
                "url_col": "URL",
                "caption_col": "TEXT",
                "image_size": 384,
                "download": {"max_retries": 4, "allow_private_networks": True},
                "filters": {"min_image_size": 100, "clip_score": {"checkpoint": "s3://b/ckpt.pt"}},
                "dedup": {"content": False},
            }
        )
    )
    cfg = IngestConfig.load(
        [
            "--config",
            str(config_file),
            "--image-size",
            "224",
            "--resize-mode",
            "center_crop",
            "--samples-per-shard",
            "1000",
            "--no-allow-private-networks",
            "--max-aspect-ratio",
            "3",
            "--output-format",
            "webp",
            "--mlflow-experiment",
            "ingest-cc3m",
            "--clip-score-threshold",
            "0.28",
            "--set",
            "download.max_per_host=8",
            "--set",
            "concurrency.download_workers=12",
        ]
    )
    # From the YAML, untouched by the command line.
    assert cfg.input == "s3://bucket/cc3m/*.tsv.gz" and cfg.url_col == "URL" and cfg.caption_col == "TEXT"
    assert cfg.download.max_retries == 4 and cfg.filters.min_image_size == 100 and not cfg.dedup.content
    assert cfg.filters.clip_score.checkpoint == "s3://b/ckpt.pt"
    # Overridden.
    assert cfg.image_size == 224 and cfg.resize_mode == "center_crop" and cfg.samples_per_shard == 1000
    assert cfg.download.allow_private_networks is False
    assert cfg.filters.max_aspect_ratio == 3.0 and cfg.output_format == "webp"
    assert cfg.mlflow_experiment == "ingest-cc3m" and cfg.filters.clip_score.threshold == 0.28
    assert cfg.download.max_per_host == 8 and cfg.concurrency.download_workers == 12


def test_command_line_alone_and_no_captions():
    cfg = IngestConfig.load(
        REQUIRED + ["--caption-col", "", "--allow-private-networks", "--min-image-size", "200"]
    )
    assert cfg.caption_col is None
    assert cfg.download.allow_private_networks is True and cfg.filters.min_image_size == 200
    assert cfg.input == "in/urls.parquet" and cfg.output == "out"


def test_every_required_option_from_the_brief_exists():
    flags = {opt for action in build_arg_parser()._actions for opt in action.option_strings}
    for flag in [
        "--input",
        "--output",
        "--config",
        "--image-size",
        "--resize-mode",
        "--samples-per-shard",
        "--url-col",
        "--caption-col",
        "--allow-private-networks",
        "--output-format",
        "--min-image-size",
        "--max-aspect-ratio",
        "--mlflow-experiment",
    ]:
        assert flag in flags


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--output", "out"], ["input (--input) is required"]),
        (REQUIRED + ["--image-size", "-3"], ["image_size (--image-size)", "greater than 0"]),
        (REQUIRED + ["--image-size", "big"], ["image_size (--image-size) = 'big'", "integer"]),
        (
            REQUIRED + ["--resize-mode", "stretch"],
            ["resize_mode (--resize-mode) = 'stretch'", "'center_crop'"],
        ),
        (REQUIRED + ["--output-format", "gif"], ["output_format (--output-format) = 'gif'"]),
        (REQUIRED + ["--samples-per-shard", "0"], ["samples_per_shard"]),
        (REQUIRED + ["--max-aspect-ratio", "0.5"], ["filters.max_aspect_ratio (--max-aspect-ratio)"]),
        (REQUIRED + ["--timeout-s", "301"], ["download.timeout_s (--timeout-s)", "300"]),
        (REQUIRED + ["--output-format", "png", "--encode-quality", "50"], ["encode_quality 50", "[0, 9]"]),
        (REQUIRED + ["--set", "download.max_retrys=3"], ["download.max_retrys is not a known field"]),
        (REQUIRED + ["--clip-score-threshold", "0.3"], ["filters.clip_score.checkpoint", "required"]),
        (REQUIRED + ["--url-col", "text", "--caption-col", "text"], ["url_col and caption_col"]),
        (["--input", "out", "--output", "out/"], ["input and output are the same location"]),
        (
            REQUIRED + ["--min-caption-chars", "10", "--max-caption-chars", "5"],
            ["filters.max_caption_chars (5) is below filters.min_caption_chars (10)"],
        ),
        (REQUIRED + ["--set", "oops"], ["FIELD=VALUE"]),
        (REQUIRED + ["--allowed-formats", "jpeg,ico"], ["allowed_formats.1 (--allowed-formats) = 'ICO'"]),
        (REQUIRED + ["--set", "allowed_formats=[]"], ["allowed_formats (--allowed-formats)", "at least 1"]),
        (REQUIRED + ["--max-jpeg-scans", "0"], ["max_jpeg_scans (--max-jpeg-scans)", "greater than 0"]),
        (
            REQUIRED + ["--max-bytes-in-flight", "1000000"],
            ["download.max_bytes_in_flight (1000000) is below download.max_body_bytes (33554432)"],
        ),
    ],
)
def test_invalid_config_is_one_clear_sentence(argv, expected):
    with pytest.raises(ConfigError) as error:
        IngestConfig.load(argv)
    message = str(error.value)
    assert message.startswith("Invalid ingest config: ") or message.startswith("--set")
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        IngestConfig.load(["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        IngestConfig.load(["--config", str(bad)])


def test_credentials_never_enter_the_config_or_its_errors():
    with pytest.raises(ConfigError) as error:
        IngestConfig.load(["--input", "s3://AKIAKEY:topsecret@bucket/urls", "--output", "out"])
    assert "topsecret" not in str(error.value) and "credentials" in str(error.value)
    # Only known fields are accepted, so a secret cannot be slipped in under some other key.
    with pytest.raises(ConfigError, match="aws_secret_access_key is not a known field"):
        IngestConfig.from_yaml("input: a\noutput: b\naws_secret_access_key: x\n")


def test_dump_round_trips_verbatim(tmp_path):
    cfg = IngestConfig.load(
        REQUIRED
        + ["--caption-col", "", "--max-caption-chars", "300", "--clip-score-checkpoint", "s3://b/c.pt"]
        + ["--output-format", "png", "--no-dedup-urls"]
    )
    text = cfg.to_yaml()
    data = yaml.safe_load(text)
    # Every field is written, including defaults and the resolved encode quality.
    assert list(data) == list(IngestConfig.model_fields)
    assert data["encode_quality"] == 3 and data["filters"]["max_aspect_ratio"] == math.inf
    assert data["caption_col"] is None and data["filters"]["clip_score"]["model"] == "ViT-B-32"
    assert IngestConfig.from_yaml(text) == cfg
    dumped = tmp_path / "config.yaml"
    dumped.write_text(text)
    assert IngestConfig.load(["--config", str(dumped)]) == cfg
    assert IngestConfig.load(["--config", str(dumped)]).to_yaml() == text


def test_each_stage_reads_its_own_section_of_the_ingest_config():
    cfg = IngestConfig.load(
        REQUIRED + ["--image-size", "64", "--output-format", "webp", "--allow-private-networks"]
    )
    # The resizer's knobs sit at the top level of the YAML; the others under their stage's name.
    assert isinstance(cfg, ResizerConfig)
    assert Resizer(cfg).config.image_size == 64 and (cfg.output_format, cfg.encode_quality) == ("webp", 95)
    assert isinstance(cfg.download, DownloaderConfig) and isinstance(cfg.filters, FilterConfig)
    assert isinstance(cfg.dedup, DedupConfig)
    assert cfg.download.allow_private_networks and cfg.download.timeout_s == 30
    # A section built alone and the same section inside the ingest config are the same thing.
    assert cfg.download == DownloaderConfig(allow_private_networks=True)
    assert (
        IngestConfig.load(REQUIRED).filters == FilterConfig()
        and IngestConfig.load(REQUIRED).dedup == DedupConfig()
    )


def test_decode_and_download_budgets_reach_the_stage_configs():
    cfg = IngestConfig.load(
        REQUIRED
        + [
            "--allowed-formats",
            "jpeg, PNG,hdr",
            "--max-jpeg-scans",
            "40",
            "--max-bytes-in-flight",
            str(1 << 28),
        ]
    )
    assert cfg.allowed_formats == ["JPEG", "PNG", "HDR"] and cfg.max_jpeg_scans == 40
    assert cfg.download.max_bytes_in_flight == 1 << 28
    defaults = IngestConfig.load(REQUIRED)
    assert tuple(defaults.allowed_formats) == image_headers.DEFAULT_ALLOWED_FORMATS
    assert defaults.max_jpeg_scans == image_headers.DEFAULT_MAX_JPEG_SCANS
    assert "HDR" not in defaults.allowed_formats
    # The YAML dump lists the formats and reads back the same.
    assert IngestConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.parametrize(
    "removed", ["concurrency.resize_workers", "concurrency.write_workers", "concurrency.batch_size"]
)
def test_removed_knobs_are_refused_as_unknown_fields(tmp_path, removed):
    # They were parsed but never read; a config that still sets one says so rather than being ignored.
    section, name = removed.split(".")
    config_file = tmp_path / "ingest.yaml"
    config_file.write_text(yaml.safe_dump({"input": "a", "output": "b", section: {name: 4}}))
    for argv in (["--config", str(config_file)], REQUIRED + ["--set", f"{removed}=4"]):
        with pytest.raises(ConfigError) as error:
            IngestConfig.load(argv)
        assert str(error.value) == f"Invalid ingest config: {removed} is not a known field (misspelt?)."
    flag = "--" + name.replace("_", "-")
    assert flag not in {opt for action in build_arg_parser()._actions for opt in action.option_strings}
