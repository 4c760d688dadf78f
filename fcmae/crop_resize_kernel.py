"""Many crops cut, resized and mirrored on CUDA in two Triton kernels, read straight from their images.

The same antialiased bicubic resampling as :func:`fcmae.crop_resize.crop_and_resize`'s matmuls (torch's
filter: Keys' cubic with a = -0.5, widened by the scale when shrinking, each output's window cut at the
crop's edges and normalised to sum 1), computed separably over each output's own window only:

- :func:`_resize_rows_kernel`: every row of every crop to S columns, into a float32 (B, C, h_max, S)
  buffer, reading the crop where its image lies (the images' addresses travel in a small table);
- :func:`_resize_columns_kernel`: those S-wide rows to S rows, rounded to uint8 (B, C, S, S).

The matmuls pad every crop to the batch's largest and multiply by mostly-zero weights; these kernels do a
window's work per output and launch twice per batch instead of a few dozen times. Both matter here: the
decoding thread shares the GPU with the training step and the interpreter with the training loop. The sums
run in float32 in a different order from the matmuls', so a pixel can differ from theirs by one level.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_ROWS = 8  # crop rows (first kernel) or output rows (second) per program
_MAX_COLUMNS = 256  # output columns per program at most


def kernel_available(images: list[Tensor]) -> bool:
    """Whether :func:`crop_resize_with_kernels` serves these images: on a CUDA device, with Triton installed."""
    return triton is not None and images[0].is_cuda


def window_length(longest: int, size: int) -> int:
    """Input positions any output's window spans (at most), for crop sides of at most ``longest`` resized to
    ``size``."""
    return min(longest, math.ceil(4 * max(1.0, longest / size)) + 1)


def crop_resize_with_kernels(images: list[Tensor], boxes: list[tuple[int, int, int, int]], size: int,
                             flips: list[bool]) -> Tensor:
    """Crop each image, resize the crop to ``size`` x ``size`` and mirror it where ``flips`` says.

    Args:
        images: (C, H_i, W_i) uint8, contiguous, on one device (CUDA; a CPU device runs in Triton's
            interpreter, for tests). The crops (checked by the caller) lie inside them. They must stay
            allocated until the kernels have run: on the current stream, where a later allocation cannot
            take their memory early.
        boxes: per image, (top, left, height, width).
        size: output side S.
        flips: per image, mirror its crop horizontally.

    Returns:
        (B, C, S, S) uint8 on the images' device.
    """
    channels, device = images[0].shape[0], images[0].device
    # per crop: its image's address, width and channel plane, the box (top, left, height, width), the flip
    table = torch.tensor([[img.data_ptr(), img.shape[2], img.shape[1] * img.shape[2], *box, int(flip)]
                          for img, box, flip in zip(images, boxes, flips, strict=True)], dtype=torch.int64)
    if device.type == "cuda":  # copied without waiting for the stream
        table = table.pin_memory().to(device, non_blocking=True)
    tallest, widest = max(box[2] for box in boxes), max(box[3] for box in boxes)
    columns = min(_MAX_COLUMNS, triton.next_power_of_2(size))
    rows = torch.empty((len(images), channels, tallest, size), dtype=torch.float32, device=device)
    out = torch.empty((len(images), channels, size, size), dtype=torch.uint8, device=device)
    column_tiles = triton.cdiv(size, columns)
    _resize_rows_kernel[(len(images) * channels, triton.cdiv(tallest, _ROWS), column_tiles)](
        table, rows, tallest, size, channels, window_length(widest, size), ROWS=_ROWS, COLUMNS=columns)
    _resize_columns_kernel[(len(images) * channels, triton.cdiv(size, _ROWS), column_tiles)](
        table, rows, out, tallest, size, channels, window_length(tallest, size), ROWS=_ROWS, COLUMNS=columns)
    return out


if triton is not None:

    @triton.jit
    def _keys_cubic(x):
        """Keys' cubic convolution kernel with a = -0.5; zero outside (-2, 2)."""
        x = tl.abs(x)
        near = (1.5 * x - 2.5) * x * x + 1.0
        far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
        return tl.where(x < 1.0, near, tl.where(x < 2.0, far, 0.0))

    @triton.jit
    def _windows(outputs, length, size, window):
        """Per output position: its window's first input (float), the filter's centre and inverse stretch,
        its end (exclusive) and the sum of its taps (1 where it has none), for a crop side of ``length``
        inputs resized to ``size``."""
        scale = length / size
        support = tl.where(scale >= 1.0, 2.0 * scale, 2.0)
        inverse = tl.where(scale >= 1.0, 1.0 / scale, 1.0)
        center = scale * (outputs.to(tl.float32) + 0.5)
        first = tl.maximum(tl.floor(center - support + 0.5), 0.0)
        end = tl.minimum(tl.floor(center + support + 0.5), length)
        total = tl.zeros(outputs.shape, dtype=tl.float32)
        for i in range(window):
            total += _tap(first, center, inverse, end, i)
        return first, center, inverse, end, tl.where(total == 0.0, 1.0, total)

    @triton.jit
    def _tap(first, center, inverse, end, i):
        """Unnormalised weight of each window's ``i``-th input (zero past the window's end)."""
        position = first + i
        return _keys_cubic((position - center + 0.5) * inverse) * (position < end)

    # Window lengths and the tallest crop change from batch to batch; specialising on them would compile
    # again and again.
    @triton.jit(do_not_specialize=["tallest", "window"])
    def _resize_rows_kernel(table, rows, tallest, size, channels, window, ROWS: tl.constexpr,
                            COLUMNS: tl.constexpr):
        """``rows[b, c, y, x]``: row ``y`` of crop ``b``'s channel ``c`` resampled to output column ``x``."""
        crop = tl.program_id(0).to(tl.int64) // channels
        channel = tl.program_id(0).to(tl.int64) % channels
        entry = table + crop * 8
        image = tl.load(entry).to(tl.pointer_type(tl.uint8))
        width, plane, top, left = tl.load(entry + 1), tl.load(entry + 2), tl.load(entry + 3), tl.load(entry + 4)
        height, crop_width, flip = tl.load(entry + 5), tl.load(entry + 6), tl.load(entry + 7)
        if tl.program_id(1) * ROWS >= height:  # the batch's taller crops need these rows, this one does not
            return
        ys = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        xs = tl.program_id(2) * COLUMNS + tl.arange(0, COLUMNS)
        source_xs = tl.where(flip != 0, size - 1 - xs, xs)  # a mirrored crop takes its columns in reverse
        first, center, inverse, end, total = _windows(source_xs, crop_width.to(tl.float32), size, window)
        # Rows past the crop's last (and taps past its edge, which weigh zero) read a pixel inside it.
        starts = image + channel * plane + (top + tl.minimum(ys, height - 1)) * width + left
        acc = tl.zeros((ROWS, COLUMNS), dtype=tl.float32)
        for j in range(window):
            weight = _tap(first, center, inverse, end, j) / total
            source = tl.minimum(first + j, crop_width.to(tl.float32) - 1).to(tl.int64)
            acc += tl.load(starts[:, None] + source[None, :]).to(tl.float32) * weight[None, :]
        inside = (ys < height)[:, None] & (xs < size)[None, :]
        offsets = ((crop * channels + channel) * tallest + ys[:, None]) * size + xs[None, :]
        tl.store(rows + offsets, acc, mask=inside)

    @triton.jit(do_not_specialize=["tallest", "window"])
    def _resize_columns_kernel(table, rows, out, tallest, size, channels, window, ROWS: tl.constexpr,
                               COLUMNS: tl.constexpr):
        """``out[b, c, y, x]``: column ``x`` of ``rows[b, c]`` resampled to output row ``y``, as uint8."""
        crop = tl.program_id(0).to(tl.int64) // channels
        channel = tl.program_id(0).to(tl.int64) % channels
        height = tl.load(table + crop * 8 + 5)
        ys = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        xs = tl.program_id(2) * COLUMNS + tl.arange(0, COLUMNS)
        first, center, inverse, end, total = _windows(ys, height.to(tl.float32), size, window)
        plane = rows + (crop * channels + channel) * tallest * size
        columns_inside = (xs < size)[None, :]
        acc = tl.zeros((ROWS, COLUMNS), dtype=tl.float32)
        for i in range(window):
            weight = _tap(first, center, inverse, end, i) / total
            source = tl.minimum(first + i, height.to(tl.float32) - 1).to(tl.int64)
            acc += tl.load(plane + source[:, None] * size + xs[None, :], mask=columns_inside, other=0.0) * \
                weight[:, None]
        acc = tl.minimum(tl.maximum(acc, 0.0), 255.0)
        rounded = tl.floor(acc + 0.5)
        odd = rounded - 2.0 * tl.floor(rounded * 0.5) == 1.0
        rounded = tl.where((rounded - acc == 0.5) & odd, rounded - 1.0, rounded)  # halves to even, as torch
        offsets = ((crop * channels + channel) * size + ys[:, None]) * size + xs[None, :]
        tl.store(out + offsets, rounded.to(tl.uint8), mask=(ys < size)[:, None] & columns_inside)
