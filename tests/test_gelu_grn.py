"""The fused GELU + GRN kernels against autograd through the plain PyTorch expression."""

from __future__ import annotations

import pytest
import torch

from sparse_ops.gelu_grn import gelu_grn, gelu_grn_reference
from tests.helpers import relative_error, run_in_triton_interpreter


def test_cpu_path_is_the_reference():
    h, weight, bias = torch.randn(2, 5, 8), torch.randn(8), torch.randn(8)
    assert torch.equal(gelu_grn(h, weight, bias), gelu_grn_reference(h, weight, bias))


def test_reference_matches_the_dense_grn_module():
    """Per-sample statistics over dim 1 of (B, n, D) are the dense GRN's over (H, W) of (B, H, W, D)."""
    from models.layers import GlobalResponseNorm

    grn = GlobalResponseNorm(6)
    torch.nn.init.normal_(grn.weight)
    torch.nn.init.normal_(grn.bias)
    h = torch.randn(3, 4, 5, 6)
    want = grn(torch.nn.functional.gelu(h))
    got = gelu_grn_reference(h.flatten(1, 2), grn.weight, grn.bias).view_as(want)
    assert relative_error(got, want) < 1e-6


_INTERPRETED_CHECK = """
import torch
from sparse_ops import gelu_grn as gg

torch.manual_seed(0)
results = []
site_configs, point_configs = gg._site_sums_kernel.configs, gg._pointwise_kernel.configs
for batch, n, dim in ((3, 37, 40), (2, 5, 300)):  # rows and channels that are not multiples of the blocks
    h = torch.randn(batch, n, dim, dtype=torch.float64).float().requires_grad_()
    h.data[0, :, 3] = 0.0  # a channel whose norm is zero in one sample
    weight = torch.randn(dim, requires_grad=True)
    bias = torch.randn(dim, requires_grad=True)
    ref = gg.gelu_grn_reference(h, weight, bias)
    probe = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * probe).sum(), (h, weight, bias))
    for site_config, point_config in zip(site_configs, point_configs, strict=True):
        gg._site_sums_kernel.configs, gg._pointwise_kernel.configs = [site_config], [point_config]
        out, sumsq, nx = gg._fused_forward(h.detach(), weight.detach(), bias.detach())
        grads = gg._fused_backward(probe, h.detach(), weight.detach(), sumsq, nx)
        for got, want in zip((out, *grads), (ref, *ref_grads), strict=True):
            results.append(((got - want).abs().max() / want.abs().max()).item())
print(len(results), max(results))
"""


def test_triton_kernels_match_reference_in_interpreter():
    """Forward and all three gradients of the CUDA kernels, run by Triton's CPU interpreter (no GPU needed)."""
    pytest.importorskip("triton")
    from sparse_ops import gelu_grn as gg

    count, worst = run_in_triton_interpreter(_INTERPRETED_CHECK)
    assert count == 2 * 4 * len(gg._site_sums_kernel.configs)
    assert worst < 1e-5
