"""Batched antialiased bicubic resizing of crops against torch's own kernel."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

import fcmae.crop_resize as crop_resize
from fcmae.crop_resize import _groups, resize_crops

# shrink, keep, enlarge, from one pixel, and extreme aspect ratios
SHAPES = [(100, 150), (224, 224), (40, 30), (500, 333), (7, 300), (1, 5), (64, 64), (1, 1), (900, 3), (2, 640)]


def crops_of(shapes, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]


def torch_float_resize(crop: torch.Tensor, size: int) -> torch.Tensor:
    out = TF.resize(crop.float(), [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return out.clamp(0, 255).round().to(torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_crops_of_any_size_resize_as_torchs_antialiased_bicubic(channels):
    crops = crops_of(SHAPES, channels)
    got = resize_crops(crops, 64, [False] * len(crops))
    assert got.shape == (len(crops), channels, 64, 64) and got.dtype == torch.uint8
    want = torch.stack([torch_float_resize(c, 64) for c in crops])
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # rounding of sums that land on .5


def test_flipped_crops_are_mirrored():
    crops = crops_of(SHAPES[:3])
    plain = resize_crops(crops, 48, [False, False, False])
    assert torch.equal(resize_crops(crops, 48, [True, False, True]),
                       torch.stack([plain[0].flip(-1), plain[1], plain[2].flip(-1)]))


def test_calls_are_bounded_in_padded_pixels_and_give_the_same_crops(monkeypatch):
    crops = crops_of(SHAPES)
    whole = resize_crops(crops, 32, [False] * len(crops))
    monkeypatch.setattr(crop_resize, "PIXELS_PER_CALL", 2 * 224 * 224)
    assert _groups([c.shape[1:] for c in crops], 2 * 224 * 224) == [(0, 2), (2, 3), (3, 4), (4, 8), (8, 9), (9, 10)]
    assert (resize_crops(crops, 32, [False] * len(crops)).int() - whole.int()).abs().max() <= 1
    assert _groups([c.shape[1:] for c in crops], 1) == [(i, i + 1) for i in range(len(crops))]  # one crop each


def test_an_empty_crop_is_an_error_not_garbage():
    with pytest.raises(ValueError, match=r"empty crop: \[\(3, 0, 5\)\]"):
        resize_crops(crops_of([(4, 4), (0, 5)]), 8, [False, False])
