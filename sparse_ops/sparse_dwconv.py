"""Depthwise k x k convolution computed at visible sites only.

Input is packed: ``values`` (N, C) in any site order and ``site_flat`` (N,), each site's flat index
into the (B, H, W) grid. Output (N, C) equals a dense zero-padded depthwise conv of the zero-filled
grid, read at the visible sites; masked sites contribute zeros.

On CUDA the visible rows are scattered into a zero-padded channels-last buffer and a Triton kernel
computes the k*k taps at the visible sites only (0.39 of the dense work at FCMAE's 60% masking);
the input gradient is the same kernel with the kernel flipped, applied to the scattered output
gradient, and the weight gradient is cuDNN's on the padded buffers. Elsewhere the pure PyTorch path
scatters into a zero grid, runs ``F.conv2d`` and gathers back. The CUDA path is a torch custom op so
``torch.compile`` keeps it as one opaque node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def kernel_available(values: Tensor) -> bool:
    """True when the Triton kernel serves ``values`` (CUDA with Triton installed)."""
    return values.is_cuda and triton is not None


def padded_site_index(site_flat: Tensor, shape: tuple[int, int, int], pad: int) -> Tensor:
    """Flat index of every site into the (B, H + 2 pad, W + 2 pad) grid: (N,) long."""
    _, height, width = shape
    b, rem = site_flat.div(height * width, rounding_mode="floor"), site_flat % (height * width)
    y, x = rem.div(width, rounding_mode="floor"), rem % width
    return (b * (height + 2 * pad) + y + pad) * (width + 2 * pad) + x + pad


def _grid(values: Tensor, site_flat: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """(B, C, H, W) channels-last zero grid holding the (N, C) ``values`` at their sites."""
    b, h, w = shape
    grid = values.new_zeros(b * h * w, values.shape[-1]).index_copy_(0, site_flat, values)
    return grid.view(b, h, w, -1).permute(0, 3, 1, 2)


def _at_sites(grid: Tensor, site_flat: Tensor) -> Tensor:
    """(B, C, H, W) -> (N, C) rows at the sites."""
    return grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1]).index_select(0, site_flat)


class _GridDepthwiseConv(torch.autograd.Function):
    """Scatter -> dense depthwise conv -> gather, with a backward that skips dense work it can.

    The input gradient is only needed at visible sites: it is a forward conv of the scattered output
    gradient with the flipped kernel (several times cheaper than the fused conv backward on CPU);
    the weight gradient is the conv backward's weight part alone. The grid is rebuilt in backward
    rather than kept, so no dense activation is stored.
    """

    @staticmethod
    def forward(ctx, values, site_flat, weight, bias, shape):
        ctx.save_for_backward(values, site_flat, weight)
        ctx.shape, ctx.has_bias = shape, bias is not None
        grid = _grid(values, site_flat, shape)
        return _at_sites(F.conv2d(grid, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0]), site_flat)

    @staticmethod
    def backward(ctx, grad_out):
        values, site_flat, weight = ctx.saved_tensors
        channels, pad = weight.shape[0], weight.shape[-1] // 2
        grad = _grid(grad_out, site_flat, ctx.shape)
        grad_values = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_values = _at_sites(F.conv2d(grad, weight.flip(2, 3), padding=pad, groups=channels), site_flat)
        if ctx.needs_input_grad[2]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad, _grid(values, site_flat, ctx.shape), weight, None,
                [1, 1], [pad, pad], [1, 1], False, [0, 0], channels, [False, True, False],
            )[1]  # fmt: skip
            grad_weight = weight.new_empty(weight.shape).copy_(grad_weight)  # plain strides, as DDP's buckets want
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum(0)
        return grad_values, None, grad_weight, grad_bias, None


# Inductor cannot order the strides of this path's symbolically sized zero grid (torch 2.14, CPU); kept eager.
@torch.compiler.disable
def _grid_depthwise_conv(
    values: Tensor, site_flat: Tensor, weight: Tensor, bias: Tensor | None, shape: tuple[int, int, int]
) -> Tensor:
    """Portable path: weight (C, 1, k, k) and bias (C,) cast to the values' dtype."""
    bias = None if bias is None else bias.to(values.dtype)
    return _GridDepthwiseConv.apply(values, site_flat, weight.to(values.dtype), bias, shape)


if triton is not None:

    @triton.jit
    def _padded_conv_kernel(
        xpad, centre, weight, bias, out, N, C, WP,
        K: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mn = rn < N
        mc = rc < C
        tile = mn[:, None] & mc[None, :]
        base = tl.load(centre + rn, mask=mn, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for ky in tl.static_range(K):
            for kx in tl.static_range(K):
                pos = base + (ky - K // 2) * WP + (kx - K // 2)
                v = tl.load(xpad + pos[:, None] * C + rc[None, :], mask=tile, other=0.0)
                tap = (K * K - 1 - (ky * K + kx)) if FLIP else (ky * K + kx)
                wk = tl.load(weight + rc * (K * K) + tap, mask=mc, other=0.0)
                acc += v.to(tl.float32) * wk.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias + rc, mask=mc, other=0.0).to(tl.float32)[None, :]
        tl.store(out + rn.to(tl.int64)[:, None] * C + rc[None, :], acc.to(out.dtype.element_ty), mask=tile)


def _scatter_padded(values: Tensor, centre: Tensor, shape: tuple[int, int, int], pad: int) -> Tensor:
    """(B, H + 2 pad, W + 2 pad, C) zero buffer holding ``values`` at the sites."""
    b, h, w = shape
    buffer = values.new_zeros(b * (h + 2 * pad) * (w + 2 * pad), values.shape[-1])
    return buffer.index_copy_(0, centre, values).view(b, h + 2 * pad, w + 2 * pad, -1)


def _padded_conv(xpad: Tensor, centre: Tensor, taps: Tensor, bias: Tensor | None, flip: bool) -> Tensor:
    """Triton launch: (N, C) = sum over taps of xpad around each ``centre``; taps (C, k*k)."""
    n, channels = centre.numel(), xpad.shape[-1]
    out = xpad.new_empty(n, channels)

    block_n, block_c = 32, 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(channels, block_c))
    k = int(round(taps.shape[1] ** 0.5))
    _padded_conv_kernel[grid](
        xpad, centre, taps, out if bias is None else bias, out, n, channels, xpad.shape[2],
        K=k, FLIP=flip, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out


@torch.library.custom_op("fcmae::sparse_depthwise_conv", mutates_args=(), device_types="cuda")
def sparse_depthwise_conv_op(
    values: Tensor, centre: Tensor, taps: Tensor, bias: Tensor | None, batch: int, height: int, width: int
) -> Tensor:
    """Packed depthwise conv on CUDA; ``centre`` from :func:`padded_site_index`; ``taps`` (C, k*k)."""
    pad = int(round(taps.shape[1] ** 0.5)) // 2
    xpad = _scatter_padded(values.contiguous(), centre, (batch, height, width), pad)
    return _padded_conv(xpad, centre, taps.contiguous(), bias, flip=False)


@sparse_depthwise_conv_op.register_fake
def _(values, centre, taps, bias, batch, height, width):
    return values.new_empty(values.shape)


@torch.library.custom_op("fcmae::sparse_depthwise_conv_backward", mutates_args=(), device_types="cuda")
def sparse_depthwise_conv_backward_op(
    grad_out: Tensor, values: Tensor, centre: Tensor, taps: Tensor, batch: int, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`sparse_depthwise_conv_op` for ``values`` (N, C) and ``taps`` (C, k*k)."""
    k = int(round(taps.shape[1] ** 0.5))
    shape = (batch, height, width)
    gpad = _scatter_padded(grad_out.contiguous(), centre, shape, k // 2)
    grad_values = _padded_conv(gpad, centre, taps.contiguous(), None, flip=True)
    xpad = _scatter_padded(values.contiguous(), centre, shape, k // 2).permute(0, 3, 1, 2)
    grad_dense = gpad[:, k // 2 : k // 2 + height, k // 2 : k // 2 + width].permute(0, 3, 1, 2)
    weight = taps.view(-1, 1, k, k)
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_dense, xpad, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], weight.shape[0], [False, True, False]
    )
    return grad_values, grad_weight.reshape(taps.shape)


@sparse_depthwise_conv_backward_op.register_fake
def _(grad_out, values, centre, taps, batch, height, width):
    return values.new_empty(values.shape), taps.new_empty(taps.shape)


def _setup_context(ctx, inputs, output):
    values, centre, taps, bias, batch, height, width = inputs
    ctx.save_for_backward(values, centre, taps)
    ctx.shape = (batch, height, width)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    values, centre, taps = ctx.saved_tensors
    grad_values, grad_taps = sparse_depthwise_conv_backward_op(grad_out, values, centre, taps, *ctx.shape)
    grad_bias = grad_out.sum(0, dtype=torch.float32).to(grad_out.dtype) if ctx.has_bias else None
    return grad_values, None, grad_taps, grad_bias, None, None, None


sparse_depthwise_conv_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_depthwise_conv(
    values: Tensor,
    site_flat: Tensor,
    centre: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    shape: tuple[int, int, int],
) -> Tensor:
    """Depthwise conv of packed sites.

    Args:
        values: (N, C) visible features.
        site_flat: (N,) long flat index of every site into the (B, H, W) grid.
        centre: (N,) long index of every site into the padded grid (:func:`padded_site_index` with
            pad k // 2), or None for the PyTorch path.
        weight: (C, 1, k, k) depthwise conv weight, k odd; zero padding k // 2.
        bias: (C,) or None.
        shape: (B, H, W).

    Returns:
        (N, C) conv output at the visible sites.
    """
    if centre is None or not kernel_available(values):
        return _grid_depthwise_conv(values, site_flat, weight, bias, shape)
    if torch.is_autocast_enabled(values.device.type):  # a custom op is invisible to autocast; cast as conv would
        values = values.to(torch.get_autocast_dtype(values.device.type))
    taps = weight.flatten(1).to(values.dtype)  # (C, k*k), tap index ky * k + kx
    bias = None if bias is None else bias.to(values.dtype)
    return sparse_depthwise_conv_op(values, centre, taps, bias, *shape)
