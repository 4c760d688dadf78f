"""Image transforms whose randomness comes from an explicit generator.

Each training sample draws its crop and flip from ``keyed_generator(seed, epoch, index)``, so the
augmentation of a sample depends only on where it sits in the run, not on worker count, process
count or how often the run was interrupted and resumed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by hashing the non-negative integers ``keys`` (SeedSequence mixing)."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def sample_crop_box(
        height: int,
        width: int,
        scale: Sequence[float],
        ratio: Sequence[float],
        generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (torchvision's rule: 10 tries, then a centre crop), drawn from ``generator``.

    Returns:
        (top, left, crop_height, crop_width).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """8-bit PIL image -> (C, H, W) float32, scaled to [0, 1] then normalised per channel."""
    x = TF.pil_to_tensor(img).float().div_(255.0)
    return TF.normalize(x, list(mean), list(std))


class PretrainTransform:
    """RandomResizedCrop (bicubic) + horizontal flip + normalisation, driven by a generator.

    Args:
        size: output side S.
        scale: crop area range (paper: 0.2-1.0).
        ratio: crop aspect-ratio range.
        hflip: flip probability.
        mean, std: per-channel normalisation.
    """

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                 mean: Sequence[float], std: Sequence[float]):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> tuple[Tensor, list[str]]:
        """PIL image -> ((C, S, S) tensor, notes); the note ``small`` flags upscaled tiny images."""
        notes = ["small"] if min(img.size) < self.size else []
        top, left, h, w = sample_crop_box(img.height, img.width, self.scale, self.ratio, generator)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        if float(torch.rand((), generator=generator)) < self.hflip:
            img = TF.hflip(img)
        return to_normalized_tensor(img, self.mean, self.std), notes


class EvalTransform:
    """Resize the shorter side to S (bicubic), centre crop S x S, normalise: for monitors and previews."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, img: Image.Image) -> Tensor:
        """PIL image -> (C, S, S)."""
        img = TF.resize(img, self.size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        return to_normalized_tensor(TF.center_crop(img, [self.size, self.size]), self.mean, self.std)
