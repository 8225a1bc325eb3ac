"""pipelines.demo.scenes: drawn scenes are deterministic and their captions say what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.demo import scenes


def test_same_index_and_seed_give_the_same_scene():
    a, b = scenes.make_scene(7, seed=3), scenes.make_scene(7, seed=3)
    assert a.caption == b.caption
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_other_seed_gives_other_scenes():
    first = [scenes.make_scene(i, seed=0).caption for i in range(20)]
    second = [scenes.make_scene(i, seed=1).caption for i in range(20)]
    assert first != second


def test_caption_names_the_colour_and_shape_drawn():
    for i in range(200):
        scene = scenes.make_scene(i)
        assert scene.color in scene.caption
        assert scene.shape in scene.caption
        assert scene.color in scenes.COLORS and scene.shape in scenes.SHAPES


def test_dominant_foreground_colour_is_the_captioned_one():
    # On a gray background the drawn pixels are the ones far from gray; their mean is nearest the caption's colour.
    checked = 0
    for i in range(300):
        scene = scenes.make_scene(i, size=(96, 96))
        if "gray" not in scene.caption or scene.shape == "ring":
            continue
        pixels = np.asarray(scene.image).reshape(-1, 3).astype(float)
        foreground = pixels[np.abs(pixels - 128).max(axis=1) > 60]
        mean = foreground.mean(axis=0)
        nearest = min(scenes.COLORS, key=lambda c: np.linalg.norm(np.array(scenes.COLORS[c]) - mean))
        assert nearest == scene.color, (i, scene.caption)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("size", [(64, 64), (150, 90), (300, 600)])
def test_any_size_is_drawn_in_rgb(size):
    scene = scenes.make_scene(0, size=size)
    assert scene.image.size == size and scene.image.mode == "RGB"


def test_every_class_appears_in_a_few_hundred_scenes():
    drawn = [scenes.make_scene(i) for i in range(400)]
    assert {s.color for s in drawn} == set(scenes.COLORS)
    assert {s.shape for s in drawn} == set(scenes.SHAPES)


def test_retrieval_captions_all_describe_the_scene():
    scene = scenes.make_scene(5, seed=1)
    captions = scenes.retrieval_captions(scene, 4)
    assert captions[0] == scene.caption and len(set(captions)) == 4
    assert all(scene.color in c and scene.shape in c for c in captions)
