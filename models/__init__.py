"""ConvNeXt V2 models: ``create_model("convnextv2_<size>", ...)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models._registry import list_models, model_entrypoint
from models.checkpoint import load_pretrained
from models.convnextv2 import MODEL_SIZES, TOTAL_STRIDE, ConvNeXtV2, ConvNeXtV2Block

__all__ = ["MODEL_SIZES", "TOTAL_STRIDE", "ConvNeXtV2", "ConvNeXtV2Block", "create_model", "list_models"]


def create_model(
        name: str,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        pretrained: str | Path | None = None,
        **kwargs: Any,
) -> ConvNeXtV2:
    """Build a registered ConvNeXt V2 variant.

    Args:
        name: ``convnextv2_<size>`` with size in atto, femto, pico, nano, tiny, base, large, huge
            (or ``test``, a tiny size for tests).
        num_classes: classifier outputs (0: pooled features).
        drop_path_rate: stochastic depth rate.
        pretrained: weights file or directory of any supported layout (ours, official, timm,
            transformers), loaded strictly; a file without a classifier leaves the head fresh.
        **kwargs: passed to :class:`ConvNeXtV2` (``in_chans``, ``head_init_scale``, ...).
    """
    model = model_entrypoint(name)(num_classes=num_classes, drop_path_rate=drop_path_rate, **kwargs)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model
