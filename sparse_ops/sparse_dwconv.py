"""Depthwise k x k convolution computed at visible sites only.

Input is packed: ``values`` (N, C) in any site order and ``site_flat`` (N,), each site's flat index
into the (B, H, W) grid. Output (N, C) equals a dense zero-padded depthwise conv of the zero-filled
grid, read at the visible sites; masked sites contribute zeros.

On CUDA, Triton kernels read each visible site's visible neighbours straight from the packed rows
through a neighbour table (:func:`neighbour_table`, built once per resolution and shared by every
block of a stage), so no dense or padded grid is ever written: the forward and the input gradient
(the same kernel with the taps flipped) cost 0.39 of the dense work at FCMAE's 60% masking, and the
weight gradient is a reduction over visible sites only. Elsewhere the pure PyTorch path scatters into
a zero grid, runs ``F.conv2d`` and gathers back. On the CPU its weight gradient is instead the same
reduction over visible sites (:func:`tap_weight_grad`), compiled by inductor into one fused loop: oneDNN's
depthwise weight gradient over the whole grid cost 8-15x its forward conv and was the largest part of a
CPU training step. The CUDA path is a torch custom op so ``torch.compile`` keeps it as one opaque node (and
CUDA graphs can capture it).
"""

from __future__ import annotations

import functools
import warnings

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


def uses_neighbour_table(values: Tensor) -> bool:
    """True when the conv of ``values`` reads a :func:`neighbour_table` (the Triton kernel; the CPU weight gradient)."""
    return kernel_available(values) or values.device.type == "cpu"


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


def tap_weight_grad(grad_out: Tensor, values: Tensor, table: Tensor) -> Tensor:
    """Depthwise weight gradient at visible sites: (k*k, C) float32.

    Entry (t, c) sums ``grad_out[n, c] * values[m, c]`` over sites n whose tap-t neighbour is site m
    (``table[t, n] == m``; -1 adds nothing). Eager, this materialises a (k*k, N, C) tensor; compiled
    (:func:`_compiled_tap_weight_grad`) it is one loop that reads each neighbour row where it is used.

    Args:
        grad_out: (N, C) gradient of the conv output.
        values: (N, C) conv input.
        table: (k*k, N) int32 from :func:`neighbour_table`.
    """
    neighbours = values[table.clamp(min=0).long()].float()  # (k*k, N, C)
    neighbours = torch.where((table >= 0)[..., None], neighbours, 0.0)
    return (neighbours * grad_out.float()[None]).sum(1)


@functools.cache
def _compiled_tap_weight_grad():
    """:func:`tap_weight_grad` compiled for any N and C, or None where inductor cannot build CPU code here."""
    compiled = torch.compile(tap_weight_grad, dynamic=True)
    try:  # compiles the general-shape graph once; a missing C++ compiler fails here, not mid-training
        compiled(torch.ones(4, 2), torch.ones(4, 2), torch.full((49, 4), -1, dtype=torch.int32))
    except Exception as err:  # noqa: BLE001 - inductor raises several types for a broken toolchain
        warnings.warn(
            f"cannot compile the CPU depthwise weight gradient ({type(err).__name__}: {err}); "
            "falling back to the slower dense-grid weight gradient",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return compiled


class _GridDepthwiseConv(torch.autograd.Function):
    """Scatter -> dense depthwise conv -> gather, with a backward that skips dense work it can.

    The input gradient is only needed at visible sites: it is a forward conv of the scattered output
    gradient with the flipped kernel (several times cheaper than the fused conv backward on CPU).
    The weight gradient is :func:`tap_weight_grad` over visible sites when a neighbour table is given
    (the CPU), else the conv backward's weight part on the grid. The grid is rebuilt in backward rather
    than kept, so no dense activation is stored.
    """

    @staticmethod
    def forward(ctx, values, site_flat, table, weight, bias, shape):
        ctx.save_for_backward(values, site_flat, table, weight)
        ctx.shape, ctx.has_bias = shape, bias is not None
        grid = _grid(values, site_flat, shape)
        return _at_sites(F.conv2d(grid, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0]), site_flat)

    @staticmethod
    def backward(ctx, grad_out):
        values, site_flat, table, weight = ctx.saved_tensors
        channels, pad = weight.shape[0], weight.shape[-1] // 2
        grad_values = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad = _grid(grad_out, site_flat, ctx.shape)
            grad_values = _at_sites(F.conv2d(grad, weight.flip(2, 3), padding=pad, groups=channels), site_flat)
        if ctx.needs_input_grad[3]:
            grad_weight = _grid_weight_grad(grad_out, values, site_flat, table, weight, ctx.shape)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad_out.sum(0)
        return grad_values, None, None, grad_weight, grad_bias, None


def _grid_weight_grad(grad_out, values, site_flat, table, weight, shape) -> Tensor:
    """(C, 1, k, k) weight gradient with plain strides (as DDP's buckets want)."""
    tap_grad = _compiled_tap_weight_grad() if table is not None else None
    if tap_grad is not None:
        return tap_grad(grad_out, values, table).t().contiguous().view(weight.shape).to(weight.dtype)
    pad = weight.shape[-1] // 2
    grad_weight = torch.ops.aten.convolution_backward(
        _grid(grad_out, site_flat, shape), _grid(values, site_flat, shape), weight, None,
        [1, 1], [pad, pad], [1, 1], False, [0, 0], weight.shape[0], [False, True, False],
    )[1]  # fmt: skip
    return weight.new_empty(weight.shape).copy_(grad_weight)


# Inductor cannot order the strides of this path's symbolically sized zero grid (torch 2.14, CPU); kept eager.
@torch.compiler.disable
def _grid_depthwise_conv(
    values: Tensor,
    site_flat: Tensor,
    table: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    shape: tuple[int, int, int],
) -> Tensor:
    """Portable path: weight (C, 1, k, k) and bias (C,) cast to the values' dtype."""
    bias = None if bias is None else bias.to(values.dtype)
    return _GridDepthwiseConv.apply(values, site_flat, table, weight.to(values.dtype), bias, shape)


def neighbour_table(site_flat: Tensor, shape: tuple[int, int, int], kernel_size: int) -> Tensor:
    """Row of every site's neighbour under every tap, or -1 where the neighbour is masked or outside.

    Args:
        site_flat: (N,) long flat index of every site into the (B, H, W) grid.
        shape: (B, H, W).
        kernel_size: k (odd); tap ``t = ky * k + kx`` looks at offset (ky - k // 2, kx - k // 2).

    Returns:
        (k * k, N) int32, tap-major so a kernel reading one tap for consecutive sites reads contiguously.
    """
    b, h, w = shape
    pad = kernel_size // 2
    wp = w + 2 * pad
    rows = torch.full((b * (h + 2 * pad) * wp,), -1, dtype=torch.int32, device=site_flat.device)
    centre = padded_site_index(site_flat, shape, pad)
    rows[centre] = torch.arange(site_flat.numel(), dtype=torch.int32, device=site_flat.device)
    steps = torch.arange(kernel_size, device=site_flat.device) - pad
    offsets = (steps[:, None] * wp + steps[None, :]).reshape(-1, 1)  # (k*k, 1)
    return rows[centre[None, :] + offsets]


WGRAD_BLOCK_N = 256  # sites per partial sum of the weight gradient (fixed: it sizes the partials buffer)


def _configs(shapes: list[tuple[int, int, int, int]]) -> list:
    return [triton.Config({"BLOCK_N": n, "BLOCK_C": c}, num_warps=w, num_stages=s) for n, c, w, s in shapes]


# The tap loops are run-time loops (tl.range), not unrolled: as fast, and they compile in a fraction of a second
# instead of several seconds per configuration.
if triton is not None:

    @triton.autotune(
        _configs([(64, 64, 4, 3), (32, 128, 4, 3), (32, 64, 4, 2), (64, 128, 8, 3)]),
        key=["N", "C"],
    )
    @triton.jit
    def _gather_conv_kernel(
        values, table, taps, bias, out, N, C,
        K2: tl.constexpr, FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mn = rn < N
        mc = rc < C
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for t in tl.range(0, K2):
            row = tl.load(table + t * N + rn, mask=mn, other=-1)
            v = tl.load(values + row.to(tl.int64)[:, None] * C + rc[None, :], mask=(row >= 0)[:, None] & mc[None, :],
                        other=0.0)
            wk = tl.load(taps + ((K2 - 1 - t) if FLIP else t) * C + rc, mask=mc, other=0.0)
            acc += v.to(tl.float32) * wk.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias + rc, mask=mc, other=0.0).to(tl.float32)[None, :]
        tl.store(out + rn.to(tl.int64)[:, None] * C + rc[None, :], acc.to(out.dtype.element_ty),
                 mask=mn[:, None] & mc[None, :])

    @triton.autotune(
        _configs([(WGRAD_BLOCK_N, 32, 4, 3), (WGRAD_BLOCK_N, 32, 8, 3), (WGRAD_BLOCK_N, 64, 8, 3)]),
        key=["N", "C"],
    )
    @triton.jit
    def _gather_wgrad_kernel(
        values, grad, table, partial, N, C, K2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mn = rn < N
        mc = rc < C
        g = tl.load(grad + rn.to(tl.int64)[:, None] * C + rc[None, :], mask=mn[:, None] & mc[None, :], other=0.0)
        g = g.to(tl.float32)
        for t in tl.range(0, K2):
            row = tl.load(table + t * N + rn, mask=mn, other=-1)
            v = tl.load(values + row.to(tl.int64)[:, None] * C + rc[None, :], mask=(row >= 0)[:, None] & mc[None, :],
                        other=0.0)
            tl.store(partial + (pid_n * K2 + t) * C + rc, tl.sum(v.to(tl.float32) * g, axis=0), mask=mc)


def _gather_conv(values: Tensor, table: Tensor, taps: Tensor, bias: Tensor | None, flip: bool) -> Tensor:
    """Triton launch: (N, C) sums over taps (k*k, C) of each site's neighbours in ``values`` (N, C)."""
    n, channels = values.shape
    out = torch.empty_like(values)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(channels, meta["BLOCK_C"]))  # noqa: E731
    _gather_conv_kernel[grid](
        values, table, taps, out if bias is None else bias, out, n, channels,
        K2=taps.shape[0], FLIP=flip, HAS_BIAS=bias is not None,
    )  # fmt: skip
    return out


def _gather_wgrad(values: Tensor, grad_out: Tensor, table: Tensor, k2: int) -> Tensor:
    """Triton launch: (k*k, C) float32 sum over sites of ``grad_out`` times each tap's neighbour value.

    Each block of sites writes its own partial sums (no atomics, so the result is deterministic); one
    reduction adds them up.
    """
    n, channels = values.shape
    partial = values.new_empty(triton.cdiv(n, WGRAD_BLOCK_N), k2, channels, dtype=torch.float32)
    grid = lambda meta: (partial.shape[0], triton.cdiv(channels, meta["BLOCK_C"]))  # noqa: E731
    _gather_wgrad_kernel[grid](values, grad_out, table, partial, n, channels, K2=k2)
    return partial.sum(0)


@torch.library.custom_op("fcmae::sparse_depthwise_conv", mutates_args=(), device_types="cuda")
def sparse_depthwise_conv_op(values: Tensor, table: Tensor, taps: Tensor, bias: Tensor | None) -> Tensor:
    """Packed depthwise conv on CUDA; ``table`` from :func:`neighbour_table`; ``taps`` (k*k, C)."""
    return _gather_conv(values.contiguous(), table, taps.contiguous(), bias, flip=False)


@sparse_depthwise_conv_op.register_fake
def _(values, table, taps, bias):
    return values.new_empty(values.shape)


@torch.library.custom_op("fcmae::sparse_depthwise_conv_backward", mutates_args=(), device_types="cuda")
def sparse_depthwise_conv_backward_op(
    grad_out: Tensor, values: Tensor, table: Tensor, taps: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`sparse_depthwise_conv_op` for ``values`` (N, C) and ``taps`` (k*k, C).

    The neighbour relation is symmetric (tap t of site i is j exactly when tap k*k-1-t of j is i), so
    the input gradient is the same gathered conv of ``grad_out`` with the kernel flipped.
    """
    grad_out, taps = grad_out.contiguous(), taps.contiguous()
    grad_values = _gather_conv(grad_out, table, taps, None, flip=True)
    grad_taps = _gather_wgrad(values.contiguous(), grad_out, table, taps.shape[0])
    return grad_values, grad_taps.to(taps.dtype)


@sparse_depthwise_conv_backward_op.register_fake
def _(grad_out, values, table, taps):
    return values.new_empty(values.shape), taps.new_empty(taps.shape)


def _setup_context(ctx, inputs, output):
    values, table, taps, bias = inputs
    ctx.save_for_backward(values, table, taps)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    values, table, taps = ctx.saved_tensors
    grad_values, grad_taps = sparse_depthwise_conv_backward_op(grad_out, values, table, taps)
    grad_bias = grad_out.sum(0, dtype=torch.float32).to(grad_out.dtype) if ctx.has_bias else None
    return grad_values, None, grad_taps, grad_bias


sparse_depthwise_conv_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_depthwise_conv(
    values: Tensor,
    site_flat: Tensor,
    neighbours: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    shape: tuple[int, int, int],
) -> Tensor:
    """Depthwise conv of packed sites.

    Args:
        values: (N, C) visible features.
        site_flat: (N,) long flat index of every site into the (B, H, W) grid.
        neighbours: (k*k, N) int32 from :func:`neighbour_table` (where :func:`uses_neighbour_table`), or None.
        weight: (C, 1, k, k) depthwise conv weight, k odd; zero padding k // 2.
        bias: (C,) or None.
        shape: (B, H, W).

    Returns:
        (N, C) conv output at the visible sites.
    """
    if neighbours is None or not kernel_available(values):
        return _grid_depthwise_conv(values, site_flat, neighbours, weight, bias, shape)
    if torch.is_autocast_enabled(values.device.type):  # a custom op is invisible to autocast; cast as conv would
        values = values.to(torch.get_autocast_dtype(values.device.type))
    taps = weight.flatten(1).t().to(values.dtype)  # (k*k, C), tap index ky * k + kx
    bias = None if bias is None else bias.to(values.dtype)
    return sparse_depthwise_conv_op(values, neighbours, taps, bias)
