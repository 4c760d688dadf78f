"""The packed depthwise conv's portable path against plain autograd through a dense conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcmae import random_mask
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


@pytest.mark.parametrize("with_bias", [True, False])
def test_portable_path_matches_autograd_oracle(with_bias):
    b, h, w, c = 3, 24, 16, 12
    feats = NativeSparseBackend().sparsify(torch.randn(b, c, h, w), random_mask(b, (3, 2), 0.5))
    values = feats.values.clone().requires_grad_()
    weight = torch.randn(c, 1, 7, 7, requires_grad=True)
    bias = torch.randn(c, requires_grad=True) if with_bias else None
    probe = torch.randn(values.shape)
    inputs = [values, weight] + ([bias] if with_bias else [])
    out = sparse_depthwise_conv(values, feats.flat_index, None, weight, bias, (b, h, w))
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    ref = dense_oracle(values, feats.flat_index, weight, bias, (b, h, w))
    ref_grads = torch.autograd.grad((ref * probe).sum(), inputs)
    assert relative_error(out, ref) < 1e-6
    for g, r in zip(grads, ref_grads, strict=True):
        assert relative_error(g, r) < 1e-6


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
