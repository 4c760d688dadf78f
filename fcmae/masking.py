"""Random patch masks. Convention everywhere: bool, **True = masked (removed)**."""

from __future__ import annotations

import torch
from torch import Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: ``int(L * (1 - mask_ratio))`` (19 of 49 at 0.6), as the official code.

    Raises:
        ValueError: ratio outside [0, 1), or a ratio that would leave no patch visible.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return keep


@torch.compiler.disable  # host-side keyed draw; pinning a CPU mask cannot be traced
def random_mask(
        batch_size: int,
        grid: tuple[int, int],
        mask_ratio: float,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random masks with exactly ``num_visible`` visible patches per sample.

    Args:
        batch_size: B.
        grid: (h, w) patch grid.
        mask_ratio: fraction of patches to remove, in [0, 1).
        generator: makes the draw reproducible; noise is drawn on its device.
        device: device of the returned mask.

    Returns:
        (B, h, w) bool, True = masked.
    """
    h, w = grid
    keep = num_visible(h * w, mask_ratio)
    noise_device = generator.device if generator is not None else device
    seeded = {"generator": generator} if generator is not None else {}  # generator=None breaks dynamic compile
    noise = torch.rand(batch_size, h * w, device=noise_device, **seeded)
    kept = noise.argsort(dim=1)[:, :keep]
    mask = torch.ones(batch_size, h * w, dtype=torch.bool, device=noise_device)
    mask.scatter_(1, kept, False)
    mask = mask.view(batch_size, h, w)
    if device is not None and torch.device(device).type == "cuda" and mask.device.type == "cpu":
        return mask.pin_memory().to(device, non_blocking=True)  # a pageable copy would wait for the GPU
    return mask.to(device)


def as_grid_mask(mask: Tensor, batch_size: int, grid: tuple[int, int]) -> Tensor:
    """Validate a user-supplied mask and return it as (B, h, w) bool.

    Accepts (B, L) or (B, h, w), bool or numeric 0/1 (1 = masked).
    """
    h, w = grid
    if mask.shape not in ((batch_size, h * w), (batch_size, h, w)):
        raise ValueError(
            f"mask must have shape ({batch_size}, {h * w}) or ({batch_size}, {h}, {w}), got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("a numeric mask must hold only 0 (visible) and 1 (masked)")
        mask = mask.bool()
    return mask.reshape(batch_size, h, w)


def masked_rows(mask: Tensor, masked_per_sample: int | None = None) -> Tensor:
    """Flat indices into B*L of the masked patches of a (B, L) bool mask, ascending: ``mask.flatten().nonzero()``.

    Args:
        mask: (B, L) bool, True = masked.
        masked_per_sample: the caller's promise that every sample masks exactly this many patches
            (true of :func:`random_mask`); gives a fixed-shape computation with no host sync.

    Returns:
        (R,) long.
    """
    if masked_per_sample is None:
        return mask.flatten().nonzero().squeeze(1)
    batch, length = mask.shape
    first = torch.argsort(mask.to(torch.int32), dim=1, descending=True, stable=True)[:, :masked_per_sample]
    return (first + torch.arange(batch, device=mask.device)[:, None] * length).flatten()
