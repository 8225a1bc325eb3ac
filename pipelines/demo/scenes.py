"""Deterministic generator of drawn scenes whose captions say what is drawn: learnable image-text data.

Scene i of seed s is always the same picture and caption, so the demo and the tests are reproducible, and
held-out scenes (another seed) give a zero-shot test set with known classes (the colours or the shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "pink": (250, 150, 200),
    "brown": (120, 70, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")

CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a_color} {shape}",
    "a drawing of {a_color} {shape}",
    "{a_color} {shape} on a {background} background",
    "a picture of {a_color} {shape}",
    "{color} {shape}",
    "an image showing {a_color} {shape} in the {place}",
    "a simple {color} {shape} drawn on {background}",
    "{a_shape} painted {color}",
)
# Prompts for zero-shot classification by colour or by shape ({c} is the class name).
COLOR_PROMPTS: tuple[str, ...] = ("a {c} shape", "a drawing of something {c}", "a picture of a {c} object")
SHAPE_PROMPTS: tuple[str, ...] = ("a {c}", "a drawing of a {c}", "a picture of a {c}", "a {c} shape")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    caption: str
    color: str
    shape: str


def make_scene(index: int, seed: int = 0, size: tuple[int, int] = (96, 96)) -> Scene:
    """Draw scene `index` of the stream `seed` at `size` (width, height)."""
    rng = np.random.default_rng([seed, index])
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    width, height = size
    base = np.array(BACKGROUNDS[background], dtype=np.float32)
    noise = rng.normal(0.0, 12.0, size=(height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")

    side = min(width, height)
    radius = side * float(rng.uniform(0.22, 0.38))
    cx = float(rng.uniform(radius, width - radius))
    cy = float(rng.uniform(radius, height - radius))
    fill = tuple(int(np.clip(c + rng.normal(0, 10), 0, 255)) for c in COLORS[color])
    _draw_shape(ImageDraw.Draw(image), shape, cx, cy, radius, fill, angle=float(rng.uniform(0, 2 * math.pi)))
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.8))))

    place = _place(cx / width, cy / height)
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    caption = template.format(
        color=color,
        shape=shape,
        a_color=_with_article(color),
        a_shape=_with_article(shape),
        background=background,
        place=place,
    )
    return Scene(image=image, caption=caption, color=color, shape=shape)


def _with_article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _place(x: float, y: float) -> str:
    vertical = "top" if y < 0.4 else "bottom" if y > 0.6 else "middle"
    horizontal = "left" if x < 0.4 else "right" if x > 0.6 else "centre"
    return "centre" if vertical == "middle" and horizontal == "centre" else f"{vertical} {horizontal}"


def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / sides),
            cy + radius * math.sin(angle + 2 * math.pi * k / sides),
        )
        for k in range(sides)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, angle: float
) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r * 0.3)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, angle), fill=fill)
    elif shape == "diamond":
        # A rhombus: a square stretched along one diagonal.
        points = _polygon(0, 0, r, 4, 0)
        stretched = [(x * 0.6, y) for x, y in points]
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in stretched], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.1, 3, angle), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, angle), fill=fill)
    elif shape == "star":
        outer = _polygon(cx, cy, r * 1.1, 5, angle)
        inner = _polygon(cx, cy, r * 0.45, 5, angle + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        c, s = math.cos(angle), math.sin(angle)
        for arm in ([(-r, -w), (r, -w), (r, w), (-r, w)], [(-w, -r), (w, -r), (w, r), (-w, r)]):
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


# ---------------------------------------------------------------------------------------------------------
# Captions for retrieval sets

# Caption forms that need only the colour and the shape, for the extra captions of retrieval sets.
_PLAIN_CAPTIONS: tuple[str, ...] = (
    "{a_color} {shape}",
    "a drawing of {a_color} {shape}",
    "a picture of {a_color} {shape}",
    "{color} {shape}",
    "{a_shape} painted {color}",
)


def retrieval_captions(scene: Scene, per_image: int) -> list[str]:
    """The scene's own caption followed by plain descriptions of it, `per_image` in all."""
    extra = [
        t.format(
            color=scene.color,
            shape=scene.shape,
            a_color=_with_article(scene.color),
            a_shape=_with_article(scene.shape),
        )
        for t in _PLAIN_CAPTIONS
    ]
    captions = [scene.caption] + [c for c in extra if c != scene.caption]
    return captions[:per_image]
