"""ConvNeXt V2 (Woo et al., "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders",
arXiv 2301.00808), with timm's parameter names so checkpoints move to timm with few renames.

One model definition serves dense finetuning and masked (sparse) pretraining: ``forward_features``
runs dense, ``forward_masked`` runs the same parameters through the sparse backend chosen at
construction. No code was copied from the official repository; its weights are CC-BY-NC 4.0.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from models._registry import register_model
from models.layers import LN_EPS, GrnMlp, LayerNorm2d
from sparse_ops import SparseBackend, get_backend
from sparse_ops.functional import drop_path_scale

TOTAL_STRIDE = 32


class ConvNeXtV2Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear 4x -> GELU -> GRN -> Linear, plus residual with drop path."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = GrnMlp(dim, 4 * dim)
        self.drop_prob = drop_path

    def forward_pointwise(self, x: Tensor, act_grn: Any = None) -> Tensor:
        """Everything after the depthwise conv but the residual: (..., C) -> (..., C)."""
        return self.mlp(self.norm(x), act_grn)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        y = self.forward_pointwise(self.conv_dw(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        scale = drop_path_scale(x.shape[0], self.drop_prob, self.training, y)
        if scale is not None:
            y = y * scale[:, None, None, None]
        return x + y

    def forward_rows(self, x: Tensor, rows: Tensor) -> Tensor:
        """The block's output at some positions: (B, C, H, W) and (R,) flat indices into B*H*W -> (R, C).

        Positions mix only before ``fc2`` (the depthwise conv and the GRN statistics, which still cover
        every position), so ``fc2``, drop path and the residual run at ``rows`` alone; the result equals
        ``forward(x)`` read at ``rows``.
        """
        height, width = x.shape[-2:]
        hidden = self.mlp.hidden(self.norm(self.conv_dw(x).permute(0, 2, 3, 1)))  # (B, H, W, 4C)
        y = self.mlp.fc2(hidden.flatten(0, 2)[rows])
        scale = drop_path_scale(x.shape[0], self.drop_prob, self.training, y)
        if scale is not None:
            y = y * scale[rows // (height * width), None]
        return x.permute(0, 2, 3, 1).flatten(0, 2)[rows] + y

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ConvNeXtV2Stage(nn.Module):
    """Optional downsample (LayerNorm + 2x2 stride-2 conv) followed by blocks."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, drop_path_rates: list[float], downsample: bool):
        super().__init__()
        if not downsample:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)
            )
        self.blocks = nn.Sequential(*[ConvNeXtV2Block(out_dim, dp) for dp in drop_path_rates[:depth]])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    """Global average pool -> LayerNorm -> Linear (Identity when ``num_classes == 0``)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, C, h, w) -> (B, num_classes), or pooled (B, C) features with ``pre_logits``."""
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)


def check_input_size(height: int, width: int) -> None:
    """ValueError unless both sides are positive multiples of the total stride (32)."""
    if height <= 0 or width <= 0 or height % TOTAL_STRIDE or width % TOTAL_STRIDE:
        raise ValueError(f"image size {height}x{width} must be a positive multiple of {TOTAL_STRIDE} on both sides")


class ConvNeXtV2(nn.Module):
    """ConvNeXt V2 backbone and classifier.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs; 0 keeps the pooled, normed features.
        depths: blocks per stage (4 stages).
        dims: channels per stage.
        drop_path_rate: stochastic depth rate, linear over blocks from 0.
        head_init_scale: multiplies the initial classifier weight and bias.
        with_head: False builds the bare encoder (no final norm, no classifier), as FCMAE uses.
        sparse_backend: backend name or instance for :meth:`forward_masked`; None for dense only.
        grn_scope: GRN statistics scope of the sparse backend, ``"sample"`` or ``"batch"``.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            depths: tuple[int, ...] = (3, 3, 9, 3),
            dims: tuple[int, ...] = (96, 192, 384, 768),
            drop_path_rate: float = 0.0,
            head_init_scale: float = 1.0,
            with_head: bool = True,
            sparse_backend: str | SparseBackend | None = None,
            grn_scope: str = "sample",
    ):
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt V2 has 4 stages; got depths={depths}, dims={dims}")
        self.in_chans = in_chans
        self.num_classes = num_classes if with_head else 0
        self.dims = tuple(dims)
        self.depths = tuple(depths)
        self.num_features = dims[-1]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        starts = [sum(depths[:i]) for i in range(4)]
        self.stages = nn.Sequential(*[
            ConvNeXtV2Stage(dims[max(i - 1, 0)], dims[i], depths[i], rates[starts[i]:], downsample=i > 0)
            for i in range(4)
        ])
        self.feature_info = [
            dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}") for i in range(4)
        ]
        self.head = ClassifierHead(dims[-1], num_classes) if with_head else None
        self.sparse_backend = None if sparse_backend is None else get_backend(sparse_backend, grn_scope)
        self.apply(_init_weights)
        if self.head is not None and isinstance(self.head.fc, nn.Linear):
            self.head.fc.weight.data.mul_(head_init_scale)
            self.head.fc.bias.data.mul_(head_init_scale)

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """Per-stage feature maps for dense tasks.

        Args:
            x: (B, in_chans, H, W), H and W multiples of 32.

        Returns:
            Four maps (B, dims[i], H / 2^(i+2), W / 2^(i+2)).
        """
        check_input_size(*x.shape[-2:])
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, dims[-1], H/32, W/32)."""
        return self.forward_intermediates(x)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.head is None:
            raise RuntimeError("this ConvNeXtV2 was built with_head=False; use forward_features")
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, num_classes) logits (pooled features when there is no head)."""
        x = self.forward_features(x)
        if self.head is None:
            return x.mean(dim=(2, 3))
        return self.forward_head(x)

    def forward_masked(self, x: Tensor, mask: Tensor, visible_per_sample: int | None = None) -> Any:
        """Encode the visible patches through the sparse backend.

        Args:
            x: (B, in_chans, H, W), H and W multiples of 32.
            mask: (B, H/32, W/32) bool, True = masked.
            visible_per_sample: optional promise that every sample keeps exactly this many patches
                (see ``SparseBackend.sparsify``).

        Returns:
            The backend's feature object at stride 32; ``self.sparse_backend.densify`` gives a
            (B, dims[-1], H/32, W/32) map with zeros at masked sites, ``.packed`` the visible rows.
        """
        if self.sparse_backend is None:
            raise RuntimeError("forward_masked needs a model built with sparse_backend=...")
        check_input_size(*x.shape[-2:])
        expected = (x.shape[0], x.shape[-2] // TOTAL_STRIDE, x.shape[-1] // TOTAL_STRIDE)
        if tuple(mask.shape) != expected or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool of shape {expected}, got {mask.dtype} {tuple(mask.shape)}")
        feats = self.sparse_backend.sparsify(self.stem(x), mask, visible_per_sample)
        for i, stage in enumerate(self.stages):
            if i > 0:
                feats = self.sparse_backend.downsample(stage.downsample, feats)
            for block in stage.blocks:
                feats = self.sparse_backend.block(block, feats)
        return feats


def _init_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02) for conv and linear weights, zero biases; norms and GRN keep theirs."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


MODEL_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "test": ((1, 1, 1, 1), (8, 16, 24, 32)),
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def _create(size: str, **kwargs: Any) -> ConvNeXtV2:
    depths, dims = MODEL_SIZES[size]
    return ConvNeXtV2(depths=depths, dims=dims, **kwargs)


@register_model
def convnextv2_test(**kwargs: Any) -> ConvNeXtV2:
    """Tiny variant for fast tests (not a paper size)."""
    return _create("test", **kwargs)


@register_model
def convnextv2_atto(**kwargs: Any) -> ConvNeXtV2:
    return _create("atto", **kwargs)


@register_model
def convnextv2_femto(**kwargs: Any) -> ConvNeXtV2:
    return _create("femto", **kwargs)


@register_model
def convnextv2_pico(**kwargs: Any) -> ConvNeXtV2:
    return _create("pico", **kwargs)


@register_model
def convnextv2_nano(**kwargs: Any) -> ConvNeXtV2:
    return _create("nano", **kwargs)


@register_model
def convnextv2_tiny(**kwargs: Any) -> ConvNeXtV2:
    return _create("tiny", **kwargs)


@register_model
def convnextv2_base(**kwargs: Any) -> ConvNeXtV2:
    return _create("base", **kwargs)


@register_model
def convnextv2_large(**kwargs: Any) -> ConvNeXtV2:
    return _create("large", **kwargs)


@register_model
def convnextv2_huge(**kwargs: Any) -> ConvNeXtV2:
    return _create("huge", **kwargs)
