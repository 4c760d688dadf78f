"""The packed depthwise conv's portable path against plain autograd through a dense conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fcmae import random_mask
from sparse_ops.native import NativeSparseBackend
from sparse_ops.sparse_dwconv import sparse_depthwise_conv
from tests.helpers import relative_error


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
