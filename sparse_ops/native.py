"""Token-sparse execution: only visible sites are stored and computed.

Layout: visible sites are packed as ``values`` (N, C). Sites are ordered by sample, then by visible
patch (row-major on the patch grid), then in Morton (Z) order inside the patch. Morton order makes
every 2x2 downsample window four consecutive rows, so the stride-2 conv is a reshape to (N/4, 4C)
and one matmul, with no gather. When every sample keeps the same number of patches (always true for
FCMAE's random masks) the values are also viewed as (B, n, C) so per-sample GRN statistics are a
plain reduction.

The 7x7 depthwise conv reads visible neighbours only (:mod:`sparse_ops.sparse_dwconv`: a Triton
kernel on CUDA, scatter -> dense conv -> gather elsewhere, with a weight gradient over visible sites on
the CPU); everything else (LayerNorm, Linear, GELU, GRN, residual, drop path) touches the N visible rows
only. With per-sample GRN statistics and equal
counts, GELU + GRN run as fused Triton kernels on CUDA (:mod:`sparse_ops.gelu_grn`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_ops.base import BlockLike, SparseBackend
from sparse_ops.functional import batch_grn_nx, drop_path_scale, gelu_then_grn, segment_grn_nx
from sparse_ops.gelu_grn import gelu_grn
from sparse_ops.sparse_dwconv import neighbour_table, sparse_depthwise_conv, uses_neighbour_table

DWCONV_SIZE = 7  # the blocks' depthwise conv


def morton_offsets(side: int, device: torch.device | str | None = None) -> Tensor:
    """(row, col) offsets of a ``side`` x ``side`` square in Morton (Z) order (``side`` a power of 2).

    Consecutive groups of four are the 2x2 windows, ordered (0,0), (0,1), (1,0), (1,1); the groups
    themselves are in Morton order of the half-resolution square. Made on ``device`` by de-interleaving
    the bits of the Morton index: no host-to-device copy, so it traces into a compiled step.

    Returns:
        (side * side, 2) long.
    """
    index = torch.arange(side * side, device=device)
    rows, cols = torch.zeros_like(index), torch.zeros_like(index)
    for bit in range(side.bit_length() - 1):
        cols |= ((index >> (2 * bit)) & 1) << bit
        rows |= ((index >> (2 * bit + 1)) & 1) << bit
    return torch.stack((rows, cols), dim=1)


@dataclass
class PackedSites:
    """Visible sites of a batch at one resolution.

    Attributes:
        values: (N, C) features, N = P * side * side.
        patches: (P, 3) long (batch, patch row, patch col) of visible patches, sorted.
        side: sites per patch side at this resolution (8 at stem resolution, 1 at the last stage).
        shape: (B, H, W) of the dense grid at this resolution.
        flat_index: (N,) long index of every site into the flattened (B * H * W) grid.
        batch_index: (N,) long sample of every site.
        per_sample: sites per sample when all samples have the same number, else None.
        neighbours: (49, N) int32 row of every site's neighbour under each 7x7 tap (-1: none), where
            the depthwise conv reads it (the CUDA kernel; the CPU weight gradient), else None.
    """

    values: Tensor
    patches: Tensor
    side: int
    shape: tuple[int, int, int]
    flat_index: Tensor
    batch_index: Tensor
    per_sample: int | None
    neighbours: Tensor | None

    @property
    def batch_size(self) -> int:
        return self.shape[0]


def _site_indices(patches: Tensor, side: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Flat grid index and sample index of every site of the visible patches, in packing order."""
    offsets = morton_offsets(side, patches.device)  # (side*side, 2)
    b, py, px = patches[:, 0:1], patches[:, 1:2], patches[:, 2:3]
    rows = py * side + offsets[:, 0]  # (P, side*side)
    cols = px * side + offsets[:, 1]
    flat = (b * height + rows) * width + cols
    return flat.reshape(-1), b.expand_as(flat).reshape(-1)


def _site_tables(
    patches: Tensor, side: int, shape: tuple[int, int, int], values: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Flat index, sample index and (where the depthwise conv reads one) the neighbour table of every site."""
    flat, batch_index = _site_indices(patches, side, shape[1], shape[2])
    neighbours = neighbour_table(flat, shape, DWCONV_SIZE) if uses_neighbour_table(values) else None
    return flat, batch_index, neighbours


def _visible_patches(mask: Tensor, visible_per_sample: int | None) -> tuple[Tensor, int | None]:
    """(P, 3) sorted (batch, row, col) of visible patches, and the per-sample count if uniform.

    With a count hint this is a fixed-shape computation that compiles into the step's graph; without
    one it counts on the host (one sync, outside the graph).
    """
    if visible_per_sample is None:
        return _visible_patches_counted(mask)
    batch, _, width = mask.shape
    ids = torch.argsort(mask.flatten(1).to(torch.int32), dim=1, stable=True)[:, :visible_per_sample]  # ascending
    rows = torch.arange(batch, device=mask.device).repeat_interleave(visible_per_sample)
    ids = ids.reshape(-1)
    return torch.stack((rows, ids // width, ids % width), dim=1), visible_per_sample


@torch.compiler.disable
def _visible_patches_counted(mask: Tensor) -> tuple[Tensor, int | None]:
    """:func:`_visible_patches` without a hint: counts visible patches per sample on the host."""
    counts = (~mask.flatten(1)).sum(1)
    low, high = torch.stack((counts.min(), counts.max())).tolist()
    if low != high:
        return (~mask).nonzero(), None
    return _visible_patches(mask, low)


def _scatter_dense(feats: PackedSites, values: Tensor) -> Tensor:
    """Place (N, C) ``values`` in a zero (B, H, W, C) buffer."""
    b, h, w = feats.shape
    buffer = values.new_zeros(b * h * w, values.shape[-1])
    buffer.index_copy_(0, feats.flat_index, values)
    return buffer.view(b, h, w, -1)


class NativeSparseBackend(SparseBackend):
    """Token-sparse backend (PyTorch, plus a Triton depthwise kernel on CUDA); works on visible sites only."""

    name = "native"

    def sparsify(self, x: Tensor, mask: Tensor, visible_per_sample: int | None = None) -> PackedSites:
        batch, channels, height, width = x.shape
        side = height // mask.shape[-2]
        patches, patches_per_sample = _visible_patches(mask, visible_per_sample)
        per_sample = None if patches_per_sample is None else patches_per_sample * side * side
        flat, batch_index, neighbours = _site_tables(patches, side, (batch, height, width), x)
        values = x.permute(0, 2, 3, 1).reshape(-1, channels).index_select(0, flat)
        return PackedSites(values, patches, side, (batch, height, width), flat, batch_index, per_sample, neighbours)

    def densify(self, feats: PackedSites) -> Tensor:
        # contiguous NCHW: inductor cannot order strides of the permuted view when shapes are dynamic
        return _scatter_dense(feats, feats.values).permute(0, 3, 1, 2).contiguous()

    def packed(self, feats: PackedSites) -> tuple[Tensor, Tensor]:
        _, height, width = feats.shape
        flat = feats.flat_index
        coords = torch.stack((flat // (height * width), (flat // width) % height, flat % width), dim=1)
        return feats.values, coords

    def _depthwise(self, conv: nn.Conv2d, feats: PackedSites) -> Tensor:
        """7x7 depthwise conv reading visible neighbours only: (N, C) -> (N, C)."""
        values, flat, table = feats.values, feats.flat_index, feats.neighbours
        return sparse_depthwise_conv(values, flat, table, conv.weight, conv.bias, feats.shape)

    def _act_grn(self, feats: PackedSites):
        if self.grn_scope == "batch":
            return gelu_then_grn(batch_grn_nx)
        if feats.per_sample is not None:  # h is (B, n, 4C): fused kernels on CUDA
            return lambda h, grn: gelu_grn(h, grn.weight, grn.bias)
        return gelu_then_grn(segment_grn_nx(feats.batch_index, feats.batch_size))

    def block(self, block: BlockLike, feats: PackedSites) -> PackedSites:
        y = self._depthwise(block.conv_dw, feats)
        if feats.per_sample is not None:
            y = y.view(feats.batch_size, feats.per_sample, -1)
        y = block.forward_pointwise(y, self._act_grn(feats))
        scale = drop_path_scale(feats.batch_size, block.drop_prob, block.training, y)
        if scale is not None:
            y = y * (scale[:, None, None] if y.dim() == 3 else scale[feats.batch_index, None])
        return replace(feats, values=feats.values + y.reshape(feats.values.shape))

    def downsample(self, layer: nn.Sequential, feats: PackedSites) -> PackedSites:
        norm, conv = layer[0], layer[1]
        x = F.layer_norm(feats.values, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        # (N, Cin) -> (N/4, 4*Cin): rows of a 2x2 window are consecutive, in (dy, dx) order.
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)
        x = F.linear(x.reshape(-1, weight.shape[1]), weight, conv.bias)
        batch, height, width = feats.shape
        per_sample = feats.per_sample // 4 if feats.per_sample is not None else None
        shape = (batch, height // 2, width // 2)
        flat, batch_index, neighbours = _site_tables(feats.patches, feats.side // 2, shape, x)
        return PackedSites(x, feats.patches, feats.side // 2, shape, flat, batch_index, per_sample, neighbours)
