"""Ingest filters, the rules in step 3 (stage) and the CLIP score in step 4: drop pairs that would not help
training. Rules on the original image size and the caption (LAION/DataComp-style minimum side, aspect ratio,
caption length) and the optional CLIP-score filter, which scores each image against its caption with a
clip_core checkpoint. A dropped row stays, with status "filtered".
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from pipelines.config import Section, check_uri
from pipelines.formats.shards import FAILED_TO_DECODE, FILTERED, SUCCESS

Batch = dict[str, np.ndarray] | pd.DataFrame


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


class FilterConfig(Section):
    """The `filters` section of the ingest config: which pairs to keep. 0, None or math.inf turns a rule off.
    Sizes are on the original (upright) image, as in img2dataset, so a filter means the same thing whatever
    the resize settings."""

    min_image_size: int = Field(0, ge=0)  # on the shorter side of the original image, as img2dataset
    max_image_area: float = Field(math.inf, gt=0)  # width * height in pixels
    max_aspect_ratio: float = Field(math.inf, ge=1.0)  # max(w, h) / min(w, h); above it is dropped
    # Caption length in characters, after stripping surrounding whitespace, and in whitespace-separated words.
    min_caption_chars: int = Field(0, ge=0)
    max_caption_chars: int | None = Field(None, ge=0)
    min_caption_words: int = Field(0, ge=0)
    max_caption_words: int | None = Field(None, ge=0)
    clip_score: ClipScoreConfig | None = None

    @model_validator(mode="after")
    def _caption_ranges(self) -> FilterConfig:
        for low, high in (
            ("min_caption_chars", "max_caption_chars"),
            ("min_caption_words", "max_caption_words"),
        ):
            if getattr(self, high) is not None and getattr(self, high) < getattr(self, low):
                raise ValueError(
                    f"filters.{high} ({getattr(self, high)}) is below filters.{low} ({getattr(self, low)})"
                )
        return self


def _missing(value: Any) -> bool:
    # pandas turns a null int into NaN and a null string into None or NaN.
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _shown(limit: float) -> str:
    # Limits are floats (math.inf turns a rule off); messages show whole numbers as the integers they are.
    return str(int(limit)) if isinstance(limit, float) and limit.is_integer() else str(limit)


def filter_reasons(
    original_width: Any, original_height: Any, caption: Any, config: FilterConfig
) -> list[str]:
    """Every rule this pair breaks, each as a sentence naming the rule and the values; empty to keep it.
    Image rules are skipped when the size is unknown (only success rows are filtered, and those have one)."""
    reasons = []
    if not (_missing(original_width) or _missing(original_height)):
        width, height = int(original_width), int(original_height)
        short, long = min(width, height), max(width, height)
        if short < config.min_image_size:
            reasons.append(f"image {width}x{height} is smaller than min_image_size {config.min_image_size}")
        if width * height > config.max_image_area:
            reasons.append(
                f"image {width}x{height} has area {width * height}, "
                f"above max_image_area {_shown(config.max_image_area)}"
            )
        ratio = math.inf if short == 0 else long / short
        if ratio > config.max_aspect_ratio:
            reasons.append(
                f"image {width}x{height} has aspect ratio {ratio:.3g}, "
                f"above max_aspect_ratio {_shown(config.max_aspect_ratio)}"
            )

    if _missing(caption):
        if config.min_caption_chars > 0:
            reasons.append(f"caption is missing, min_caption_chars is {config.min_caption_chars}")
        if config.min_caption_words > 0:
            reasons.append(f"caption is missing, min_caption_words is {config.min_caption_words}")
        return reasons
    caption = str(caption)
    chars, words = len(caption.strip()), len(caption.split())
    if chars < config.min_caption_chars:
        reasons.append(
            f"caption has {chars} characters, fewer than min_caption_chars {config.min_caption_chars}"
        )
    if config.max_caption_chars is not None and chars > config.max_caption_chars:
        reasons.append(
            f"caption has {chars} characters, more than max_caption_chars {config.max_caption_chars}"
        )
    if words < config.min_caption_words:
        reasons.append(f"caption has {words} words, fewer than min_caption_words {config.min_caption_words}")
    if config.max_caption_words is not None and words > config.max_caption_words:
        reasons.append(f"caption has {words} words, more than max_caption_words {config.max_caption_words}")
    return reasons


def filter_sample(sample: dict, config: FilterConfig) -> dict:
    """A sample (dict with the canonical columns) -> the same sample, marked filtered if it breaks a rule.
    Rows that already failed come back untouched. A filtered row loses its image bytes (only success rows
    carry them) but keeps its sizes and sha256 for the Parquet metadata."""
    if sample.get("status") != SUCCESS:
        return sample
    reasons = filter_reasons(
        sample.get("original_width"), sample.get("original_height"), sample.get("caption"), config
    )
    if not reasons:
        return sample
    return {**sample, "status": FILTERED, "error_message": "; ".join(reasons), "image": None}


def _column(batch: Batch, name: str, n: int) -> list:
    if name in batch:
        return list(batch[name])
    return [None] * n


def _with_columns(batch: Batch, columns: dict[str, list]) -> Batch:
    """A copy of the batch with these columns replaced or added, in the batch's own format."""
    if isinstance(batch, pd.DataFrame):
        out = batch.copy(deep=False)
        for name, values in columns.items():
            out[name] = pd.Series(values, index=out.index, dtype=object)
        return out
    out = dict(batch)
    for name, values in columns.items():
        array = np.empty(len(values), dtype=object)
        array[:] = values  # element-wise, so that bytes values never become a 2-D array
        out[name] = array
    return out


def filter_batch(batch: Batch, config: FilterConfig) -> Batch:
    """filter_sample over a batch (a dict of NumPy arrays, as Ray Data's map_batches gives, or a DataFrame)."""
    n = len(batch["status"])
    status, error_message, image = (_column(batch, name, n) for name in ("status", "error_message", "image"))
    widths, heights = _column(batch, "original_width", n), _column(batch, "original_height", n)
    captions = _column(batch, "caption", n)
    for i in range(n):
        if status[i] != SUCCESS:
            continue
        reasons = filter_reasons(widths[i], heights[i], captions[i], config)
        if reasons:
            status[i], error_message[i], image[i] = FILTERED, "; ".join(reasons), None
    columns = {"status": status, "error_message": error_message}
    if "image" in batch:
        columns["image"] = image
    return _with_columns(batch, columns)


class FilterStage:
    """filter_batch as a Ray Data UDF: `ds.map_batches(FilterStage(config))`."""

    def __init__(self, config: FilterConfig):
        self.config = config

    def __call__(self, batch: Batch) -> Batch:
        return filter_batch(batch, self.config)


# ---------------------------------------------------------------------------------------------------------
# CLIP score: cosine similarity of the normalised image and caption embeddings


def load_scoring_model(checkpoint_uri: str, model_name: str | dict, device: str = "cpu"):
    """A clip_core model in eval mode with the checkpoint's weights, from a local path or an s3:// URI."""
    import clip_core
    from pipelines import storage

    if storage.is_s3(checkpoint_uri):
        # create_model loads local files only; an S3 checkpoint is read into memory and loaded from there.
        model = clip_core.create_model(model_name)
        clip_core.load_checkpoint(model, io.BytesIO(storage.read_bytes(checkpoint_uri)), strict=True)
        model.to(device)
    else:
        model = clip_core.create_model(model_name, pretrained=checkpoint_uri, device=device)
    return model.eval()


class ClipScorer:
    """Ray Data actor-pool UDF: scores every success row's (image, caption) with a CLIP model and marks rows
    below `threshold` filtered. Usage:
    `ds.map_batches(ClipScorer, fn_constructor_kwargs={...}, concurrency=n, num_gpus=1, batch_size=1024)`.

    The score is the raw cosine similarity, without the logit scale: LAION-400M's 0.3 cut-off is on that.
    A null caption is scored as the empty caption. threshold None only scores.
    """

    def __init__(
        self,
        checkpoint_uri: str,
        model_name: str | dict,
        threshold: float | None = 0.3,
        batch_size: int = 256,
        device: str = "cpu",
    ):
        import clip_core

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.threshold = threshold
        self.batch_size = batch_size
        self.device = device
        self.model = load_scoring_model(checkpoint_uri, model_name, device)
        size = self.model.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.preprocess = clip_core.image_transform(self.image_size, is_train=False)

    def score(self, images: list[bytes], captions: list[str | None]) -> tuple[np.ndarray, list[str | None]]:
        """(cosine similarity per pair, decode error per pair). An image that cannot be decoded scores NaN."""
        import torch
        from PIL import Image

        import clip_core

        scores = np.full(len(images), np.nan, dtype=np.float64)
        errors: list[str | None] = [None] * len(images)
        for start in range(0, len(images), self.batch_size):
            pixels, texts, positions = [], [], []
            for i in range(start, min(start + self.batch_size, len(images))):
                try:
                    with Image.open(io.BytesIO(images[i])) as image:
                        pixels.append(self.preprocess(image))
                except Exception as error:  # a bad image is data, whatever the library raised
                    errors[i] = f"CLIP scorer cannot decode the image: {type(error).__name__}: {error}"
                    continue
                texts.append("" if _missing(captions[i]) else str(captions[i]))
                positions.append(i)
            if not positions:
                continue
            tokens = clip_core.tokenize(texts, context_length=self.model.context_length)
            with torch.inference_mode():
                image_features = self.model.encode_image(torch.stack(pixels).to(self.device), normalize=True)
                text_features = self.model.encode_text(tokens.to(self.device), normalize=True)
                cosine = (image_features.float() * text_features.float()).sum(dim=-1)
            scores[positions] = cosine.cpu().numpy()
        return scores, errors

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["status"])
        status, error_message, image = (
            _column(batch, name, n) for name in ("status", "error_message", "image")
        )
        captions = _column(batch, "caption", n)
        clip_score: list[float | None] = [None] * n
        rows = [i for i in range(n) if status[i] == SUCCESS]
        scores, errors = self.score([image[i] for i in rows], [captions[i] for i in rows])
        for i, score, error in zip(rows, scores, errors):
            if error is not None:
                status[i], error_message[i], image[i] = FAILED_TO_DECODE, error, None
                continue
            clip_score[i] = float(score)
            if self.threshold is not None and score < self.threshold:
                status[i], image[i] = FILTERED, None
                error_message[i] = f"clip_score {score:.4f} is below clip_score_threshold {self.threshold}"
        return _with_columns(
            batch,
            {"status": status, "error_message": error_message, "image": image, "clip_score": clip_score},
        )
