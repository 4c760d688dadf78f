"""Numerics shared by the dense model and every sparse backend.

Kept here, at the bottom of the import graph, so that ``models`` builds on ``sparse_ops`` and never
the other way round.
"""

from __future__ import annotations

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
