"""Reconstruction previews: original | masked input | reconstruction, one row per image.

The reconstruction undoes the per-patch normalisation of ``norm_pix_loss`` with each patch's own
mean and std (taken from the original, as the loss did), then pastes the visible patches back
from the original: what the model was asked to predict is exactly what differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from fcmae.loss import normalize_patches, patchify, unpatchify
from fcmae.model import FCMAE

_GAP = 2


@torch.no_grad()
def reconstruct(model: FCMAE, imgs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Masked input and reconstruction of normalised ``imgs`` (B, C, H, W) under ``mask`` (B, h, w).

    Returns:
        (masked, recon), both (B, C, H, W) in the input's normalisation: ``masked`` is 0 (the
        dataset mean) on masked patches; ``recon`` is the prediction there and the input elsewhere.
    """
    was_training = model.training
    model.eval()
    out = model(imgs, mask=mask)
    model.train(was_training)
    p = model.patch_size
    grid = (imgs.shape[-2] // p, imgs.shape[-1] // p)
    patches = patchify(imgs.float(), p)  # (B, L, p*p*C)
    pred = out.pred.float()  # (R, p*p*C), the masked patches in mask order
    if model.norm_pix_loss:
        _, mean, std = normalize_patches(patches)
        pred = pred * std[out.mask] + mean[out.mask]
    recon = patches.clone()
    recon[out.mask] = pred
    recon = unpatchify(recon, p, grid, imgs.shape[1])
    pixel_mask = out.mask.reshape(-1, 1, *grid).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
    masked = torch.where(pixel_mask, torch.zeros_like(recon), imgs.float())
    return masked, recon


def to_uint8(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo normalisation of (B, C, H, W) and map to uint8 (B, H, W, 3 or 1)."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x * std_t + mean_t).clamp(0, 1)
    x = x[:, :3] if x.shape[1] >= 3 else x
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def reconstruction_grid(model: FCMAE, imgs: Tensor, mask: Tensor, mean: Sequence[float],
                        std: Sequence[float]) -> Image.Image:
    """A PIL picture with one row per image: original | masked input | reconstruction."""
    masked, recon = reconstruct(model, imgs, mask)
    columns = [to_uint8(t, mean, std) for t in (imgs.float(), masked, recon)]
    b, h, w, c = columns[0].shape
    canvas = torch.full((b * (h + _GAP) - _GAP, 3 * (w + _GAP) - _GAP, c), 255, dtype=torch.uint8)
    for row in range(b):
        for col, tiles in enumerate(columns):
            top, left = row * (h + _GAP), col * (w + _GAP)
            canvas[top:top + h, left:left + w] = tiles[row]
    array = canvas.numpy()
    return Image.fromarray(array[..., 0] if c == 1 else array)


def save_preview(image: Image.Image, run_dir: Path, step: int) -> Path:
    """Write ``previews/step_<step>.png`` in the run directory and return its path."""
    path = run_dir / "previews" / f"step_{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
