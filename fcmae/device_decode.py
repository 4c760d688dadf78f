"""Training JPEGs decoded, cropped and flipped on a GPU inside the loader workers (``data.decode_device=cuda``).

A worker reads each file's header and bytes and draws the sample's crop and flip from the sample's keyed
generator before any pixel is decoded, exactly as the CPU path does (:meth:`PretrainTransform.plan`).
The batch's collate then decodes all its JPEGs with nvJPEG (``torchvision.io.decode_jpeg`` on the
device, one call per chunk), crops, resizes (bicubic, antialiased) and flips them there, and hands the
training process uint8 ``(B, C, S, S)`` CPU pixels, as CPU decoding does. The work left on the CPU is
reading files, so two or three workers feed what a dozen CPU-decoding workers do.

Images nvJPEG is not given go through the CPU path in the same worker: not a JPEG, an EXIF rotation, a
CMYK JPEG, a file without its end-of-image marker (likely truncated, which PIL reports), or a file the
device decoder refuses. So broken files are skipped and reported exactly as on the CPU.

Workers that touch CUDA must be started with ``spawn``; :func:`fcmae.loader.build_pretrain_loader`
does that. The collate also runs on a CPU device, which the tests use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from fcmae.data import PretrainImages, collate_examples, first_good
from fcmae.images import can_reduce, open_image
from fcmae.transforms import keyed_generator, resized_crop_pixels

_READ_MODES = {"RGB": ImageReadMode.RGB, "L": ImageReadMode.GRAY}
_END_OF_IMAGE = b"\xff\xd9"
# Decoded pixels held at once per decode call: bounds the device memory a batch of huge photos needs.
DECODE_PIXELS_PER_CALL = 1 << 26


@dataclass
class EncodedCrop:
    """A JPEG's bytes and the sample's augmentation, for the collate to decode on the device.

    Attributes:
        data: (N,) uint8, the whole file.
        pixels: width x height of the image (from its header).
        box: (top, left, height, width) crop in the image's pixels.
        flip: mirror the crop horizontally.
        key: the sample's (epoch, index), to redo it on the CPU if the device decoder refuses it.
    """

    data: Tensor
    pixels: int
    box: tuple[int, int, int, int]
    flip: bool
    key: tuple[int, int]


def device_decodable(img: Image.Image, mode: str) -> bool:
    """Whether an opened image can be decoded by nvJPEG into ``mode`` as PIL would: an undecoded JPEG in L or
    RGB, without EXIF rotation, for an L or RGB target."""
    return mode in _READ_MODES and img.mode in _READ_MODES and can_reduce(img)


def jpeg_bytes(img: Image.Image) -> Tensor | None:
    """The whole file behind an opened, undecoded JPEG as (N,) uint8; None when it lacks the end-of-image
    marker (truncated files go to PIL, which reports them). PIL can still decode ``img`` afterwards."""
    img.fp.seek(0)
    data = img.fp.read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data.endswith(_END_OF_IMAGE) else None


class EncodedPretrainImages(PretrainImages):
    """:class:`PretrainImages` whose JPEGs leave the worker undecoded: key (epoch, index) ->
    ``{"encoded": EncodedCrop, "issues"}``, or ``{"pixel_values": (C, S, S) uint8, "issues"}`` for an image
    decoded on the CPU."""

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key

        def plan_or_decode(source: Any) -> tuple[EncodedCrop | Tensor, list[str]]:
            generator = keyed_generator(self.seed, epoch, index)
            img = open_image(source, self.max_pixels)
            data = jpeg_bytes(img) if device_decodable(img, self.mode) else None
            if data is None:
                return self.transform(img, generator, self.mode)
            plan = self.transform.plan(img.width, img.height, generator)
            crop = EncodedCrop(data, img.width * img.height, plan.box, plan.flip, key)
            channels = ["channels"] if img.mode != self.mode else []
            img.close()
            return crop, channels + plan.notes

        x, _, issues = first_good(lambda i: self.dataset[i][self.column], index, len(self), plan_or_decode,
                                  self.max_bad)
        return {"encoded" if isinstance(x, EncodedCrop) else "pixel_values": x, "issues": issues}

    def decoded_on_cpu(self, key: tuple[int, int]) -> dict[str, Any]:
        """The item as :class:`PretrainImages` makes it (for a file the device decoder refused)."""
        return super().__getitem__(key)


class DeviceCropCollate:
    """Collate of :class:`EncodedPretrainImages` items: decode, crop and flip on ``device``, then stack like
    :func:`fcmae.data.collate_examples` into ``{"pixel_values": (B, C, S, S) uint8 CPU, "issues"}``.

    Args:
        size: output side S.
        device: where to decode (a CUDA device; a CPU device decodes with libjpeg-turbo, for tests).
        images: the dataset whose items it collates (it redoes refused files on the CPU).
    """

    def __init__(self, size: int, device: torch.device, images: EncodedPretrainImages):
        self.size, self.device, self.images = size, device, images

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        encoded = [i for i, item in enumerate(items) if "encoded" in item]
        crops = self.crop_on_device([items[i]["encoded"] for i in encoded])
        items = list(items)
        for i, crop in zip(encoded, crops, strict=True):
            if crop is None:  # its own issues (a skipped file, a replacement) come with the CPU item
                items[i] = self.images.decoded_on_cpu(items[i]["encoded"].key)
            else:
                items[i] = {"pixel_values": crop, "issues": items[i]["issues"]}
        return collate_examples(items)

    def crop_on_device(self, encoded: list[EncodedCrop]) -> list[Tensor | None]:
        """(C, S, S) uint8 CPU crops in order; None where the device decoder refused the file."""
        crops: list[Tensor | None] = []
        for chunk in _chunks(encoded, DECODE_PIXELS_PER_CALL):
            decoded = self._decode(chunk)
            done = [self._crop(img, e) for img, e in zip(decoded, chunk, strict=True) if img is not None]
            on_cpu = iter(torch.stack(done).cpu().unbind(0) if done else ())
            crops += [None if img is None else next(on_cpu) for img in decoded]
        return crops

    def _decode(self, chunk: list[EncodedCrop]) -> list[Tensor | None]:
        mode = _READ_MODES[self.images.mode]
        try:
            return decode_jpeg([e.data for e in chunk], mode=mode, device=self.device)
        except RuntimeError:  # one bad file fails the call: find it
            return [_decode_one(e.data, mode, self.device) for e in chunk]

    def _crop(self, img: Tensor, e: EncodedCrop) -> Tensor:
        pixels = resized_crop_pixels(img, e.box, self.size)
        return pixels.flip(-1) if e.flip else pixels


def _decode_one(data: Tensor, mode: ImageReadMode, device: torch.device) -> Tensor | None:
    try:
        return decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        return None


def _chunks(encoded: list[EncodedCrop], pixels_per_chunk: int) -> list[list[EncodedCrop]]:
    """Consecutive runs of ``encoded`` of at most ``pixels_per_chunk`` image pixels (at least one image each)."""
    chunks: list[list[EncodedCrop]] = []
    total = pixels_per_chunk
    for e in encoded:
        if total + e.pixels > pixels_per_chunk:
            chunks.append([])
            total = 0
        chunks[-1].append(e)
        total += e.pixels
    return chunks
