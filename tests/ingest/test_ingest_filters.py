"""Tests for pipelines/ingest/filters.py: every size and caption rule at its boundaries, untouched failures,
batch forms equal to the per-sample form, and the CLIP-score filter against a direct clip_core computation
with a tiny checkpoint read from a local path and from the real S3 store."""

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import clip_core
from pipelines import storage
from pipelines.ingest.filters import ClipScorer, FilterConfig, filter_batch, filter_reasons, filter_sample

torch.set_num_threads(1)


def success_row(original_width=400, original_height=300, caption="a photo of a dog", **extra) -> dict:
    row = {
        "row_index": 0,
        "key": "000000000",
        "url": "http://example.com/a.jpg",
        "caption": caption,
        "status": "success",
        "error_message": None,
        "width": 256,
        "height": 256,
        "original_width": original_width,
        "original_height": original_height,
        "sha256": "ab" * 32,
        "image": b"encoded image",
        "image_ext": "jpg",
    }
    return row | extra


def kept(sample: dict, config: FilterConfig) -> bool:
    out = filter_sample(sample, config)
    assert out["status"] in ("success", "filtered")
    return out["status"] == "success"


# ---------------------------------------------------------------------------------------------------------
# Rules


def test_min_image_size_is_on_the_shorter_original_side_and_equal_passes():
    config = FilterConfig(min_image_size=200)
    assert kept(success_row(200, 900), config)
    assert kept(success_row(900, 200), config)
    assert not kept(success_row(199, 900), config)
    assert not kept(success_row(900, 199), config)
    out = filter_sample(success_row(120, 80), config)
    assert out["status"] == "filtered"
    assert out["error_message"] == "image 120x80 is smaller than min_image_size 200"


def test_size_rules_use_the_original_size_not_the_resized_one():
    # Resized to 256x256 for output, but the source was tiny.
    sample = success_row(120, 80, width=256, height=256)
    assert not kept(sample, FilterConfig(min_image_size=200))
    # Resized down to 64x48, but the source was large.
    assert kept(success_row(4000, 3000, width=64, height=48), FilterConfig(min_image_size=200))


def test_max_aspect_ratio_boundary():
    config = FilterConfig(max_aspect_ratio=3)
    assert kept(success_row(300, 100), config)
    assert kept(success_row(100, 300), config)
    assert not kept(success_row(100, 301), config)
    out = filter_sample(success_row(301, 100), config)
    assert out["error_message"] == "image 301x100 has aspect ratio 3.01, above max_aspect_ratio 3"


def test_max_image_area_boundary():
    config = FilterConfig(max_image_area=1000 * 1000)
    assert kept(success_row(1000, 1000), config)
    out = filter_sample(success_row(1001, 1000), config)
    assert out["status"] == "filtered"
    assert "area 1001000, above max_image_area 1000000" in out["error_message"]


def test_caption_characters_boundaries_ignore_surrounding_whitespace():
    config = FilterConfig(min_caption_chars=5, max_caption_chars=10)
    assert kept(success_row(caption="abcde"), config)
    assert kept(success_row(caption="abcdefghij"), config)
    assert not kept(success_row(caption="abcd"), config)
    assert not kept(success_row(caption="   abcd   "), config)
    assert not kept(success_row(caption="abcdefghijk"), config)
    assert filter_sample(success_row(caption="abcd"), config)["error_message"] == (
        "caption has 4 characters, fewer than min_caption_chars 5"
    )
    assert filter_sample(success_row(caption="abcdefghijk"), config)["error_message"] == (
        "caption has 11 characters, more than max_caption_chars 10"
    )


def test_caption_words_boundaries():
    # DataComp's basic filter: more than 2 words.
    config = FilterConfig(min_caption_words=3, max_caption_words=5)
    assert kept(success_row(caption="a red car"), config)
    assert kept(success_row(caption="a  red\tcar on\nroad"), config)
    assert not kept(success_row(caption="red car"), config)
    assert not kept(success_row(caption="one two three four five six"), config)
    assert filter_sample(success_row(caption="red car"), config)["error_message"] == (
        "caption has 2 words, fewer than min_caption_words 3"
    )
    assert filter_sample(success_row(caption="one two three four five six"), config)["error_message"] == (
        "caption has 6 words, more than max_caption_words 5"
    )


def test_null_caption_fails_a_minimum_and_passes_without_one():
    assert not kept(success_row(caption=None), FilterConfig(min_caption_chars=1))
    assert not kept(success_row(caption=float("nan")), FilterConfig(min_caption_words=1))
    assert filter_sample(success_row(caption=None), FilterConfig(min_caption_chars=5))["error_message"] == (
        "caption is missing, min_caption_chars is 5"
    )
    assert kept(success_row(caption=None), FilterConfig(max_caption_chars=10, max_caption_words=3))


def test_default_config_keeps_everything():
    assert kept(success_row(1, 1000, caption=""), FilterConfig())
    assert kept(success_row(1, 1, caption=None), FilterConfig())


def test_every_broken_rule_is_named_and_the_image_bytes_are_dropped():
    config = FilterConfig(min_image_size=200, max_aspect_ratio=1.5, min_caption_words=3)
    out = filter_sample(success_row(100, 50, caption="dog"), config)
    assert out["status"] == "filtered"
    assert out["error_message"].split("; ") == [
        "image 100x50 is smaller than min_image_size 200",
        "image 100x50 has aspect ratio 2, above max_aspect_ratio 1.5",
        "caption has 1 words, fewer than min_caption_words 3",
    ]
    assert out["image"] is None
    # The metadata written to Parquet stays.
    assert (out["original_width"], out["original_height"], out["sha256"]) == (100, 50, "ab" * 32)


def test_already_failed_rows_pass_through_untouched():
    config = FilterConfig(min_image_size=200, min_caption_chars=5, min_caption_words=2)
    for status in ("failed_to_download", "failed_to_decode", "filtered", "duplicate"):
        row = success_row(1, 1, caption=None, status=status, error_message="earlier reason", image=None)
        out = filter_sample(row, config)
        assert out == row
        assert out["error_message"] == "earlier reason"


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        FilterConfig(max_aspect_ratio=0.5)
    with pytest.raises(ValueError, match="min_image_size"):
        FilterConfig(min_image_size=-1)
    with pytest.raises(ValueError, match="max_caption_words"):
        FilterConfig(min_caption_words=4, max_caption_words=3)


def test_filter_reasons_handles_a_zero_side():
    reasons = filter_reasons(0, 10, "caption", FilterConfig(max_aspect_ratio=3))
    assert reasons == ["image 0x10 has aspect ratio inf, above max_aspect_ratio 3"]


def test_infinite_limits_from_the_ingest_config_turn_rules_off_and_float_limits_read_as_integers():
    off = FilterConfig(max_image_area=math.inf, max_aspect_ratio=math.inf)
    assert kept(success_row(100_000, 1), off)
    out = filter_sample(success_row(2000, 1000), FilterConfig(max_image_area=1e6, max_aspect_ratio=1.5))
    assert out["error_message"] == (
        "image 2000x1000 has area 2000000, above max_image_area 1000000; "
        "image 2000x1000 has aspect ratio 2, above max_aspect_ratio 1.5"
    )


# ---------------------------------------------------------------------------------------------------------
# Batches


def mixed_rows() -> list[dict]:
    return [
        success_row(400, 300, caption="a photo of a dog", row_index=0),
        success_row(120, 80, caption="a small picture", row_index=1),
        success_row(900, 100, caption="a long banner image", row_index=2),
        success_row(400, 400, caption="dog", row_index=3),
        success_row(None, None, caption=None, row_index=4, status="failed_to_download", image=None,
                    width=None, height=None, error_message="HTTP 404 Not Found"),
        success_row(500, 500, caption=None, row_index=5),
    ]  # fmt: skip


BATCH_CONFIG = FilterConfig(min_image_size=200, max_aspect_ratio=3, min_caption_words=2)


def test_filter_batch_of_numpy_arrays_equals_the_per_sample_form():
    rows = mixed_rows()
    batch = {name: np.array([row[name] for row in rows], dtype=object) for name in rows[0]}
    out = filter_batch(batch, BATCH_CONFIG)
    expected = [filter_sample(row, BATCH_CONFIG) for row in rows]
    assert [str(s) for s in out["status"]] == [e["status"] for e in expected]
    assert list(out["status"]) == [
        "success",
        "filtered",
        "filtered",
        "filtered",
        "failed_to_download",
        "filtered",
    ]
    assert list(out["error_message"]) == [e["error_message"] for e in expected]
    assert list(out["image"]) == [e["image"] for e in expected]
    assert out["image"][0] == b"encoded image"
    # The input batch is not modified.
    assert list(batch["status"]).count("success") == 5


def test_filter_batch_of_a_dataframe_with_nan_for_missing_values():
    rows = mixed_rows()
    frame = pd.DataFrame(rows)
    frame["original_width"] = frame["original_width"].astype(
        float
    )  # how pandas stores an int column with nulls
    out = filter_batch(frame, BATCH_CONFIG)
    assert isinstance(out, pd.DataFrame)
    assert list(out["status"]) == [filter_sample(row, BATCH_CONFIG)["status"] for row in rows]
    assert out.loc[4, "error_message"] == "HTTP 404 Not Found"
    assert out.loc[1, "error_message"] == "image 120x80 is smaller than min_image_size 200"
    assert list(out["row_index"]) == list(range(6))


# ---------------------------------------------------------------------------------------------------------
# CLIP score


def image_bytes(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "vit_tiny_16.pt"
    clip_core.save_checkpoint(clip_core.create_model("ViT-Tiny-16"), path)
    return str(path)


CAPTIONS = ["a dog on a beach", "red car", "a bowl of soup", None, "mountains at dawn", "a cat", "text"]


def scoring_batch() -> dict[str, np.ndarray]:
    n = len(CAPTIONS)
    status = ["success"] * n
    status[5] = "failed_to_download"
    images = [image_bytes(64 + 16 * i, 48 + 8 * i, seed=i, fmt="JPEG" if i % 2 else "PNG") for i in range(n)]
    images[5] = None
    columns = {
        "row_index": np.arange(n),
        "caption": CAPTIONS,
        "status": status,
        "error_message": [None] * 5 + ["HTTP 404 Not Found", None],
        "image": images,
    }
    out = {}
    for name, values in columns.items():
        out[name] = np.empty(n, dtype=object)
        out[name][:] = list(values)
    return out


def direct_scores(checkpoint: str, images: list[bytes], captions: list[str]) -> np.ndarray:
    model = clip_core.create_model("ViT-Tiny-16", pretrained=checkpoint).eval()
    preprocess = clip_core.image_transform(64, is_train=False)
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])
    with torch.no_grad():
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(clip_core.tokenize(captions))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return (image_features * text_features).sum(dim=-1).numpy()


def test_clip_scores_equal_a_direct_clip_core_computation(tiny_checkpoint):
    batch = scoring_batch()
    # batch_size 2 so that the rows are scored over several forward passes.
    scorer = ClipScorer(tiny_checkpoint, "ViT-Tiny-16", threshold=None, batch_size=2)
    out = scorer(batch)
    success = [i for i in range(len(CAPTIONS)) if i != 5]
    expected = direct_scores(
        tiny_checkpoint, [batch["image"][i] for i in success], [CAPTIONS[i] or "" for i in success]
    )
    scores = np.array([out["clip_score"][i] for i in success], dtype=np.float64)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert len(set(np.round(scores, 6))) == len(success)  # the pairs really differ
    assert out["clip_score"][5] is None
    assert list(out["status"]) == list(batch["status"])  # no threshold: only scores


def test_clip_score_threshold_marks_the_rows_below_it_filtered(tiny_checkpoint):
    batch = scoring_batch()
    scores = ClipScorer(tiny_checkpoint, "ViT-Tiny-16", threshold=None)(batch)["clip_score"]
    threshold = float(np.median([s for s in scores if s is not None]))
    out = ClipScorer(tiny_checkpoint, "ViT-Tiny-16", threshold=threshold, batch_size=4)(batch)
    for i, score in enumerate(scores):
        if i == 5:
            assert (out["status"][i], out["error_message"][i]) == ("failed_to_download", "HTTP 404 Not Found")
            assert out["clip_score"][i] is None
        elif score < threshold:
            assert out["status"][i] == "filtered"
            assert out["error_message"][i] == (
                f"clip_score {score:.4f} is below clip_score_threshold {threshold}"
            )
            assert out["image"][i] is None
            assert out["clip_score"][i] == pytest.approx(score, abs=1e-6)
        else:
            assert out["status"][i] == "success"
            assert out["error_message"][i] is None
            assert out["image"][i] == batch["image"][i]
    assert list(out["status"]).count("filtered") == 3


def test_clip_scorer_takes_a_dataframe_and_reports_undecodable_images(tiny_checkpoint):
    frame = pd.DataFrame(scoring_batch())
    frame.loc[2, "image"] = b"<html>not an image</html>"
    out = ClipScorer(tiny_checkpoint, "ViT-Tiny-16", threshold=None)(frame)
    assert isinstance(out, pd.DataFrame)
    assert out.loc[2, "status"] == "failed_to_decode"
    assert out.loc[2, "error_message"].startswith("CLIP scorer cannot decode the image")
    assert out.loc[2, "clip_score"] is None and out.loc[2, "image"] is None
    assert out["clip_score"].notna().sum() == 5


def test_clip_scorer_loads_its_checkpoint_from_s3(tiny_checkpoint, local_stack_env, s3_prefix):
    uri = storage.join(s3_prefix, "checkpoints", "vit_tiny_16.pt")
    with open(tiny_checkpoint, "rb") as f:
        storage.write_bytes(uri, f.read())
    batch = scoring_batch()
    from_s3 = ClipScorer(uri, "ViT-Tiny-16", threshold=None)(batch)["clip_score"]
    from_disk = ClipScorer(tiny_checkpoint, "ViT-Tiny-16", threshold=None)(batch)["clip_score"]
    assert from_s3[5] is None
    np.testing.assert_allclose(
        [s for s in from_s3 if s is not None], [s for s in from_disk if s is not None], atol=1e-6
    )
    # A checkpoint for another architecture is refused, not silently half-loaded.
    with pytest.raises(clip_core.CheckpointError):
        other = clip_core.get_model_config("ViT-Tiny-16") | {"embed_dim": 32}
        ClipScorer(uri, other, threshold=None)
