"""FCMAE: fully convolutional masked autoencoder for ConvNeXt V2 (Woo et al., arXiv 2301.00808).

The encoder sees only visible patches through its sparse backend; a light dense decoder fills masked
positions with a learned token and predicts their pixels; the loss covers masked patches only, so the
decoder's per-position tail (its last ``fc2``, the 512 -> p*p*C prediction) runs at masked patches only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from fcmae.loss import normalize_patches, patch_mse, patchify
from fcmae.masking import as_grid_mask, masked_rows, num_visible, random_mask
from models import TOTAL_STRIDE, ConvNeXtV2, ConvNeXtV2Block
from models.convnextv2 import check_input_size


class FCMAEOutput(NamedTuple):
    """``loss`` scalar; ``pred`` (R, p*p*C), the R masked patches in ``mask`` order; ``mask`` (B, L) bool.

    ``mask`` is True = masked. Row i of ``pred`` is the i-th True entry of ``mask`` (row-major), so
    ``full[mask] = pred`` places the predictions in a (B, L, p*p*C) tensor.
    """

    loss: Tensor
    pred: Tensor
    mask: Tensor


class FCMAE(nn.Module):
    """Masked autoencoder around a ConvNeXt V2 encoder built with a sparse backend.

    Args:
        encoder: ``ConvNeXtV2(with_head=False, sparse_backend=...)``.
        mask_ratio: fraction of patches masked per sample, in [0, 1).
        decoder_depth: dense ConvNeXt V2 blocks in the decoder (0 allowed).
        decoder_embed_dim: decoder width.
        norm_pix_loss: normalise each target patch (mean, unbiased variance, eps 1e-6).
        patch_size: mask patch size; must equal the encoder's total stride (32).
    """

    def __init__(
            self,
            encoder: ConvNeXtV2,
            mask_ratio: float = 0.6,
            decoder_depth: int = 1,
            decoder_embed_dim: int = 512,
            norm_pix_loss: bool = True,
            patch_size: int = TOTAL_STRIDE,
    ):
        super().__init__()
        if patch_size != TOTAL_STRIDE:
            raise ValueError(f"patch_size must equal the encoder's total stride {TOTAL_STRIDE}, got {patch_size}")
        if encoder.sparse_backend is None or encoder.head is not None:
            raise ValueError("the FCMAE encoder must be built with with_head=False and a sparse_backend")
        if decoder_depth < 0 or decoder_embed_dim < 1:
            raise ValueError(f"bad decoder: depth {decoder_depth}, width {decoder_embed_dim}")
        num_visible(1024, mask_ratio)  # validates the ratio early
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = encoder.in_chans
        self.proj = nn.Conv2d(encoder.num_features, decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*[ConvNeXtV2Block(decoder_embed_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_embed_dim, patch_size * patch_size * self.in_chans, kernel_size=1)
        for module in (self.proj, self.decoder, self.pred):
            module.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def sparse_backend(self):
        return self.encoder.sparse_backend

    def grid(self, imgs: Tensor) -> tuple[int, int]:
        """(h, w) patch grid of (B, C, H, W) images, after checking the size."""
        check_input_size(*imgs.shape[-2:])
        return imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size

    def random_mask(self, imgs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, h, w) bool random mask for ``imgs`` at ``self.mask_ratio``, True = masked."""
        return random_mask(imgs.shape[0], self.grid(imgs), self.mask_ratio, generator=generator, device=imgs.device)

    def encode(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """Dense encoder output for custom experiments.

        Args:
            imgs: (B, C, H, W).
            mask: (B, h, w) or (B, L), True = masked.

        Returns:
            (B, C_last, h, w) with exact zeros at masked sites.
        """
        mask = as_grid_mask(mask, imgs.shape[0], self.grid(imgs))
        return self.sparse_backend.densify(self.encoder.forward_masked(imgs, mask))

    def encode_packed(self, imgs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Visible encoder features: ``values`` (N, C_last) and ``coords`` (N, 3) as (batch, row, col)."""
        mask = as_grid_mask(mask, imgs.shape[0], self.grid(imgs))
        return self.sparse_backend.packed(self.encoder.forward_masked(imgs, mask))

    def forward_decoder(self, latent: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
        """Predictions of some patches.

        Args:
            latent: (B, C_last, h, w) encoder output.
            mask: (B, h, w) bool, True = masked (those positions get the mask token).
            rows: (R,) flat indices into B*h*w of the patches to predict; every position still feeds
                the decoder's depthwise convs and GRN statistics.

        Returns:
            (R, p*p*C).
        """
        # The 1x1 convs run as matmuls on channels-last rows (much faster than 1x1 convs on CPU).
        x = F.linear(latent.permute(0, 2, 3, 1), self.proj.weight.flatten(1), self.proj.bias)
        m = mask[..., None].to(x.dtype)
        x = x * (1 - m) + self.mask_token.view(1, 1, 1, -1).to(x.dtype) * m
        if len(self.decoder) == 0:
            x = x.flatten(0, 2)[rows]
        else:  # contiguous: inductor cannot order the strides of the permuted view under dynamic shapes
            x = self.decoder[:-1](x.permute(0, 3, 1, 2).contiguous())
            x = self.decoder[-1].forward_rows(x, rows)  # (R, E)
        return F.linear(x, self.pred.weight.flatten(1), self.pred.bias)

    def forward_loss(self, imgs: Tensor, pred: Tensor, rows: Tensor) -> Tensor:
        """MSE of (R, D) ``pred`` against the patches ``rows`` (flat indices into B*L) of (B, C, H, W) ``imgs``."""
        target = patchify(imgs, self.patch_size).flatten(0, 1)[rows]
        if self.norm_pix_loss and len(rows):  # nothing masked: no patch to normalise (var would warn)
            target, _, _ = normalize_patches(target.float())
        return patch_mse(pred, target)

    def forward(
            self, imgs: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> FCMAEOutput:
        """Mask, encode, decode, score.

        Args:
            imgs: (B, C, H, W), H and W multiples of 32.
            mask: optional (B, h, w) or (B, L) mask, True = masked; drawn at random when None.
            generator: for the random mask.
        """
        grid = self.grid(imgs)
        num_patches = grid[0] * grid[1]
        if mask is None:
            mask = self.random_mask(imgs, generator)
            visible = num_visible(num_patches, self.mask_ratio)
        else:
            mask, visible = as_grid_mask(mask, imgs.shape[0], grid), None
        latent = self.sparse_backend.densify(self.encoder.forward_masked(imgs, mask, visible))
        flat_mask = mask.flatten(1)
        rows = masked_rows(flat_mask, None if visible is None else num_patches - visible)
        pred = self.forward_decoder(latent, mask, rows)
        return FCMAEOutput(self.forward_loss(imgs, pred, rows), pred, flat_mask)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
