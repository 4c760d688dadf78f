"""Decoding one image robustly, and finding image files in a folder.

Every decode either returns a PIL image in the requested mode plus the list of conversions it
applied, or raises :class:`BadImageError` with a short reason. Nothing here stops a run: callers
count and report (see :class:`DataIssues`). :func:`decode_image` is :func:`open_image` (the header)
then :func:`load_image` (the pixels); a caller that knows its crop from the header size can ask
:func:`load_image` for a JPEG decoded at 1/2, 1/4 or 1/8 size. :func:`decode_plain_jpeg` decodes a
plain JPEG straight into a uint8 tensor with libjpeg-turbo (through torchvision), the same pixels as
:func:`load_image` at less cost, and leaves every other file to it.

Conversions (each reported, never silent):

* EXIF orientation is applied (``exif``).
* CMYK, YCbCr, LAB, HSV are converted to RGB (``color-space``).
* Alpha (RGBA, LA, palette with transparency) is composited on white (``alpha``), or kept when
  the target mode is RGBA.
* 16-bit and 32-bit images are rescaled to 8 bits by their bit depth, never clipped (``high-bit-depth``).
* Grayscale to RGB replicates the channel, RGB to grayscale uses the ITU-R 601 luma (``channels``).
* Images with a side below the crop size are upscaled by the crop (``small``, reported by the transform).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
MODES_BY_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_BACKGROUND = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112
_END_OF_IMAGE = b"\xff\xd9"
_TAIL = 4096  # bytes at a file's end searched for the end-of-image marker (padding or a trailer may follow it)
# (file mode, target mode) -> what libjpeg decodes into, for the pairs where that is exactly what PIL's decode and
# convert_mode give. RGB -> L is not one: libjpeg keeps the file's own luma, PIL recomputes it from RGB.
_LIBJPEG_READS = {("RGB", "RGB"): ImageReadMode.RGB, ("L", "L"): ImageReadMode.GRAY,
                  ("L", "RGB"): ImageReadMode.RGB}

logger = logging.getLogger(__name__)


class BadImageError(Exception):
    """An image that cannot be used; ``kind`` is one of ``unreadable``, ``corrupt``, ``too-large``."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def source_name(source: Any) -> str:
    """A printable name for an image source (its path when known)."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, dict) and source.get("path"):
        return str(source["path"])
    return f"<in-memory {type(source).__name__}>"


def decode_image(source: Any, mode: str = "RGB", max_pixels: int = 89_478_485) -> tuple[Image.Image, list[str]]:
    """Decode ``source`` into a fully loaded 8-bit PIL image in ``mode``.

    Args:
        source: a file path, encoded bytes, a ``{"bytes", "path"}`` dict (``datasets.Image(decode=False)``),
            or a PIL image.
        mode: ``"RGB"``, ``"L"`` or ``"RGBA"``.
        max_pixels: images with more pixels are refused (decompression-bomb guard).

    Returns:
        The image and the names of the conversions applied (see the module docstring).

    Raises:
        BadImageError: unreadable file, not an image, truncated or corrupt data, or too many pixels.
    """
    img, notes, _ = load_image(open_image(source, max_pixels), mode)
    return img, notes


def open_image(source: Any, max_pixels: int = 89_478_485) -> Image.Image:
    """Open ``source`` (see :func:`decode_image`) reading only its header: size, format and EXIF are known.

    Raises:
        BadImageError: unreadable file, not an image, or more than ``max_pixels`` pixels.
    """
    img = source if isinstance(source, Image.Image) else _open(source)
    if img.width * img.height > max_pixels:
        raise BadImageError("too-large", f"{img.width}x{img.height} pixels exceeds data.max_image_pixels={max_pixels}")
    return img


def can_reduce(img: Image.Image) -> bool:
    """Whether :func:`load_image` can decode ``img`` at a reduced size: a JPEG not yet decoded, without EXIF
    rotation (so its header size is the size it decodes to, and DCT scaling applies)."""
    if img.format != "JPEG" or not getattr(img, "tile", None):
        return False
    try:
        return _orientation(img) == 1
    except (OSError, ValueError, SyntaxError, TypeError):  # a broken EXIF block: load_image reports it
        return False


def load_image(img: Image.Image, mode: str, reduce: int = 1) -> tuple[Image.Image, list[str], int]:
    """Decode an opened image into 8-bit ``mode``, EXIF orientation applied, naming the conversions.

    Args:
        img: from :func:`open_image`.
        mode: ``"RGB"``, ``"L"`` or ``"RGBA"``.
        reduce: 1, 2, 4 or 8: when :func:`can_reduce`, decode at 1/``reduce`` of each side (JPEG DCT
            scaling, much cheaper than decoding everything and resizing); otherwise at full size.

    Returns:
        (image, conversions, factor): ``factor`` is the reduction applied (1 if none); full-size pixel
        edge ``x`` lies at ``x / factor`` in ``image`` (which is ``ceil(size / factor)`` on each side).

    Raises:
        BadImageError: truncated or corrupt data.
    """
    notes = ["high-bit-depth"] if _decodes_from_16_bit(img) else []
    try:
        factor = _draft(img, reduce) if reduce > 1 and can_reduce(img) else 1
        img.load()
        if _orientation(img) != 1:
            img = ImageOps.exif_transpose(img)
            notes.append("exif")
        img, converted = convert_mode(img, mode)
    except (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as e:
        raise BadImageError("corrupt", f"cannot decode: {e}") from None
    return img, notes + converted, factor


def decode_plain_jpeg(img: Image.Image, mode: str) -> tuple[Tensor, list[str]] | None:
    """Decode an opened, undecoded plain JPEG (one :func:`can_reduce` takes) into ``mode`` with libjpeg-turbo,
    through ``torchvision.io.decode_jpeg``: the pixels :func:`load_image` gives, without a PIL image and the
    copy out of it (with :func:`fcmae.transforms.resized_crop_pixels`, about a quarter less CPU time per
    training crop of a photo). Closes ``img`` when it returns pixels.

    Returns:
        ((C, H, W) uint8, conversions), or None, leaving ``img`` to :func:`load_image`: another format, EXIF
        rotation, a mode pair libjpeg does not decode exactly as PIL (RGB file to L), no end-of-image marker
        near the end (likely truncated), or libjpeg refusing the file (PIL then reports what is wrong).

    Raises:
        BadImageError: the file cannot be read.
    """
    read_mode = _LIBJPEG_READS.get((img.mode, mode))
    if read_mode is None or not can_reduce(img):
        return None
    data = jpeg_bytes(img)
    if data is None:
        return None
    try:
        pixels = decode_jpeg(data, mode=read_mode)
    except RuntimeError:
        return None
    notes = ["channels"] if img.mode != mode else []
    img.close()
    return pixels, notes


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


def _orientation(img: Image.Image) -> int:
    return img.getexif().get(_EXIF_ORIENTATION, 1)


def _draft(img: Image.Image, reduce: int) -> int:
    """Ask the JPEG decoder for 1/``reduce`` scale; the factor it granted (1 if it declined)."""
    width = img.width
    granted = img.draft(img.mode, (img.width // reduce, img.height // reduce))
    return 1 if granted is None else round(width / granted[1][2])


def _open(source: Any) -> Image.Image:
    try:
        if isinstance(source, dict):
            source = source["bytes"] if source.get("bytes") is not None else source["path"]
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError("too-large", str(e)) from None
    except UnidentifiedImageError:
        raise BadImageError("corrupt", "not an image (unrecognised format)") from None
    except OSError as e:
        if e.errno is not None:  # the file system refused (missing, permissions, I/O error)
            raise BadImageError("unreadable", f"cannot read: {e.strerror or e}") from None
        raise BadImageError("corrupt", f"cannot parse: {e}") from None
    except (ValueError, SyntaxError, TypeError) as e:
        raise BadImageError("corrupt", f"cannot parse: {e}") from None


def convert_mode(img: Image.Image, mode: str) -> tuple[Image.Image, list[str]]:
    """Convert a loaded image to 8-bit ``mode`` (L, RGB or RGBA), naming the conversions applied."""
    notes = []
    if img.mode in _HIGH_DEPTH_MODES:
        img = _to_8bit(img)
        notes.append("high-bit-depth")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
        notes.append("color-space")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") and mode != "RGBA":
        background = Image.new("RGBA", img.size, _ALPHA_BACKGROUND + (255,))
        img = Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
        notes.append("alpha")
    if img.mode != mode:
        channels_before = len(img.getbands())
        img = img.convert(mode)
        if channels_before != len(img.getbands()):
            notes.append("channels")
    return img, notes


def _decodes_from_16_bit(img: Image.Image) -> bool:
    """PIL reads 16-bit-per-channel colour files (PNG, TIFF) straight into 8-bit RGB; say so."""
    return img.mode in ("RGB", "RGBA") and any(";16" in str(tile[3]) for tile in getattr(img, "tile", ()) or ())


def _to_8bit(img: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit integer or float single-channel image to 8-bit ``L`` by its bit depth."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        peak = 1.0 if values.max(initial=0.0) <= 1.0 else 65535.0
    else:
        peak = 255.0 if values.max(initial=0.0) <= 255 else 65535.0
    scaled = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """All image files below ``root`` (by extension, recursive, symlinks followed once), sorted.

    Returns:
        (paths, problems): problems are (path, reason) for directories that cannot be listed and
        image-named entries that are not regular files (dangling links, pipes, devices).
    """
    paths: list[str] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            problems.append((folder, f"cannot list directory: {e.strerror or e}"))
            continue
        for entry in entries:
            if entry.is_dir():
                stack.append(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if entry.is_file():
                    paths.append(entry.path)
                else:
                    problems.append((entry.path, "not a regular file (dangling link, pipe or device)"))
    return sorted(paths), problems


class DataIssues:
    """Counts skipped and converted images; logs the first few paths of each kind, then only counts.

    Kinds: ``skipped:<unreadable|corrupt|too-large>`` and ``converted:<conversion>``.
    """

    def __init__(self, named_per_kind: int = 5, prefix: str = ""):
        self.counts: Counter[str] = Counter()
        self.named_per_kind = named_per_kind
        self.prefix = prefix

    def record(self, issues: Iterable[tuple[str, str, str]]) -> None:
        """Record (kind, path, detail) triples."""
        for kind, path, detail in issues:
            self.counts[kind] += 1
            n = self.counts[kind]
            level = logging.WARNING if kind.startswith("skipped") else logging.INFO
            if n <= self.named_per_kind:
                logger.log(level, "%s%s: %s (%s)", self.prefix, kind, path, detail)
            elif n == self.named_per_kind + 1:
                logger.log(level, "%s%s: more files of this kind; counting only", self.prefix, kind)

    @property
    def skipped(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith("skipped"))

    def summary(self) -> str:
        """One line, e.g. ``3 images skipped (corrupt 2, unreadable 1); 10 converted (alpha 10)``."""
        parts = []
        for group, label in (("skipped", "images skipped"), ("converted", "converted")):
            kinds = sorted((k.split(":", 1)[1], n) for k, n in self.counts.items() if k.startswith(group))
            total = sum(n for _, n in kinds)
            detail = ", ".join(f"{k} {n}" for k, n in kinds)
            parts.append(f"{total} {label}" + (f" ({detail})" if detail else ""))
        return "; ".join(parts)
