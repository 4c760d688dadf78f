"""Batched cropping and antialiased bicubic resizing against torch's own kernel."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

import fcmae.crop_resize as crop_resize
from fcmae.crop_resize import _groups, crop_and_resize
from tests.helpers import run_in_triton_interpreter

# shrink, keep, enlarge, from one pixel, and extreme aspect ratios
SHAPES = [(100, 150), (224, 224), (40, 30), (500, 333), (7, 300), (1, 5), (64, 64), (1, 1), (900, 3), (2, 640)]


def crops_of(shapes, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]


def whole(images):
    return [(0, 0, img.shape[1], img.shape[2]) for img in images]


def resize_whole(crops, size, flips):
    """Each crop resized whole."""
    return crop_and_resize(crops, whole(crops), size, flips)


def torch_float_resize(crop: torch.Tensor, size: int) -> torch.Tensor:
    out = TF.resize(crop.float(), [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return out.clamp(0, 255).round().to(torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_crops_of_any_size_resize_as_torchs_antialiased_bicubic(channels):
    crops = crops_of(SHAPES, channels)
    got = resize_whole(crops, 64, [False] * len(crops))
    assert got.shape == (len(crops), channels, 64, 64) and got.dtype == torch.uint8
    want = torch.stack([torch_float_resize(c, 64) for c in crops])
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # rounding of sums that land on .5


def test_flipped_crops_are_mirrored():
    crops = crops_of(SHAPES[:3])
    plain = resize_whole(crops, 48, [False, False, False])
    assert torch.equal(resize_whole(crops, 48, [True, False, True]),
                       torch.stack([plain[0].flip(-1), plain[1], plain[2].flip(-1)]))


def test_calls_are_bounded_in_padded_pixels_and_give_the_same_crops(monkeypatch):
    crops = crops_of(SHAPES)
    whole = resize_whole(crops, 32, [False] * len(crops))
    monkeypatch.setattr(crop_resize, "PIXELS_PER_CALL", 2 * 224 * 224)
    assert _groups([c.shape[1:] for c in crops], 2 * 224 * 224) == [(0, 2), (2, 3), (3, 4), (4, 8), (8, 9), (9, 10)]
    assert (resize_whole(crops, 32, [False] * len(crops)).int() - whole.int()).abs().max() <= 1
    assert _groups([c.shape[1:] for c in crops], 1) == [(i, i + 1) for i in range(len(crops))]  # one crop each


def test_crops_inside_larger_images_are_cut_from_the_right_place():
    images = crops_of([(120, 90), (60, 200), (33, 33), (300, 40)], seed=1)
    boxes = [(10, 5, 100, 80), (0, 150, 60, 50), (32, 32, 1, 1), (250, 0, 50, 40)]
    flips = [False, True, False, True]
    got = crop_and_resize(images, boxes, 40, flips)
    want = [torch_float_resize(img[:, top:top + h, left:left + w], 40)
            for img, (top, left, h, w) in zip(images, boxes, strict=True)]
    want = torch.stack([w.flip(-1) if f else w for w, f in zip(want, flips, strict=True)])
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_no_crops_or_flips_not_one_per_crop_is_an_error():
    with pytest.raises(ValueError, match="no crops"):
        crop_and_resize([], [], 8, [])
    with pytest.raises(ValueError, match="1 flips for 2 crops"):
        crop_and_resize(crops_of([(4, 4), (4, 4)]), [(0, 0, 4, 4)] * 2, 8, [True])


@pytest.mark.parametrize("box", [(0, 0, 0, 5), (0, 0, 4, 0), (1, 0, 4, 4), (0, -1, 2, 2)])
def test_an_empty_crop_or_one_outside_its_image_is_an_error_not_garbage(box):
    with pytest.raises(ValueError, match=r"is empty or leaves its image of \(4, 4\)"):
        crop_and_resize(crops_of([(4, 4), (4, 4)]), [(0, 0, 4, 4), box], 8, [False, False])


_INTERPRETED_CHECK = """
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode
from fcmae.crop_resize_kernel import crop_resize_with_kernels

g = torch.Generator().manual_seed(3)
# shrink, enlarge, one pixel, extreme aspect ratios, crops inside larger images; sizes of one and two column tiles
cases = [(3, 24, [((40, 30), (0, 0, 40, 30)), ((50, 70), (10, 5, 33, 60)), ((9, 9), (4, 4, 1, 1)),
                  ((5, 80), (0, 3, 5, 77)), ((30, 12), (2, 0, 28, 12))]),
         (1, 260, [((20, 30), (0, 0, 20, 30)), ((6, 300), (1, 0, 4, 290))])]
differing = worst = 0
for channels, size, crops in cases:
    images = [torch.randint(0, 256, (channels, *shape), generator=g, dtype=torch.uint8) for shape, _ in crops]
    boxes = [box for _, box in crops]
    flips = [i % 2 == 1 for i in range(len(crops))]
    got = crop_resize_with_kernels(images, boxes, size, flips)
    for img, (top, left, h, w), flip, out in zip(images, boxes, flips, got, strict=True):
        want = TF.resize(img[:, top:top + h, left:left + w].float(), [size, size],
                         interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 255).round()
        diff = (out.int() - (want.flip(-1) if flip else want).int()).abs()
        differing, worst = differing + int((diff > 0).sum()), max(worst, int(diff.max()))
print(differing, worst)
"""


def test_triton_kernels_resize_as_torch_in_interpreter():
    """The CUDA kernels, run by Triton's CPU interpreter: crops cut from inside their images, mirrored, shrunk
    and enlarged, against torch's float kernel."""
    pytest.importorskip("triton")
    differing, worst = run_in_triton_interpreter(_INTERPRETED_CHECK)
    pixels = 3 * 5 * 24 * 24 + 2 * 260 * 260
    assert worst <= 1 and differing <= 1e-3 * pixels
