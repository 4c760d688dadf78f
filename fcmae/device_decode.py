"""Training JPEGs decoded, cropped and flipped on a GPU inside the loader workers (``data.decode_device=cuda``).

A worker reads each file's header and bytes and draws the sample's crop and flip from the sample's keyed
generator before any pixel is decoded, exactly as the CPU path does (:meth:`PretrainTransform.plan`).
The batch's collate then decodes all its JPEGs with nvJPEG (``torchvision.io.decode_jpeg`` on the
device, one call per chunk), crops, resizes (bicubic, antialiased) and flips them there, and hands the
training process uint8 ``(B, C, S, S)`` CPU pixels, as CPU decoding does. The work left on the CPU is
reading files, so two or three workers feed what a dozen CPU-decoding workers do.

Images nvJPEG is not given go through the CPU path in the same worker: not a JPEG, an EXIF rotation, a
CMYK JPEG, a file with no end-of-image marker in its last 4 KiB (likely truncated, which PIL reports), or
a file the device decoder refuses. So broken files are skipped and reported as on the CPU, unless nvJPEG
decodes one despite its damage. Device faults (out of memory, a failed kernel) stop the run instead.

Workers that touch CUDA must be started with ``spawn``; :func:`fcmae.loader.build_pretrain_loader`
does that. The collate also runs on a CPU device, which the tests use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from fcmae.data import PretrainImages, collate_examples, first_good
from fcmae.images import BadImageError, can_reduce, open_image
from fcmae.transforms import keyed_generator, resized_crop_pixels

DEVICE_READ_MODES = {"RGB": ImageReadMode.RGB, "L": ImageReadMode.GRAY}
_END_OF_IMAGE = b"\xff\xd9"
_TAIL = 4096  # bytes at a file's end searched for the end-of-image marker (padding or a trailer may follow it)
# Decoded pixels held at once per decode call (or one larger image): bounds the device memory a batch of
# huge photos needs.
DECODE_PIXELS_PER_CALL = 1 << 26
# Device memory a worker keeps cached between batches; above it the cache goes back to the driver after a
# decode call, since the training process cannot use what a worker holds.
WORKER_CACHE_BYTES = 1 << 30
# Faults of the device, not of a file: they stop the run rather than send every file to the CPU.
_DEVICE_FAULTS = (torch.OutOfMemoryError, torch.AcceleratorError)

logger = logging.getLogger(__name__)


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
    return mode in DEVICE_READ_MODES and img.mode in DEVICE_READ_MODES and can_reduce(img)


def jpeg_bytes(img: Image.Image) -> Tensor | None:
    """The whole file behind an opened, undecoded JPEG as (N,) uint8; None when its last 4 KiB hold no
    end-of-image marker (a truncated file goes to PIL, which reports it). PIL can still decode ``img`` after.

    Raises:
        BadImageError: the file cannot be read.
    """
    try:
        img.fp.seek(0)
        data = img.fp.read()
    except OSError as e:
        raise BadImageError("unreadable", f"cannot read: {e.strerror or e}") from None
    if data.rfind(_END_OF_IMAGE, max(0, len(data) - _TAIL)) < 0:
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


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
        self.refused = 0

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
            self._release_cache()
        return crops

    def _decode(self, chunk: list[EncodedCrop]) -> list[Tensor | None]:
        try:
            return decode_jpeg([e.data for e in chunk], mode=self._read_mode(), device=self.device)
        except _DEVICE_FAULTS:
            raise
        except RuntimeError:  # one bad file fails the call: find it
            return [self._decode_one(e) for e in chunk]

    def _decode_one(self, e: EncodedCrop) -> Tensor | None:
        try:
            return decode_jpeg(e.data, mode=self._read_mode(), device=self.device)
        except _DEVICE_FAULTS:
            raise
        except RuntimeError as err:
            self.refused += 1
            if self.refused == 1:
                logger.warning("the device decoder refused sample %s (%s); it and any later refusals in this worker "
                               "are decoded on the CPU", e.key, err)
            return None

    def _read_mode(self) -> ImageReadMode:
        return DEVICE_READ_MODES[self.images.mode]

    def _release_cache(self) -> None:
        if self.device.type == "cuda" and torch.cuda.memory_reserved(self.device) > WORKER_CACHE_BYTES:
            torch.cuda.empty_cache()

    def _crop(self, img: Tensor, e: EncodedCrop) -> Tensor:
        pixels = resized_crop_pixels(img, e.box, self.size)
        return pixels.flip(-1) if e.flip else pixels


def _chunks(encoded: list[EncodedCrop], pixels_per_chunk: int) -> list[list[EncodedCrop]]:
    """Consecutive runs of ``encoded`` of at most ``pixels_per_chunk`` image pixels, or one larger image."""
    chunks: list[list[EncodedCrop]] = []
    total = pixels_per_chunk
    for e in encoded:
        if total + e.pixels > pixels_per_chunk:
            chunks.append([])
            total = 0
        chunks[-1].append(e)
        total += e.pixels
    return chunks
