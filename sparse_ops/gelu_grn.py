"""GELU then Global Response Normalisation with per-sample statistics, fused for (B, n, D) features.

The native backend holds the visible sites of each sample as a (B, n, D) block after ``fc1``. Compiled
PyTorch runs GELU + GRN there as several reduction and element-wise kernels, and its reductions over the
short, strided site dimension were the largest cost of a training step after the depthwise conv. On CUDA
this module does the same arithmetic in five Triton kernels that each stream the (B, n, D) tensors once:

- forward: per-(sample, channel) sum of squares of ``y = gelu(h)``; the response ``Nx`` and the factor
  ``1 + weight * Nx`` per sample; ``y * factor + bias``;
- backward: per-(sample, channel) sums of ``grad`` and ``grad * y``; the gradient reaching the norms; the
  input gradient ``(grad * factor + y * k) * gelu'(h)``.

``y`` is rounded to ``h``'s dtype before use, as the unfused bf16 path does. Elsewhere :func:`gelu_grn` is
the plain PyTorch expression, which is also the reference the kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_ops.functional import GRN_EPS, grn_response

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def gelu_grn_reference(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``GRN(gelu(h))`` with statistics over dim 1: (B, n, D) -> (B, n, D); ``weight``, ``bias`` (D,)."""
    y = F.gelu(h)
    nx = grn_response(torch.linalg.vector_norm(y, ord=2, dim=1, keepdim=True))
    return torch.addcmul(bias.to(y.dtype), y, (1 + weight * nx).to(y.dtype))


def _configs(shapes: list[tuple[int, int, int]]) -> list:
    return [triton.Config({"BLOCK_R": r, "BLOCK_D": d}, num_warps=w) for r, d, w in shapes]


if triton is not None:

    @triton.jit
    def _gelu_and_slope(h):
        """Exact (erf) GELU of float32 ``h`` and its derivative."""
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        return h * cdf, cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)

    @triton.autotune(_configs([(32, 128, 4), (16, 256, 4), (64, 64, 4)]), key=["n", "D", "WITH_GRAD"])
    @triton.jit
    def _site_sums_kernel(
        h, grad, sums, grad_sums, n, D, WITH_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Per (sample, channel) over sites: sum of y^2, or (WITH_GRAD) sums of grad * y and of grad."""
        b = tl.program_id(0)
        rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        md = rd < D
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        acc_grad = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for r0 in tl.range(0, n, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            offsets = (b * n + rows).to(tl.int64)[:, None] * D + rd[None, :]
            m = (rows < n)[:, None] & md[None, :]
            x = tl.load(h + offsets, mask=m, other=0.0)
            y = _gelu_and_slope(x.to(tl.float32))[0].to(x.dtype).to(tl.float32)
            if WITH_GRAD:
                g = tl.load(grad + offsets, mask=m, other=0.0).to(tl.float32)
                acc += g * y
                acc_grad += g
            else:
                acc += y * y
        tl.store(sums + b * D + rd, tl.sum(acc, axis=0), mask=md)
        if WITH_GRAD:
            tl.store(grad_sums + b * D + rd, tl.sum(acc_grad, axis=0), mask=md)

    @triton.jit
    def _sample_norms(sumsq, weight, D, eps, BLOCK_D: tl.constexpr):
        """This program's sample: offsets and mask of its (D,) row, |y| per channel, weight, mean |y| + eps."""
        rd = tl.arange(0, BLOCK_D)
        md = rd < D
        row = tl.program_id(0) * D + rd
        gx = tl.sqrt(tl.load(sumsq + row, mask=md, other=0.0))
        return row, md, gx, tl.load(weight + rd, mask=md, other=0.0), tl.sum(gx, axis=0) / D + eps

    @triton.jit
    def _response_kernel(sumsq, weight, nx, factor, D, eps, BLOCK_D: tl.constexpr):
        """One sample: Nx = |y| / (mean |y| + eps) over channels, factor = 1 + weight * Nx."""
        row, md, gx, w, denom = _sample_norms(sumsq, weight, D, eps, BLOCK_D)
        tl.store(nx + row, gx / denom, mask=md)
        tl.store(factor + row, 1.0 + w * (gx / denom), mask=md)

    @triton.jit
    def _norm_grad_kernel(grad_y_sums, sumsq, weight, k, factor, D, eps, BLOCK_D: tl.constexpr):
        """One sample: k = dL/d|y| / |y| per channel, so the statistics add ``y * k`` to dL/dy; and the
        forward's factor 1 + weight * Nx again, rather than keeping it."""
        row, md, gx, w, denom = _sample_norms(sumsq, weight, D, eps, BLOCK_D)
        tl.store(factor + row, 1.0 + w * (gx / denom), mask=md)
        grad_nx = w * tl.load(grad_y_sums + row, mask=md, other=0.0)
        grad_gx = grad_nx / denom - tl.sum(grad_nx * gx, axis=0) / (denom * denom * D)
        # a channel with |y| = 0 has y = 0 at every site, so its k never contributes
        tl.store(k + row, tl.where(gx > 0, grad_gx / tl.where(gx > 0, gx, 1.0), 0.0), mask=md)

    @triton.autotune(_configs([(16, 256, 4), (32, 128, 4), (8, 512, 4)]), key=["n", "D", "BACKWARD"])
    @triton.jit
    def _pointwise_kernel(
        h, grad, factor, shift, out, rows_total, n, D,
        BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Forward: out = y * factor + bias. Backward (shift = k): out = (grad * factor + y * k) * gelu'(h)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        m = (rows < rows_total)[:, None] & (rd < D)[None, :]
        offsets = rows.to(tl.int64)[:, None] * D + rd[None, :]
        per_sample = (rows // n)[:, None] * D + rd[None, :]
        x = tl.load(h + offsets, mask=m, other=0.0)
        y, slope = _gelu_and_slope(x.to(tl.float32))
        y = y.to(x.dtype).to(tl.float32)
        f = tl.load(factor + per_sample, mask=m, other=0.0)
        if BACKWARD:
            g = tl.load(grad + offsets, mask=m, other=0.0).to(tl.float32)
            result = (g * f + y * tl.load(shift + per_sample, mask=m, other=0.0)) * slope
        else:
            result = y * f + tl.load(shift + rd, mask=rd < D, other=0.0)[None, :]
        tl.store(out + offsets, result.to(out.dtype.element_ty), mask=m)


def _site_sums(h: Tensor, grad: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(B, D) float32 sums over sites: of y^2 when ``grad`` is None, else of grad * y and of grad."""
    batch, n, dim = h.shape
    sums = h.new_empty(batch, dim, dtype=torch.float32)
    grad_sums = None if grad is None else torch.empty_like(sums)
    grid = lambda meta: (batch, triton.cdiv(dim, meta["BLOCK_D"]))  # noqa: E731
    _site_sums_kernel[grid](h, h if grad is None else grad, sums, sums if grad is None else grad_sums, n, dim,
                            WITH_GRAD=grad is not None)
    return sums, grad_sums


def _per_sample_launch(kernel, batch: int, dim: int, *args) -> None:
    """One program per sample over all ``dim`` channels."""
    block = triton.next_power_of_2(dim)
    kernel[(batch,)](*args, dim, GRN_EPS, BLOCK_D=block, num_warps=8 if block >= 2048 else 4)


def _pointwise(h: Tensor, grad: Tensor | None, factor: Tensor, shift: Tensor) -> Tensor:
    batch, n, dim = h.shape
    out = torch.empty_like(h)
    grid = lambda meta: (triton.cdiv(batch * n, meta["BLOCK_R"]), triton.cdiv(dim, meta["BLOCK_D"]))  # noqa: E731
    _pointwise_kernel[grid](h, h if grad is None else grad, factor, shift, out, batch * n, n, dim,
                            BACKWARD=grad is not None)
    return out


def _fused_forward(h: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel launches of :func:`gelu_grn_op`."""
    h = h.contiguous()
    batch, _, dim = h.shape
    sumsq, _ = _site_sums(h, None)
    nx, factor = torch.empty_like(sumsq), torch.empty_like(sumsq)
    _per_sample_launch(_response_kernel, batch, dim, sumsq, weight.float().contiguous(), nx, factor)
    return _pointwise(h, None, factor, bias.float().contiguous()), sumsq, nx


def _fused_backward(
    grad: Tensor, h: Tensor, weight: Tensor, sumsq: Tensor, nx: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel launches of :func:`gelu_grn_backward_op`."""
    grad, h = grad.contiguous(), h.contiguous()
    batch, _, dim = h.shape
    weight = weight.float().contiguous()
    grad_y_sums, grad_sums = _site_sums(h, grad)
    k, factor = torch.empty_like(sumsq), torch.empty_like(sumsq)
    _per_sample_launch(_norm_grad_kernel, batch, dim, grad_y_sums, sumsq, weight, k, factor)
    grad_h = _pointwise(h, grad, factor, k)
    return grad_h, (grad_y_sums * nx).sum(0), grad_sums.sum(0)


@torch.library.custom_op("fcmae::gelu_grn", mutates_args=(), device_types="cuda")
def gelu_grn_op(h: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fused :func:`gelu_grn_reference`; also returns the (B, D) float32 sums of squares and ``Nx``."""
    return _fused_forward(h, weight, bias)


@gelu_grn_op.register_fake
def _(h, weight, bias):
    stats = h.new_empty(h.shape[0], h.shape[2], dtype=torch.float32)
    return h.new_empty(h.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("fcmae::gelu_grn_backward", mutates_args=(), device_types="cuda")
def gelu_grn_backward_op(
    grad: Tensor, h: Tensor, weight: Tensor, sumsq: Tensor, nx: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`gelu_grn_op` for ``h`` (B, n, D), ``weight`` and ``bias`` (D,) float32."""
    return _fused_backward(grad, h, weight, sumsq, nx)


@gelu_grn_backward_op.register_fake
def _(grad, h, weight, sumsq, nx):
    return h.new_empty(h.shape), sumsq.new_empty(h.shape[2]), sumsq.new_empty(h.shape[2])


def _setup_context(ctx, inputs, output):
    h, weight, bias = inputs
    _, sumsq, nx = output
    ctx.save_for_backward(h, weight, sumsq, nx)
    ctx.dtypes = weight.dtype, bias.dtype


def _backward(ctx, grad, _grad_sumsq, _grad_nx):
    h, weight, sumsq, nx = ctx.saved_tensors
    grad_h, grad_weight, grad_bias = gelu_grn_backward_op(grad, h, weight, sumsq, nx)
    return grad_h, grad_weight.to(ctx.dtypes[0]), grad_bias.to(ctx.dtypes[1])


gelu_grn_op.register_autograd(_backward, setup_context=_setup_context)


def gelu_grn(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """GELU then GRN with per-sample statistics over the sites of (B, n, D) ``h``.

    Args:
        h: (B, n, D) pre-activation features (``fc1`` output), n sites per sample.
        weight: (D,) GRN gamma.
        bias: (D,) GRN beta.

    Returns:
        (B, n, D) in ``h``'s dtype.
    """
    if h.is_cuda and triton is not None:
        return gelu_grn_op(h, weight, bias)[0]
    return gelu_grn_reference(h, weight, bias)
