"""Many crops resized at once: antialiased bicubic resampling as two batched matmuls.

torch's antialiased bicubic interpolation (``interpolate(mode="bicubic", antialias=True)``, behind
torchvision's tensor resize) is separable. Each output row is a weighted sum of a window of input rows,
and each output column of a window of input columns, so one side's weights form an (S, L) matrix. Crops
of different sizes, padded with zeros to the largest, then resize together as ``rows @ X @ cols^T``: a
few kernels per batch instead of several per crop, which is what kept a decoding thread from keeping up
with a training loop replayed from CUDA graphs.

The weights are torch's: Keys' cubic with a = -0.5, its support widened by the scale when shrinking,
each output's window cut at the crop's edges and normalised to sum 1. The sums run as float32 matmuls
(TF32 only where the process allows it), so the result is torch's float path within rounding: at most
one level apart after rounding to uint8.
"""

from __future__ import annotations

import torch
from torch import Tensor

_A = -0.5  # Keys' cubic, as torch's antialiased bicubic filter
# Padded crop pixels resized per call (x C x 4 bytes of float32, twice over): bounds the memory one call
# takes when a batch holds a few very large crops.
PIXELS_PER_CALL = 1 << 25


def keys_cubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel (a = -0.5) at ``x``; zero outside (-2, 2)."""
    x = x.abs()
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resampling_weights(lengths: Tensor, out_size: int, padded: int) -> Tensor:
    """Antialiased bicubic resampling matrices, one per input length.

    Args:
        lengths: (B,) float32, input lengths (each >= 1, at most ``padded``).
        out_size: output length S.
        padded: columns of the result, L.

    Returns:
        (B, S, L) float32: row ``i`` of sample ``b`` weighs input positions ``0 .. lengths[b] - 1`` (zero
        beyond) into output position ``i``.
    """
    scale = (lengths / out_size)[:, None, None]
    support = torch.where(scale >= 1, 2 * scale, torch.full_like(scale, 2.0))
    inverse = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, device=lengths.device, dtype=torch.float32)[None, :, None] + 0.5)
    first = (center - support + 0.5).trunc().clamp(min=0)  # torch truncates to int64 here
    end = torch.minimum((center + support + 0.5).trunc(), lengths[:, None, None])
    position = torch.arange(padded, device=lengths.device, dtype=torch.float32)[None, None, :]
    weights = keys_cubic((position - center + 0.5) * inverse) * ((position >= first) & (position < end))
    return weights / weights.sum(-1, keepdim=True)


def resize_crops(crops: list[Tensor], size: int, flips: list[bool]) -> Tensor:
    """Resize crops to ``size`` x ``size`` as torchvision's bicubic antialiased resize does, mirroring some.

    Args:
        crops: (C, h_i, w_i) uint8 on one device.
        size: output side S.
        flips: per crop, mirror it horizontally.

    Returns:
        (B, C, S, S) uint8 on the crops' device.

    Raises:
        ValueError: a crop has no pixels.
    """
    if any(c.shape[1] == 0 or c.shape[2] == 0 for c in crops):
        raise ValueError(f"cannot resize an empty crop: {[tuple(c.shape) for c in crops if 0 in c.shape[1:]]}")
    out = []
    for start, stop in _groups([c.shape[1:] for c in crops], PIXELS_PER_CALL):
        out.append(_resize_group(crops[start:stop], size, flips[start:stop]))
    return torch.cat(out)


def _resize_group(crops: list[Tensor], size: int, flips: list[bool]) -> Tensor:
    device, channels = crops[0].device, crops[0].shape[0]
    heights, widths = [c.shape[1] for c in crops], [c.shape[2] for c in crops]
    padded = crops[0].new_zeros((len(crops), channels, max(heights), max(widths)))
    for i, crop in enumerate(crops):
        padded[i, :, :crop.shape[1], :crop.shape[2]] = crop
    lengths = _on(device, torch.tensor([heights, widths], dtype=torch.float32))
    rows = resampling_weights(lengths[0], size, padded.shape[2])
    cols = resampling_weights(lengths[1], size, padded.shape[3])
    mirrored = _on(device, torch.tensor(flips, dtype=torch.bool))[:, None, None]
    cols = torch.where(mirrored, cols.flip(1), cols)  # output columns in reverse order
    resized = rows.unsqueeze(1) @ padded.float() @ cols.transpose(1, 2).unsqueeze(1)
    return resized.clamp_(0, 255).round_().to(torch.uint8)


def _on(device: torch.device, values: Tensor) -> Tensor:
    """``values`` copied to ``device`` without waiting for the stream: from pinned memory on CUDA."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _groups(shapes: list[torch.Size], pixels_per_call: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) runs of crops whose padded size (count x tallest x widest) stays within
    ``pixels_per_call``, or one larger crop."""
    groups, start, tallest, widest = [], 0, 0, 0
    for i, (h, w) in enumerate(shapes):
        tallest, widest = max(tallest, h), max(widest, w)
        if i > start and (i - start + 1) * tallest * widest > pixels_per_call:
            groups.append((start, i))
            start, tallest, widest = i, h, w
    groups.append((start, len(shapes)))
    return groups
