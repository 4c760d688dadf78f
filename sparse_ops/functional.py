"""Numerics shared by the dense model and every sparse backend.

Kept here, at the bottom of the import graph, so that ``models`` builds on ``sparse_ops`` and never
the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-6
GRN_EPS = 1e-6


def grn_response(gx: Tensor) -> Tensor:
    """Divide spatial L2 norms by their channel mean (the official code's mean, not the paper's sum).

    Args:
        gx: (..., C) spatial L2 norm of every channel.

    Returns:
        (..., C) normalised response ``Nx``.
    """
    return gx / (gx.mean(dim=-1, keepdim=True) + GRN_EPS)


def drop_path_scale(batch_size: int, drop_prob: float, training: bool, like: Tensor) -> Tensor | None:
    """Per-sample stochastic-depth multipliers (0 or 1/keep_prob), or None when inactive.

    Every backend draws exactly this tensor, so dense and sparse paths agree under a fixed seed.

    Returns:
        (B,) tensor in ``like``'s dtype and device, or None.
    """
    if drop_prob == 0.0 or not training:
        return None
    keep_prob = 1.0 - drop_prob
    return like.new_empty(batch_size).bernoulli_(keep_prob).div_(keep_prob)


def segment_grn_nx(batch_index: Tensor, batch_size: int) -> Callable[[Tensor], Tensor]:
    """GRN response from per-sample L2 norms over each sample's own rows of packed (N, C) features.

    Args:
        batch_index: (N,) long sample of every row.
        batch_size: B.

    Returns:
        A function mapping (N, C) features to their (N, C) response ``Nx``.
    """

    def nx(y: Tensor) -> Tensor:
        sumsq = y.new_zeros(batch_size, y.shape[-1], dtype=torch.float32)
        sumsq.index_add_(0, batch_index, y.float().square())
        # sqrt has an infinite slope at 0: a sample with no visible site gets a zero norm and gradient.
        present = sumsq > 0
        gx = torch.where(present, sumsq, torch.ones_like(sumsq)).sqrt() * present
        return grn_response(gx).to(y.dtype)[batch_index]

    return nx


def gelu_then_grn(grn_nx: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Any], Tensor]:
    """The MLP's activation and GRN as one function of the ``fc1`` output, with statistics from ``grn_nx``.

    Args:
        grn_nx: maps the GELU output (..., 4C) to the GRN response ``Nx`` broadcastable against it.

    Returns:
        A function of (``h`` (..., 4C), the GRN module) giving the GRN output (..., 4C).
    """

    def act_grn(h: Tensor, grn: Any) -> Tensor:
        y = F.gelu(h)
        return grn.apply_response(y, grn_nx(y))

    return act_grn


def batch_grn_nx(y: Tensor) -> Tensor:
    """GRN response from L2 norms over every row of the batch (the official ``MinkowskiGRN``): (..., C) -> (C,)."""
    return grn_response(torch.linalg.vector_norm(y, ord=2, dim=tuple(range(y.dim() - 1))))
