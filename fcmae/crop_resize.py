"""Many crops cut and resized at once: antialiased bicubic resampling as two batched matmuls.

torch's antialiased bicubic interpolation (``interpolate(mode="bicubic", antialias=True)``, behind
torchvision's tensor resize) is separable. Each output row is a weighted sum of a window of input rows,
and each output column of a window of input columns, so one side's weights form an (S, L) matrix, zero
beyond the crop's length L. Crops of different sizes are gathered from their images into one tensor padded
to the largest, then resized together as ``rows @ X @ cols^T``: a few dozen kernel launches per batch,
whatever its size. A decoding thread beside the training loop shares the process's one interpreter with
it, so every launch it saves is time given back to the loop.

The weights are torch's: Keys' cubic with a = -0.5, its support widened by the scale when shrinking,
each output's window cut at the crop's edges and normalised to sum 1. The sums run as float32 matmuls
(TF32 only where the process allows it), so the result is torch's float path within rounding: at most
one level apart after rounding to uint8.

On CUDA with Triton, :mod:`fcmae.crop_resize_kernel` does the same resampling in two kernels that work on
each output's window only; these matmuls are the pure PyTorch path elsewhere and the reference it is
tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fcmae.crop_resize_kernel import crop_resize_with_kernels, kernel_available, window_length

_A = -0.5  # Keys' cubic, as torch's antialiased bicubic filter
# Padded crop pixels resized per call (each takes C x 4 bytes of float32 twice over, and 4 bytes of gather
# index): bounds the memory one call takes when a batch holds a few very large crops. On top of that, a
# call copies its whole images once (C bytes a pixel) and holds (2 x crops, S, longest side) float32 weights.
# The kernels count each crop as its height x max(width, S), the float32 buffer of its rows resized to S.
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
    # Each output's window (end - first <= 2 x support + 1 inputs) is computed alone, then placed: elementwise
    # work on (B, S, window), not on (B, S, L).
    window = window_length(padded, out_size)
    position = first + torch.arange(window, device=lengths.device, dtype=torch.float32)  # (B, S, window)
    taps = keys_cubic((position - center + 0.5) * inverse) * (position < end)
    taps = taps / taps.sum(-1, keepdim=True)
    dense = taps.new_zeros((len(lengths), out_size, padded))
    # Taps past a window's end weigh zero; clamped into range, they add nothing where they land.
    return dense.scatter_add_(2, position.clamp(max=padded - 1).long(), taps)


def crop_and_resize(images: list[Tensor], boxes: list[tuple[int, int, int, int]], size: int,
                    flips: list[bool]) -> Tensor:
    """Crop each image and resize the crop to ``size`` x ``size`` as torchvision's bicubic antialiased resize
    does, mirroring some.

    Args:
        images: (C, H_i, W_i) uint8 on one device, at least one.
        boxes: per image, its crop (top, left, height, width) inside it.
        size: output side S.
        flips: per image, mirror its crop horizontally.

    Returns:
        (B, C, S, S) uint8 on the images' device.

    Raises:
        ValueError: no images, flips or boxes not one per image, or a crop has no pixels or leaves its image.
    """
    if not images:
        raise ValueError("no crops to resize")
    if len(flips) != len(images):
        raise ValueError(f"{len(flips)} flips for {len(images)} crops")
    for img, (top, left, height, width) in zip(images, boxes, strict=True):
        if height < 1 or width < 1 or top < 0 or left < 0 or top + height > img.shape[1] or left + width > img.shape[2]:
            raise ValueError(f"crop (top, left, height, width) = {(top, left, height, width)} is empty or leaves "
                             f"its image of {tuple(img.shape[1:])}")
    if kernel_available(images):
        # the kernels' buffer holds each crop's rows at S columns
        shapes, resize = [(h, max(w, size)) for _, _, h, w in boxes], crop_resize_with_kernels
        images = [img.contiguous() for img in images]
    else:
        shapes, resize = [box[2:] for box in boxes], _resize_group
    out = [resize(images[start:stop], boxes[start:stop], size, flips[start:stop])
           for start, stop in _groups(shapes, PIXELS_PER_CALL)]
    return out[0] if len(out) == 1 else torch.cat(out)


def _resize_group(images: list[Tensor], boxes: list[tuple[int, int, int, int]], size: int,
                  flips: list[bool]) -> Tensor:
    padded = _gather_crops(images, boxes)  # (C, B, h_max, w_max)
    device, (tallest, widest) = padded.device, padded.shape[2:]
    lengths = _on(device, torch.tensor([box[2] for box in boxes] + [box[3] for box in boxes], dtype=torch.float32))
    weights = resampling_weights(lengths, size, max(tallest, widest))  # both sides in one call
    rows, cols = weights[:len(boxes), :, :tallest], weights[len(boxes):, :, :widest]
    mirrored = _on(device, torch.tensor(flips, dtype=torch.bool))[:, None, None]
    cols = torch.where(mirrored, cols.flip(1), cols)  # output columns in reverse order
    resized = rows @ padded.float() @ cols.transpose(1, 2)  # (C, B, S, S)
    return resized.clamp_(0, 255).round_().to(torch.uint8).transpose(0, 1).contiguous()


def _gather_crops(images: list[Tensor], boxes: list[tuple[int, int, int, int]]) -> Tensor:
    """(C, B, h_max, w_max) uint8: the crops, each padded by repeating its last row and column (the
    resampling weights are zero there). One gather from the images laid end to end, whatever their number."""
    channels = images[0].shape[0]
    flat = torch.cat([img.reshape(channels, -1) for img in images], dim=1)  # (C, sum of H_i x W_i)
    starts = [0]
    for img in images[:-1]:
        starts.append(starts[-1] + img.shape[1] * img.shape[2])
    # per crop: its image's first pixel in ``flat``, the image's width, the crop's top, left, height, width
    meta = _on(flat.device, torch.tensor([[start, img.shape[2], *box] for start, img, box in
                                           zip(starts, images, boxes, strict=True)], dtype=torch.int64))
    first, image_width, top, left, height, width = (meta[:, i, None, None] for i in range(6))
    tallest, widest = max(box[2] for box in boxes), max(box[3] for box in boxes)
    y = torch.arange(tallest, device=flat.device)[None, :, None].minimum(height - 1)  # (B, h_max, 1)
    x = torch.arange(widest, device=flat.device)[None, None, :].minimum(width - 1)  # (B, 1, w_max)
    index_type = torch.int32 if flat.shape[1] < 2**31 else torch.int64  # halves the index's memory
    index = (first + (top + y) * image_width + left).to(index_type) + x.to(index_type)
    return flat.index_select(1, index.flatten()).view(channels, len(images), tallest, widest)


def _on(device: torch.device, values: Tensor) -> Tensor:
    """``values`` copied to ``device`` without waiting for the stream: from pinned memory on CUDA."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _groups(shapes: list[tuple[int, int]], pixels_per_call: int) -> list[tuple[int, int]]:
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
