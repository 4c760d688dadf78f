"""FCMAE pretraining for ConvNeXt V2: ``create_fcmae("convnextv2_<size>", ...)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fcmae.loss import normalize_patches, patch_mse, patchify, unpatchify
from fcmae.masking import as_grid_mask, masked_rows, num_visible, random_mask
from fcmae.model import FCMAE, FCMAEOutput
from models import create_model
from models.checkpoint import load_pretrained

__version__ = "0.1.0"

__all__ = [
    "FCMAE",
    "FCMAEOutput",
    "__version__",
    "as_grid_mask",
    "create_fcmae",
    "masked_rows",
    "normalize_patches",
    "num_visible",
    "patch_mse",
    "patchify",
    "random_mask",
    "unpatchify",
]


def create_fcmae(
        name: str,
        backend: str = "auto",
        mask_ratio: float = 0.6,
        decoder_depth: int = 1,
        decoder_embed_dim: int = 512,
        norm_pix_loss: bool = True,
        in_chans: int = 3,
        grn_scope: str = "sample",
        pretrained: str | Path | None = None,
        **encoder_kwargs: Any,
) -> FCMAE:
    """Build FCMAE around the encoder ``name`` (``convnextv2_<size>``).

    Args:
        name: encoder variant.
        backend: sparse backend, ``"auto"`` (fastest available), ``"native"``, ``"dense"`` or
            ``"minkowski"``.
        mask_ratio: fraction of 32x32 patches masked, in [0, 1).
        decoder_depth: decoder ConvNeXt V2 blocks.
        decoder_embed_dim: decoder width.
        norm_pix_loss: per-patch normalised pixel targets.
        in_chans: image channels.
        grn_scope: ``"sample"`` (paper, JAX) or ``"batch"`` (official MinkowskiEngine GRN).
        pretrained: weights to load strictly, of any supported layout: a full FCMAE checkpoint, or an
            encoder (e.g. a released ``*_fcmae.pt``; the decoder then stays freshly initialised).
        **encoder_kwargs: passed to the encoder (e.g. ``drop_path_rate``).
    """
    encoder = create_model(
        name, in_chans=in_chans, with_head=False, sparse_backend=backend, grn_scope=grn_scope, **encoder_kwargs
    )
    model = FCMAE(encoder, mask_ratio, decoder_depth, decoder_embed_dim, norm_pix_loss)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model
