"""MinkowskiEngine backend: the masked encoder on ``MinkowskiEngine.SparseTensor``, as the official code.

Optional and slower than ``native``; chosen only by name. The 7x7 depthwise conv is a submanifold conv
(``MinkowskiDepthwiseConvolution`` where the installed MinkowskiEngine has it and the features are on
CUDA, else the released ``MinkowskiChannelwiseConvolution``; same ``(k*k, C)`` kernel layout); the 2x2
stride-2 downsample is a strided ``MinkowskiConvolution``. LayerNorm, Linear, GELU, GRN, the residual and
drop path act on the feature matrix.

The parameters stay the model's (timm layout): each forward converts them with :mod:`sparse_ops.me_layout`
and runs MinkowskiEngine's layers through :func:`torch.func.functional_call`, so gradients reach the
model's own tensors and one state dict serves every backend.
"""

from __future__ import annotations

import collections
import collections.abc
import functools
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from sparse_ops.base import BlockLike, SparseBackend
from sparse_ops.functional import batch_grn_nx, drop_path_scale, gelu_then_grn, segment_grn_nx
from sparse_ops.me_layout import conv_weight_to_me, depthwise_weight_to_me

DIMENSION = 2


@functools.cache
def import_minkowski() -> ModuleType:
    """Import MinkowskiEngine (0.5.4 does ``from collections import Sequence``, gone since Python 3.10).

    The alias is added to :mod:`collections` only for the import and removed afterwards; installed files
    are never edited.
    """
    added = not hasattr(collections, "Sequence")
    if added:
        collections.Sequence = collections.abc.Sequence
    try:
        with warnings.catch_warnings():  # a CPU build says so at every import; that is expected here
            warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY")
            import MinkowskiEngine
    finally:
        if added:
            del collections.Sequence
    return MinkowskiEngine


@functools.cache
def _depthwise_layer(channels: int, kernel_size: int, cuda: bool) -> nn.Module:
    """A parameter-free shell of MinkowskiEngine's depthwise conv, run with the model's weights."""
    me = import_minkowski()
    layer_cls = getattr(me, "MinkowskiDepthwiseConvolution", None) if cuda else None  # its CPU path raises
    layer_cls = layer_cls or me.MinkowskiChannelwiseConvolution
    return layer_cls(channels, kernel_size=kernel_size, bias=True, dimension=DIMENSION)


@functools.cache
def _strided_layer(in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    me = import_minkowski()
    with warnings.catch_warnings():  # 0.5.4 instantiates its autograd Function, which torch deprecates
        warnings.filterwarnings("ignore", message=".*should not be instantiated", category=DeprecationWarning)
        return me.MinkowskiConvolution(in_channels, out_channels, kernel_size=kernel_size, stride=kernel_size,
                                       bias=True, dimension=DIMENSION)


@dataclass
class MinkowskiSites:
    """Visible sites of a batch as a MinkowskiEngine sparse tensor.

    Attributes:
        tensor: ``MinkowskiEngine.SparseTensor`` with coordinates (batch, row, col) in stem-resolution
            units (multiples of its tensor stride) and features (N, C).
        shape: (B, H, W) of the dense grid at this resolution.
    """

    tensor: Any
    shape: tuple[int, int, int]

    @property
    def batch_index(self) -> Tensor:
        """(N,) long sample of every row of the features."""
        return self.tensor.C[:, 0].long()

    def with_features(self, features: Tensor) -> MinkowskiSites:
        """Same coordinates, new (N, C) features."""
        me = import_minkowski()
        tensor = me.SparseTensor(features, coordinate_map_key=self.tensor.coordinate_map_key,
                                 coordinate_manager=self.tensor.coordinate_manager)
        return MinkowskiSites(tensor, self.shape)


class MinkowskiBackend(SparseBackend):
    """Sparse convolutions from MinkowskiEngine 0.5.4 (``python scripts/install_minkowski.py``)."""

    name = "minkowski"

    def __init__(self, grn_scope: str = "sample"):
        super().__init__(grn_scope)
        import_minkowski()  # fail at construction, not at the first forward

    def sparsify(self, x: Tensor, mask: Tensor, visible_per_sample: int | None = None) -> MinkowskiSites:
        batch, _, height, width = x.shape
        keep = (~mask).repeat_interleave(height // mask.shape[-2], dim=1)
        keep = keep.repeat_interleave(width // mask.shape[-1], dim=2)
        coords = keep.nonzero()  # (N, 3) as (batch, row, col)
        features = x.permute(0, 2, 3, 1)[coords[:, 0], coords[:, 1], coords[:, 2]]
        tensor = import_minkowski().SparseTensor(features.contiguous(), coordinates=coords.int().contiguous())
        return MinkowskiSites(tensor, (batch, height, width))

    def densify(self, feats: MinkowskiSites) -> Tensor:
        # An explicit shape: the official code infers it from the coordinates present (issue #79).
        batch, height, width = feats.shape
        shape = torch.Size((batch, feats.tensor.F.shape[1], height, width))
        return feats.tensor.dense(shape=shape)[0]

    def packed(self, feats: MinkowskiSites) -> tuple[Tensor, Tensor]:
        stride = torch.tensor(feats.tensor.tensor_stride, device=feats.tensor.C.device)
        coords = feats.tensor.C.long()
        coords = torch.cat((coords[:, :1], coords[:, 1:] // stride), dim=1)
        _, height, width = feats.shape
        order = torch.argsort((coords[:, 0] * height + coords[:, 1]) * width + coords[:, 2])
        return feats.tensor.F[order], coords[order]

    def _depthwise(self, conv: nn.Conv2d, feats: MinkowskiSites) -> Tensor:
        """Submanifold 7x7 depthwise conv: (N, C) features at the same coordinates."""
        kernel = depthwise_weight_to_me(conv.weight)
        layer = _depthwise_layer(conv.in_channels, conv.kernel_size[0], kernel.is_cuda)
        params = {"kernel": kernel, "bias": conv.bias[None]}
        return functional_call(layer, params, (self._as_dtype(feats, kernel.dtype),)).F

    def _act_grn(self, feats: MinkowskiSites):
        if self.grn_scope == "batch":
            return gelu_then_grn(batch_grn_nx)
        return gelu_then_grn(segment_grn_nx(feats.batch_index, feats.shape[0]))

    @staticmethod
    def _as_dtype(feats: MinkowskiSites, dtype: torch.dtype) -> Any:
        """The sparse tensor with features in ``dtype`` (MinkowskiEngine has no low-precision kernels)."""
        return feats.tensor if feats.tensor.F.dtype == dtype else feats.with_features(feats.tensor.F.to(dtype)).tensor

    def block(self, block: BlockLike, feats: MinkowskiSites) -> MinkowskiSites:
        y = block.forward_pointwise(self._depthwise(block.conv_dw, feats), self._act_grn(feats))
        scale = drop_path_scale(feats.shape[0], block.drop_prob, block.training, y)
        if scale is not None:
            y = y * scale[feats.batch_index, None]
        return feats.with_features(feats.tensor.F + y)

    def downsample(self, layer: nn.Sequential, feats: MinkowskiSites) -> MinkowskiSites:
        norm, conv = layer[0], layer[1]
        x = F.layer_norm(feats.tensor.F, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        kernel = conv_weight_to_me(conv.weight)
        me_layer = _strided_layer(conv.in_channels, conv.out_channels, conv.kernel_size[0])
        params = {"kernel": kernel, "bias": conv.bias[None]}
        out = functional_call(me_layer, params, (feats.with_features(x.to(kernel.dtype)).tensor,))
        batch, height, width = feats.shape
        stride = conv.stride[0]
        return MinkowskiSites(out, (batch, height // stride, width // stride))
