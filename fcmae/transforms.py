"""Image transforms whose randomness comes from an explicit generator.

Each training sample draws its crop and flip from ``keyed_generator(seed, epoch, index)``, so the
augmentation of a sample depends only on where it sits in the run, not on worker count, process
count or how often the run was interrupted and resumed.

Pixel conventions: training samples (:class:`PretrainTransform`) are uint8, normalised on the training
device by :func:`normalize_pixels`; evaluation samples (:class:`EvalTransform`: previews, kNN) are
float32, already normalised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from fcmae.images import can_reduce, decode_plain_jpeg, load_image


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


def normalize_pixels(pixels: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
                     memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """uint8 pixels -> float32 scaled to [0, 1], then normalised per channel, on the pixels' device.

    Training batches reach the device as uint8 (a quarter of the bytes of float32) and are normalised
    there; the math is the CPU path's, so results match it exactly.

    Args:
        pixels: uint8 (B, C, H, W) or (C, H, W).
        mean, std: C values each (sequences, or tensors already on the device).
        memory_format: of a 4-D result, e.g. ``torch.channels_last`` for a channels-last model.

    Returns:
        float32 of the shape of ``pixels``.
    """
    mean = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    if pixels.dim() == 4:
        pixels = pixels.contiguous(memory_format=memory_format)
    return pixels.float().div_(255.0).sub_(mean).div_(std)


def dct_reduction(box_height: int, box_width: int, size: int) -> int:
    """The largest of 1, 2, 4, 8 at which a ``box_height`` x ``box_width`` crop still spans ``size`` pixels."""
    factor = 1
    while factor < 8 and min(box_height, box_width) >= 2 * factor * size:
        factor *= 2
    return factor


def reduced_box(box: tuple[int, int, int, int], factor: int) -> tuple[int, int, int, int]:
    """A (top, left, height, width) box of the full image on the pixel grid of its 1/``factor`` decode (edges
    rounded to the nearest reduced pixel)."""
    top, left, height, width = box
    new_top, new_left = round(top / factor), round(left / factor)
    return new_top, new_left, round((top + height) / factor) - new_top, round((left + width) / factor) - new_left


_RESAMPLING = dict(interpolation=InterpolationMode.BICUBIC, antialias=True)


def resized_crop(img: Image.Image, box: tuple[int, int, int, int], size: int) -> Tensor:
    """The (top, left, height, width) crop of ``img`` resized to ``size`` x ``size``, bicubic, antialiased.

    Resampled by torch's uint8 kernel (about 3x faster than PIL's, within 2 levels of it), except RGBA,
    which PIL resamples premultiplied by alpha (no colour bleeding from transparent pixels).

    Returns:
        (C, S, S) uint8.
    """
    if img.mode == "RGBA":
        return TF.pil_to_tensor(TF.resized_crop(img, *box, [size, size], **_RESAMPLING))
    return resized_crop_pixels(TF.pil_to_tensor(img), box, size)


def resized_crop_pixels(pixels: Tensor, box: tuple[int, int, int, int], size: int) -> Tensor:
    """:func:`resized_crop` of decoded pixels, on their device: (C, H, W) uint8 -> (C, S, S) uint8 (channels-last
    strides for C > 1).

    The crop is copied out channels-last first: that is the layout torch's uint8 antialiased kernel works in on
    the CPU, which otherwise converts to it and back (the same pixels, about a quarter slower).
    """
    top, left, height, width = box
    crop = pixels[None, :, top:top + height, left:left + width].contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


@dataclass(frozen=True)
class CropPlan:
    """One training sample's augmentation, drawn before any pixel is decoded.

    Attributes:
        box: (top, left, height, width) in the full image's pixels.
        flip: mirror the crop horizontally.
        notes: ``["small"]`` when a side of the image is below the output size (the crop upscales).
    """

    box: tuple[int, int, int, int]
    flip: bool
    notes: list[str]


class PretrainTransform:
    """Decode + RandomResizedCrop (bicubic) + horizontal flip, driven by a generator; uint8 out.

    The crop box is drawn in the full image's coordinates. A JPEG without EXIF rotation has its box drawn
    from the header size before decoding. With ``reduced_decode`` it is decoded at the smallest DCT scale
    (1/2, 1/4, 1/8) where the box still spans ``size`` pixels on both sides, and the box is mapped onto
    the reduced image's pixel grid; the draws are the same either way (a run stays deterministic and
    resumable), only the resampling differs slightly. At full scale such a JPEG is decoded by libjpeg
    straight into a tensor where :func:`fcmae.images.decode_plain_jpeg` takes it (the same pixels as
    PIL's). Normalisation happens on the training device (:func:`normalize_pixels`).

    Args:
        size: output side S.
        scale: crop area range (paper: 0.2-1.0).
        ratio: crop aspect-ratio range.
        hflip: flip probability.
        reduced_decode: decode JPEGs at reduced size when the crop allows.
    """

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                 reduced_decode: bool = True):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.reduced_decode = reduced_decode

    def __call__(self, img: Image.Image, generator: torch.Generator, mode: str = "RGB") -> tuple[Tensor, list[str]]:
        """Opened (:func:`fcmae.images.open_image`) or decoded image -> ((C, S, S) uint8, notes).

        Notes are the decode's conversions, then ``small`` for an image with a side below S (upscaled).

        Raises:
            BadImageError: the pixels cannot be decoded.
        """
        if can_reduce(img):  # its header size is its decoded size: draw the crop first
            plan = self.plan(img.width, img.height, generator)
            pixels, notes = self._decode_jpeg_crop(img, plan, mode)
        else:
            img, notes, _ = load_image(img, mode)
            plan = self.plan(img.width, img.height, generator)
            pixels = resized_crop(img, plan.box, self.size)
        return (pixels.flip(-1) if plan.flip else pixels), notes + plan.notes

    def _decode_jpeg_crop(self, img: Image.Image, plan: CropPlan, mode: str) -> tuple[Tensor, list[str]]:
        """A plain JPEG's (C, S, S) crop and its conversions: decoded by PIL at the smallest DCT scale the crop
        allows, or in full straight into a tensor (:func:`fcmae.images.decode_plain_jpeg`) when that is 1."""
        factor = dct_reduction(plan.box[2], plan.box[3], self.size) if self.reduced_decode else 1
        decoded = decode_plain_jpeg(img, mode) if factor == 1 else None
        if decoded is not None:
            pixels, notes = decoded
            return resized_crop_pixels(pixels, plan.box, self.size), notes
        img, notes, factor = load_image(img, mode, factor)
        return resized_crop(img, reduced_box(plan.box, factor), self.size), notes

    def plan(self, width: int, height: int, generator: torch.Generator) -> CropPlan:
        """The crop box, then the flip, drawn from ``generator`` for a ``width`` x ``height`` image."""
        box = sample_crop_box(height, width, self.scale, self.ratio, generator)
        flip = float(torch.rand((), generator=generator)) < self.hflip
        return CropPlan(box, flip, ["small"] if min(width, height) < self.size else [])


class EvalTransform:
    """Resize the shorter side to S (bicubic), centre crop S x S, normalise: float32 out, for the eval-only
    paths (reconstruction previews, kNN monitor), which run on the CPU side."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, img: Image.Image) -> Tensor:
        """Decoded PIL image -> (C, S, S) float32."""
        img = TF.resize(img, self.size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        return normalize_pixels(TF.pil_to_tensor(TF.center_crop(img, [self.size, self.size])), self.mean, self.std)
