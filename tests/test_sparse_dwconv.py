"""The packed depthwise conv's portable path against plain autograd through a dense conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcmae import random_mask
from sparse_ops import sparse_dwconv as sd
from sparse_ops.native import NativeSparseBackend
from sparse_ops.sparse_dwconv import sparse_depthwise_conv
from tests.helpers import relative_error, run_in_triton_interpreter


def dense_oracle(values, site_flat, weight, bias, shape):
    """Scatter into a zero grid, dense conv, gather; differentiated by autograd."""
    b, h, w = shape
    grid = torch.zeros(b * h * w, values.shape[-1], dtype=values.dtype, device=values.device)
    grid = grid.index_copy(0, site_flat, values).view(b, h, w, -1).permute(0, 3, 1, 2)
    out = F.conv2d(grid, weight, bias, padding=weight.shape[-1] // 2, groups=values.shape[-1])
    return out.permute(0, 2, 3, 1).reshape(-1, values.shape[-1])[site_flat]


@pytest.mark.parametrize("with_table", [True, False])  # the CPU weight gradient over visible sites, or the grid's
@pytest.mark.parametrize("with_bias", [True, False])
def test_portable_path_matches_autograd_oracle(with_bias, with_table):
    b, h, w, c = 3, 24, 16, 12
    feats = NativeSparseBackend().sparsify(torch.randn(b, c, h, w), random_mask(b, (3, 2), 0.5))
    assert feats.neighbours is not None  # the CPU path builds the table
    values = feats.values.clone().requires_grad_()
    weight = torch.randn(c, 1, 7, 7, requires_grad=True)
    bias = torch.randn(c, requires_grad=True) if with_bias else None
    probe = torch.randn(values.shape)
    inputs = [values, weight] + ([bias] if with_bias else [])
    table = feats.neighbours if with_table else None
    out = sparse_depthwise_conv(values, feats.flat_index, table, weight, bias, (b, h, w))
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    ref = dense_oracle(values, feats.flat_index, weight, bias, (b, h, w))
    ref_grads = torch.autograd.grad((ref * probe).sum(), inputs)
    assert relative_error(out, ref) < 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        assert relative_error(g, r) < 1e-6
    assert grads[1].stride() == weight.stride()  # plain strides, as DDP's buckets want


def test_tap_weight_grad_eager_matches_compiled():
    n, c = 50, 6
    table = torch.randint(-1, n, (49, n), dtype=torch.int32)
    grad_out, values = torch.randn(n, c), torch.randn(n, c)
    eager = sd.tap_weight_grad(grad_out, values, table)
    assert eager.shape == (49, c)
    picked = torch.where((table >= 0)[..., None], values[table.clamp(min=0).long()], 0.0)
    assert relative_error(eager, torch.einsum("tnc,nc->tc", picked, grad_out)) < 1e-6
    assert relative_error(sd._compiled_tap_weight_grad()(grad_out, values, table), eager) < 1e-6


def test_weight_grad_falls_back_when_inductor_cannot_compile(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    sd._compiled_tap_weight_grad.cache_clear()
    monkeypatch.setattr(torch, "compile", broken_compile)
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert sd._compiled_tap_weight_grad() is None
        b, h, w, c = 2, 16, 16, 4
        feats = NativeSparseBackend().sparsify(torch.randn(b, c, h, w), random_mask(b, (2, 2), 0.5))
        weight = torch.randn(c, 1, 7, 7, requires_grad=True)
        out = sparse_depthwise_conv(feats.values, feats.flat_index, feats.neighbours, weight, None, (b, h, w))
        ref = dense_oracle(feats.values, feats.flat_index, weight, None, (b, h, w))
        probe = torch.randn(out.shape)
        (grad,), (ref_grad,) = torch.autograd.grad((out * probe).sum(), weight), torch.autograd.grad(
            (ref * probe).sum(), weight)
        assert relative_error(grad, ref_grad) < 1e-6
    finally:
        sd._compiled_tap_weight_grad.cache_clear()


_INTERPRETED_CHECK = """
import torch
from fcmae import random_mask
from sparse_ops.native import NativeSparseBackend
from sparse_ops import sparse_dwconv as sd
from tests.test_sparse_dwconv import dense_oracle

b, h, w, c = 3, 24, 16, 40
torch.manual_seed(0)
feats = NativeSparseBackend().sparsify(torch.randn(b, c, h, w), random_mask(b, (3, 2), 0.5))
values = feats.values.clone().requires_grad_()
weight = torch.randn(c, 1, 7, 7, requires_grad=True)
bias = torch.randn(c, requires_grad=True)
table = sd.neighbour_table(feats.flat_index, (b, h, w), 7)
taps = weight.detach().flatten(1)
ref = dense_oracle(values, feats.flat_index, weight, bias, (b, h, w))
probe = torch.randn_like(ref)
ref_values, ref_weight = torch.autograd.grad((ref * probe).sum(), (values, weight))
taps = taps.t().contiguous()  # (49, C)
errors = []
conv_configs, wgrad_configs = sd._gather_conv_kernel.configs, sd._gather_wgrad_kernel.configs
for config in conv_configs:  # one config at a time: the interpreter cannot benchmark, so test them all
    sd._gather_conv_kernel.configs = [config]
    out = sd._gather_conv(values.detach(), table, taps, bias.detach(), flip=False)
    errors.append((out - ref).abs().max() / ref.abs().max())
    out = sd._gather_conv(probe, table, taps, None, flip=True)
    errors.append((out - ref_values).abs().max() / ref_values.abs().max())
for config in wgrad_configs:
    sd._gather_wgrad_kernel.configs = [config]
    out = sd._gather_wgrad(values.detach(), probe, table, 49)
    errors.append((out - ref_weight.flatten(1).t()).abs().max() / ref_weight.abs().max())
print(len(errors), max(e.item() for e in errors))
"""


def test_triton_kernels_match_oracle_in_interpreter():
    """The CUDA kernels' arithmetic (forward, flipped input gradient, weight gradient), run by Triton's CPU
    interpreter so CI checks it without a GPU."""
    pytest.importorskip("triton")
    from sparse_ops import sparse_dwconv as sd
    count, worst = run_in_triton_interpreter(_INTERPRETED_CHECK)
    assert count == 2 * len(sd._gather_conv_kernel.configs) + len(sd._gather_wgrad_kernel.configs)
    assert worst < 1e-6
