"""Tests for clip_core.transforms: evaluation output identical to OpenCLIP's, training crops shaped,
normalised and repeatable under a seed."""

import pickle

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_core.transforms import CLIP_MEAN, CLIP_STD, image_transform


def sample_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    return {
        "rgb_square": Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8), "RGB"),
        "rgb_wide": Image.fromarray(rng.integers(0, 256, (50, 131, 3), dtype=np.uint8), "RGB"),
        "rgb_tall_small": Image.fromarray(rng.integers(0, 256, (47, 23, 3), dtype=np.uint8), "RGB"),
        "rgba": Image.fromarray(rng.integers(0, 256, (90, 70, 4), dtype=np.uint8), "RGBA"),
        "grayscale": Image.fromarray(rng.integers(0, 256, (64, 97), dtype=np.uint8), "L"),
        "palette": Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "RGB").convert("P"),
    }


def test_clip_statistics_are_openais():
    assert CLIP_MEAN == open_clip.OPENAI_DATASET_MEAN
    assert CLIP_STD == open_clip.OPENAI_DATASET_STD


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("name", list(sample_images()))
def test_eval_transform_equals_open_clip(name, image_size):
    image = sample_images()[name]
    ours = image_transform(image_size, is_train=False)(image)
    reference = open_clip.image_transform(image_size, is_train=False)(image)
    assert ours.shape == (3, image_size, image_size)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, reference)


def test_eval_transform_uses_given_statistics():
    image = sample_images()["rgb_wide"]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    ours = image_transform(32, is_train=False, mean=mean, std=std)(image)
    reference = open_clip.image_transform(32, is_train=False, mean=mean, std=std)(image)
    assert torch.equal(ours, reference)


def normalised_range(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (0 - mean) / std, (1 - mean) / std


@pytest.mark.parametrize("name", list(sample_images()))
def test_train_transform_shape_and_range(name):
    out = image_transform(48, is_train=True)(sample_images()[name])
    assert out.shape == (3, 48, 48)
    assert out.dtype == torch.float32
    low, high = normalised_range(CLIP_MEAN, CLIP_STD)
    assert torch.all(out >= low - 1e-5) and torch.all(out <= high + 1e-5)


def test_train_transform_is_repeatable_under_a_seed_and_random_across_seeds():
    image = sample_images()["rgb_wide"]
    transform = image_transform(32, is_train=True, scale=(0.3, 1.0))
    torch.manual_seed(7)
    first = transform(image)
    torch.manual_seed(7)
    again = transform(image)
    assert torch.equal(first, again)
    crops = []
    for seed in range(5):
        torch.manual_seed(seed)
        crops.append(transform(image))
    assert any(not torch.equal(crops[0], crop) for crop in crops[1:])


@pytest.mark.parametrize("name", ["rgb_wide", "rgba", "grayscale"])
def test_train_transform_equals_open_clip_default_under_the_same_seed(name):
    image = sample_images()[name]
    torch.manual_seed(3)
    ours = image_transform(40, is_train=True)(image)
    torch.manual_seed(3)
    reference = open_clip.image_transform(40, is_train=True)(image)
    assert torch.equal(ours, reference)


def test_transform_pickles_for_ray_workers():
    image = sample_images()["rgba"]
    transform = image_transform(32, is_train=False)
    restored = pickle.loads(pickle.dumps(transform))
    assert torch.equal(restored(image), transform(image))
