"""Patch layout and the FCMAE reconstruction loss."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

NORM_PIX_EPS = 1e-6


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p*p*C); patches row-major, within a patch (row p, col q, channel c)."""
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=patch_size, q=patch_size)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of :func:`patchify`."""
    return rearrange(
        patches, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch_size, q=patch_size, c=in_chans
    )


def normalize_patches(target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-patch normalisation of (B, L, D) targets: mean, unbiased variance, eps 1e-6.

    Returns:
        normalised target (B, L, D), mean (B, L, 1), std (B, L, 1) (``sqrt(var + eps)``).
    """
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()
    return (target - mean) / std, mean, std


def patch_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over patches of the per-patch MSE.

    Args:
        pred: (R, D) predictions of R patches (FCMAE predicts its masked patches only).
        target: (R, D) their targets.

    Returns:
        Scalar, float32; 0 when there are no patches.
    """
    per_patch = (pred.float() - target.float()).square().mean(dim=-1)
    return per_patch.sum() / max(per_patch.shape[0], 1)
