"""A small built-in image corpus drawn at run time (no download, no licence question).

Scenes of gradients, shapes and stripes: enough structure for masked reconstruction to learn
something visible in a few minutes on a CPU. ``data.generated_images: N`` selects it.
"""

from __future__ import annotations

import random

import datasets
from PIL import Image, ImageDraw


def draw_scene(seed: int, size: int = 160) -> Image.Image:
    """One deterministic RGB scene of ``size`` x ``size`` pixels."""
    rng = random.Random(seed)
    top, bottom = _color(rng), _color(rng)
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / (size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    if rng.random() < 0.5:
        width, color = rng.randint(4, 12), _color(rng)
        for x in range(rng.randint(0, width), size, 3 * width):
            draw.rectangle([x, 0, x + width - 1, size], fill=color)
    for _ in range(rng.randint(2, 5)):
        box = sorted(rng.sample(range(size), 2)), sorted(rng.sample(range(size), 2))
        xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
        shape = rng.choice(("ellipse", "rectangle", "triangle"))
        if shape == "triangle":
            draw.polygon([(xy[0], xy[3]), (xy[2], xy[3]), ((xy[0] + xy[2]) // 2, xy[1])], fill=_color(rng))
        else:
            getattr(draw, shape)(xy, fill=_color(rng), outline=_color(rng), width=rng.randint(1, 4))
    return img


def sample_corpus(num_images: int, size: int = 160, seed: int = 0) -> datasets.Dataset:
    """``num_images`` scenes as a ``datasets.Dataset`` with one ``image`` column."""
    images = [draw_scene(seed * 1_000_003 + i, size) for i in range(num_images)]
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


def _color(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)
