"""Small layers of ConvNeXt V2 with timm's parameter names and shapes.

GRN keeps 1-D ``weight``/``bias`` of shape (C,) (timm's layout) and reshapes at use, so weight-decay
grouping, export and the sparse backends see one canonical layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_ops.functional import LN_EPS, grn_response


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = LN_EPS):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """Global Response Normalisation on channels-last input, identity at initialisation."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def apply_response(self, x: Tensor, nx: Tensor) -> Tensor:
        """``x + weight * (x * nx) + bias`` where ``nx`` broadcasts against ``x`` (..., C).

        Evaluated as ``x * (1 + weight * nx) + bias``: the factor has the (small) shape of ``nx``, so
        the full-size tensor is touched by one fused multiply-add instead of three passes.
        """
        return torch.addcmul(self.bias.to(x.dtype), x, (1 + self.weight * nx).to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C), statistics per sample over all positions."""
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        return self.apply_response(x, grn_response(gx))


class GrnMlp(nn.Module):
    """``fc1 -> GELU -> GRN -> fc2`` on channels-last input (timm's ``GlobalResponseNormMlp`` names)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor, act_grn: Callable[[Tensor, GlobalResponseNorm], Tensor] | None = None) -> Tensor:
        """(..., C) -> (..., C).

        Args:
            x: channels-last features.
            act_grn: maps the ``fc1`` output (..., 4C) and this GRN module to GELU then GRN; sparse
                backends pass one whose statistics cover visible sites only (see
                ``sparse_ops.functional.gelu_then_grn``). None means ``act`` then the dense per-sample
                GRN over dims (1, 2) of a (B, H, W, 4C) input.
        """
        return self.fc2(self.hidden(x, act_grn))

    def hidden(self, x: Tensor, act_grn: Callable[[Tensor, GlobalResponseNorm], Tensor] | None = None) -> Tensor:
        """The GRN output that ``fc2`` reads: (..., C) -> (..., 4C); arguments as :meth:`forward`."""
        h = self.fc1(x)
        return self.grn(self.act(h)) if act_grn is None else act_grn(h, self.grn)
