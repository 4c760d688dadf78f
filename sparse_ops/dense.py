"""Dense masked emulation of sparse execution: exact, portable, and the reference for parity tests.

Features stay dense (B, C, H, W); masked sites are re-zeroed wherever positions mix (the JAX code the
paper was trained with does the same). Costs the full dense compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_ops.base import BlockLike, SparseBackend
from sparse_ops.functional import drop_path_scale, gelu_then_grn, grn_response


@dataclass
class MaskedDense:
    """Dense features with their visibility.

    Attributes:
        x: (B, C, H, W), exact zeros at masked sites.
        keep: (B, 1, H, W) in ``x``'s dtype, 1 at visible sites, 0 at masked ones.
    """

    x: Tensor
    keep: Tensor


class DenseMaskedBackend(SparseBackend):
    """The exact masked dense fallback; runs anywhere."""

    name = "dense"

    def sparsify(self, x: Tensor, mask: Tensor, visible_per_sample: int | None = None) -> MaskedDense:
        scale = (x.shape[-2] // mask.shape[-2], x.shape[-1] // mask.shape[-1])
        keep = (~mask)[:, None].to(x.dtype)
        keep = keep.repeat_interleave(scale[0], dim=2).repeat_interleave(scale[1], dim=3)
        return MaskedDense(x * keep, keep)

    def densify(self, feats: MaskedDense) -> Tensor:
        return feats.x

    def packed(self, feats: MaskedDense) -> tuple[Tensor, Tensor]:
        coords = feats.keep[:, 0].nonzero()
        values = feats.x.permute(0, 2, 3, 1)[coords[:, 0], coords[:, 1], coords[:, 2]]
        return values, coords

    def _act_grn(self, keep_bhw1: Tensor):
        dims = (1, 2) if self.grn_scope == "sample" else (0, 1, 2)

        def nx(y: Tensor) -> Tensor:
            gx = torch.linalg.vector_norm(y * keep_bhw1.to(y.dtype), ord=2, dim=dims, keepdim=True)
            return grn_response(gx)

        return gelu_then_grn(nx)

    def block(self, block: BlockLike, feats: MaskedDense) -> MaskedDense:
        keep_bhw1 = feats.keep.permute(0, 2, 3, 1)
        y = block.conv_dw(feats.x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = block.forward_pointwise(y, self._act_grn(keep_bhw1))
        y = (y * keep_bhw1.to(y.dtype)).permute(0, 3, 1, 2)
        scale = drop_path_scale(y.shape[0], block.drop_prob, block.training, y)
        if scale is not None:
            y = y * scale[:, None, None, None]
        return MaskedDense(feats.x + y, feats.keep)

    def downsample(self, layer: nn.Sequential, feats: MaskedDense) -> MaskedDense:
        norm, conv = layer[0], layer[1]
        keep = F.max_pool2d(feats.keep, kernel_size=2, stride=2)
        x = conv(norm(feats.x)) * keep.to(feats.x.dtype)
        return MaskedDense(x, keep)
