"""Kernel layout conversion between dense conv weights and MinkowskiEngine kernels."""

from __future__ import annotations

import torch

from sparse_ops.me_layout import (
    conv_weight_to_me,
    depthwise_weight_to_me,
    me_to_conv_weight,
    me_to_depthwise_weight,
)


def test_conv_index_rule_and_roundtrip():
    w = torch.randn(5, 3, 2, 2)
    k = conv_weight_to_me(w)
    assert k.shape == (4, 3, 5)
    for kh in range(2):
        for kw in range(2):
            assert torch.equal(k[kw * 2 + kh], w[:, :, kh, kw].T)
    assert torch.equal(me_to_conv_weight(k), w)


def test_depthwise_index_rule_and_roundtrip():
    w = torch.randn(6, 1, 7, 7)
    k = depthwise_weight_to_me(w)
    assert k.shape == (49, 6)
    assert torch.equal(k[2 * 7 + 5], w[:, 0, 5, 2])
    assert torch.equal(me_to_depthwise_weight(k), w)
