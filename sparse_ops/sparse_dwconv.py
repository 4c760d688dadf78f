"""Depthwise k x k convolution computed at visible sites only, reading visible neighbours only.

Input is packed: ``values`` (N, C) in any site order, ``site_flat`` (N,) each site's flat index into
the (B, H, W) grid, and ``site_map`` (B * H * W,) int32 holding each grid position's row in
``values`` or -1 where masked. Output (N, C) equals a dense zero-padded depthwise conv of the
zero-filled grid, read at the visible sites.

On CUDA a Triton kernel gathers the k*k neighbours of each site directly from the packed rows (no
dense buffer, no work at masked sites); the input gradient is the same kernel with the kernel
flipped, and the weight gradient a per-offset reduction. Elsewhere the pure PyTorch path scatters
into a zero buffer, runs ``F.conv2d`` and gathers back. Both are registered as a torch custom op so
``torch.compile`` treats the kernel as one opaque node.
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


def site_map_for(site_flat: Tensor, grid_numel: int) -> Tensor:
    """(B * H * W,) int32 map from grid position to packed row, -1 at masked positions."""
    site_map = torch.full((grid_numel,), -1, dtype=torch.int32, device=site_flat.device)
    return site_map.index_copy_(
        0, site_flat, torch.arange(site_flat.numel(), dtype=torch.int32, device=site_flat.device)
    )


def _reference(
    values: Tensor, site_flat: Tensor, weight: Tensor, bias: Tensor | None, shape: tuple[int, int, int]
) -> Tensor:
    """Scatter -> dense depthwise conv -> gather. weight (C, 1, k, k)."""
    b, h, w = shape
    channels = values.shape[-1]
    dense = values.new_zeros(b * h * w, channels).index_copy_(0, site_flat, values)
    dense = dense.view(b, h, w, channels).permute(0, 3, 1, 2)
    out = F.conv2d(
        dense,
        weight.to(values.dtype),
        None if bias is None else bias.to(values.dtype),
        padding=weight.shape[-1] // 2,
        groups=channels,
    )
    return out.permute(0, 2, 3, 1).reshape(-1, channels).index_select(0, site_flat)


if triton is not None:

    @triton.jit
    def _gather_conv_kernel(
        values,
        site_flat,
        site_map,
        weight,
        bias,
        out,
        N,
        C,
        H,
        W,
        K: tl.constexpr,
        FLIP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mn = rn < N
        mc = rc < C
        flat = tl.load(site_flat + rn, mask=mn, other=0)
        hw = H * W
        b = flat // hw
        y = (flat % hw) // W
        x = flat % W
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for ky in tl.static_range(K):
            yy = y + ky - K // 2
            for kx in tl.static_range(K):
                xx = x + kx - K // 2
                inside = mn & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                row = tl.load(site_map + b * hw + yy * W + xx, mask=inside, other=-1)
                ok = row >= 0
                v = tl.load(
                    values + row.to(tl.int64)[:, None] * C + rc[None, :], mask=ok[:, None] & mc[None, :], other=0.0
                )
                tap = (K * K - 1 - (ky * K + kx)) if FLIP else (ky * K + kx)
                wk = tl.load(weight + rc * (K * K) + tap, mask=mc, other=0.0)
                acc += v.to(tl.float32) * wk.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias + rc, mask=mc, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out + rn.to(tl.int64)[:, None] * C + rc[None, :],
            acc.to(out.dtype.element_ty),
            mask=mn[:, None] & mc[None, :],
        )

    @triton.jit
    def _weight_grad_kernel(
        values,
        grad_out,
        site_flat,
        site_map,
        grad_weight,
        N,
        C,
        H,
        W,
        ROWS,
        K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        tap = tl.program_id(0)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        start = tl.program_id(2) * ROWS
        mc = rc < C
        ky = tap // K
        kx = tap % K
        hw = H * W
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for offset in range(0, ROWS, BLOCK_N):
            rn = start + offset + tl.arange(0, BLOCK_N)
            mn = rn < N
            flat = tl.load(site_flat + rn, mask=mn, other=0)
            b = flat // hw
            yy = (flat % hw) // W + ky - K // 2
            xx = flat % W + kx - K // 2
            inside = mn & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            row = tl.load(site_map + b * hw + yy * W + xx, mask=inside, other=-1)
            ok = row >= 0
            v = tl.load(values + row.to(tl.int64)[:, None] * C + rc[None, :], mask=ok[:, None] & mc[None, :], other=0.0)
            g = tl.load(
                grad_out + rn.to(tl.int64)[:, None] * C + rc[None, :], mask=mn[:, None] & mc[None, :], other=0.0
            )
            acc += tl.sum(v.to(tl.float32) * g.to(tl.float32), axis=0)
        tl.atomic_add(grad_weight + rc * (K * K) + tap, acc, mask=mc)


def _block_c(channels: int) -> int:
    return min(128, triton.next_power_of_2(channels))


def _gather_conv(
    values: Tensor, site_flat: Tensor, site_map: Tensor, taps: Tensor, bias: Tensor | None, shape, flip: bool
) -> Tensor:
    """Triton launch: out[n] = sum_k values[neighbour_k(n)] * taps[:, k] (+ bias); taps (C, k*k)."""
    n, channels = values.shape
    out = values.new_empty(values.shape)
    block_n, block_c = 32, _block_c(channels)
    grid = (triton.cdiv(n, block_n), triton.cdiv(channels, block_c))
    k = int(round(taps.shape[1] ** 0.5))
    _gather_conv_kernel[grid](
        values,
        site_flat,
        site_map,
        taps,
        out if bias is None else bias,
        out,
        n,
        channels,
        shape[1],
        shape[2],
        K=k,
        FLIP=flip,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
    )
    return out


@torch.library.custom_op("fcmae::sparse_depthwise_conv", mutates_args=(), device_types="cuda")
def sparse_depthwise_conv_op(
    values: Tensor, site_flat: Tensor, site_map: Tensor, taps: Tensor, bias: Tensor | None, height: int, width: int
) -> Tensor:
    """Packed depthwise conv on CUDA; ``taps`` (C, k*k), taps in row-major kernel order; ``bias`` (C,)."""
    batch = site_map.numel() // (height * width)
    values, taps = values.contiguous(), taps.contiguous()
    return _gather_conv(values, site_flat, site_map, taps, bias, (batch, height, width), False)


@sparse_depthwise_conv_op.register_fake
def _(values, site_flat, site_map, taps, bias, height, width):
    return values.new_empty(values.shape)


@torch.library.custom_op("fcmae::sparse_depthwise_conv_backward", mutates_args=(), device_types="cuda")
def sparse_depthwise_conv_backward_op(
    grad_out: Tensor, values: Tensor, site_flat: Tensor, site_map: Tensor, taps: Tensor, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`sparse_depthwise_conv_op` for ``values`` (N, C) and ``taps`` (C, k*k)."""
    batch = site_map.numel() // (height * width)
    grad_out = grad_out.contiguous()
    grad_values = _gather_conv(grad_out, site_flat, site_map, taps.contiguous(), None, (batch, height, width), True)
    n, channels = values.shape
    grad_taps = torch.zeros(taps.shape, dtype=torch.float32, device=taps.device)
    rows, block_c = 4096, _block_c(channels)
    grid = (taps.shape[1], triton.cdiv(channels, block_c), triton.cdiv(n, rows))
    _weight_grad_kernel[grid](
        values.contiguous(),
        grad_out,
        site_flat,
        site_map,
        grad_taps,
        n,
        channels,
        height,
        width,
        rows,
        K=int(round(taps.shape[1] ** 0.5)),
        BLOCK_N=32,
        BLOCK_C=block_c,
    )
    return grad_values, grad_taps.to(taps.dtype)


@sparse_depthwise_conv_backward_op.register_fake
def _(grad_out, values, site_flat, site_map, taps, height, width):
    return values.new_empty(values.shape), taps.new_empty(taps.shape)


def _setup_context(ctx, inputs, output):
    values, site_flat, site_map, taps, bias, height, width = inputs
    ctx.save_for_backward(values, site_flat, site_map, taps)
    ctx.shape = (height, width)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    values, site_flat, site_map, taps = ctx.saved_tensors
    grad_values, grad_taps = sparse_depthwise_conv_backward_op(grad_out, values, site_flat, site_map, taps, *ctx.shape)
    grad_bias = grad_out.sum(0, dtype=torch.float32).to(grad_out.dtype) if ctx.has_bias else None
    return grad_values, None, None, grad_taps, grad_bias, None, None


sparse_depthwise_conv_op.register_autograd(_backward, setup_context=_setup_context)


def kernel_available(values: Tensor) -> bool:
    """True when the Triton kernel serves ``values`` (CUDA with Triton installed)."""
    return values.is_cuda and triton is not None


def sparse_depthwise_conv(
    values: Tensor,
    site_flat: Tensor,
    site_map: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    shape: tuple[int, int, int],
) -> Tensor:
    """Depthwise conv of packed sites.

    Args:
        values: (N, C) visible features.
        site_flat: (N,) long flat index of every site into the (B, H, W) grid.
        site_map: (B * H * W,) int32 row of each grid position, -1 where masked (:func:`site_map_for`);
            None forces the PyTorch path.
        weight: (C, 1, k, k) depthwise conv weight, k odd; zero padding k // 2.
        bias: (C,) or None.
        shape: (B, H, W).

    Returns:
        (N, C) conv output at the visible sites.
    """
    if site_map is None or not kernel_available(values):
        return _reference(values, site_flat, weight, bias, shape)
    taps = weight.flatten(1).to(values.dtype)  # (C, k*k), tap index ky * k + kx
    bias = None if bias is None else bias.to(values.dtype)
    return sparse_depthwise_conv_op(values, site_flat, site_map, taps, bias, shape[1], shape[2])
