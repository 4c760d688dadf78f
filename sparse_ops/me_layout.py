"""The one place where MinkowskiEngine kernel tensors meet dense conv weights.

MinkowskiEngine stores a k x k kernel as (k*k, in, out) (depthwise: (k*k, C)) with the kernel index
``kw * k + kh`` (the row offset varies fastest), which is cross-correlation like PyTorch, so no flip:
``W_dense[o, i, kh, kw] = K[kw * k + kh, i, o]``. Both the MinkowskiEngine backend and the loader of
official MinkowskiEngine-layout checkpoints use these functions.
"""

from __future__ import annotations

import math

from torch import Tensor


def _side(kernel_volume: int) -> int:
    k = math.isqrt(kernel_volume)
    if k * k != kernel_volume:
        raise ValueError(f"kernel volume {kernel_volume} is not a square")
    return k


def conv_weight_to_me(weight: Tensor) -> Tensor:
    """(out, in, k, k) dense conv weight -> (k*k, in, out) MinkowskiEngine kernel."""
    k = weight.shape[-1]
    return weight.permute(3, 2, 1, 0).reshape(k * k, weight.shape[1], weight.shape[0])


def me_to_conv_weight(kernel: Tensor) -> Tensor:
    """(k*k, in, out) MinkowskiEngine kernel -> (out, in, k, k) dense conv weight."""
    k = _side(kernel.shape[0])
    return kernel.reshape(k, k, kernel.shape[1], kernel.shape[2]).permute(3, 2, 1, 0).contiguous()


def depthwise_weight_to_me(weight: Tensor) -> Tensor:
    """(C, 1, k, k) dense depthwise weight -> (k*k, C) MinkowskiEngine depthwise kernel."""
    k = weight.shape[-1]
    return weight[:, 0].permute(2, 1, 0).reshape(k * k, weight.shape[0])


def me_to_depthwise_weight(kernel: Tensor) -> Tensor:
    """(k*k, C) MinkowskiEngine depthwise kernel -> (C, 1, k, k) dense depthwise weight."""
    k = _side(kernel.shape[0])
    return kernel.reshape(k, k, kernel.shape[1]).permute(2, 1, 0).unsqueeze(1).contiguous()
