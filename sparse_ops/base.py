"""The contract every sparse backend meets.

A backend runs the ConvNeXt V2 encoder on masked input. The model owns all parameters (timm names and
shapes); a backend only decides how the computation is laid out, so one state dict serves every
backend. The mask convention is the project's one: ``mask`` is a bool tensor, **True = masked
(removed)**, passed explicitly to :meth:`SparseBackend.sparsify` and carried inside the backend's
feature object afterwards, never in module state.

Semantics (each is tested against the ``dense`` backend):

1. Masked sites hold exact zeros wherever positions mix: before the 7x7 depthwise conv (which
   therefore reads visible neighbours only), before the GRN statistics, at the 2x2 downsample and at
   the output. Per-site ops (LayerNorm, Linear, GELU) cannot leak between sites.
2. GRN statistics have a named scope: ``"sample"`` (per sample over its visible sites, as the paper
   and its JAX code) or ``"batch"`` (over every visible site of the batch, reproducing the official
   MinkowskiEngine GRN, ConvNeXt-V2 issue #86).
3. Drop path is per sample and draws :func:`sparse_ops.functional.drop_path_scale`, so backends agree
   under a fixed seed.
4. The stem runs dense; masking happens on its output (after the stem LayerNorm).
5. Masks come on the patch grid (B, h, w) with patch = total stride 32, i.e. 8x8 sites at stem
   resolution, so every 2x2 downsample window is fully visible or fully masked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

from torch import Tensor, nn

GRN_SCOPES = ("sample", "batch")


class BlockLike(Protocol):
    """What a backend needs from a ConvNeXt V2 block (see ``models.convnextv2.ConvNeXtV2Block``)."""

    conv_dw: nn.Conv2d
    drop_prob: float
    training: bool

    def forward_pointwise(self, x: Tensor, act_grn: Any) -> Tensor: ...


class SparseBackend(ABC):
    """Runs stem output through downsamples and blocks on the visible sites of a patch mask.

    Args:
        grn_scope: ``"sample"`` or ``"batch"``, the reduction scope of GRN statistics.
    """

    name: str = "abstract"

    def __init__(self, grn_scope: str = "sample"):
        if grn_scope not in GRN_SCOPES:
            raise ValueError(f"grn_scope must be one of {GRN_SCOPES}, got {grn_scope!r}")
        self.grn_scope = grn_scope

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grn_scope={self.grn_scope!r})"

    @abstractmethod
    def sparsify(self, x: Tensor, mask: Tensor, visible_per_sample: int | None = None) -> Any:
        """Mask the stem output.

        Args:
            x: (B, C, H, W) dense stem output.
            mask: (B, h, w) bool, True = masked; H and W are multiples of h and w.
            visible_per_sample: the caller's promise that every sample keeps exactly this many
                patches (true of :func:`fcmae.random_mask`); lets a backend skip counting, which
                would wait for the GPU. None: nothing is promised.

        Returns:
            The backend's feature object for the visible sites.
        """

    @abstractmethod
    def densify(self, feats: Any) -> Tensor:
        """(B, C, H, W) dense features with exact zeros at masked sites."""

    @abstractmethod
    def packed(self, feats: Any) -> tuple[Tensor, Tensor]:
        """Visible features and their coordinates.

        Returns:
            ``values`` (N, C) and ``coords`` (N, 3) long as (batch, row, col), sorted by batch.
        """

    @abstractmethod
    def block(self, block: BlockLike, feats: Any) -> Any:
        """Apply one ConvNeXt V2 block (dwconv, LN, MLP with GRN, residual, drop path)."""

    @abstractmethod
    def downsample(self, layer: nn.Sequential, feats: Any) -> Any:
        """Apply LayerNorm then the 2x2 stride-2 conv of ``layer`` (``layer[0]``, ``layer[1]``)."""
