"""Layer-wise learning-rate decay for finetuning ConvNeXt V2, with the official layer-id assignment.

Official ConvNeXt V2 ``optim_factory.py`` (convnextv2.md §5c), restated on our parameter names
(``stem`` = official ``downsample_layers.0``, ``stages.d.downsample`` = ``downsample_layers.d``,
``stages.s.blocks.b`` = ``stages.s.b``); everything else (``head.norm``, ``head.fc``) is the top layer:

* ``single``: one id per block, ``num_layers = sum(depths)``; the stem gets 1, a stage's downsample
  the id of the stage's first block, block ``b`` of stage ``s`` gets ``sum(depths[:s]) + b + 1``.
* ``group``: 12 layers, written for depths (3, 3, 27, 3): stem 0, stage 0 1, stage 1 and its
  downsample 2, stage 2's downsample 3 and its blocks ``3 + b // 3``, stage 3 and its downsample 12.

A parameter of layer ``i`` trains at ``lr * decay ** (num_layers + 1 - i)``, so the head keeps the full lr.
Which parameters get weight decay is :mod:`fcmae.optim`'s rule (none on biases, norms and GRN), the same
set as the official finetuning rule.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

LayerDecayMode = Literal["single", "group"]
GROUP_NUM_LAYERS = 12

_DOWNSAMPLE = re.compile(r"stages\.([0-3])\.downsample\.")
_BLOCK = re.compile(r"stages\.([0-3])\.blocks\.(\d+)\.")


def num_layers(mode: LayerDecayMode, depths: Sequence[int]) -> int:
    """Layers below the head: ``sum(depths)`` for ``single``, 12 for ``group``."""
    return sum(depths) if mode == "single" else GROUP_NUM_LAYERS


def layer_id(name: str, depths: Sequence[int], mode: LayerDecayMode) -> int:
    """The official layer id of the encoder or head parameter ``name`` (our names, no ``encoder.``)."""
    if name.startswith("stem."):
        return 1 if mode == "single" else 0
    if m := _DOWNSAMPLE.match(name):
        stage = int(m.group(1))
        return sum(depths[:stage]) + 1 if mode == "single" else (stage + 1 if stage < 3 else GROUP_NUM_LAYERS)
    if m := _BLOCK.match(name):
        stage, block = int(m.group(1)), int(m.group(2))
        if mode == "single":
            return sum(depths[:stage]) + block + 1
        return (1, 2, 3 + block // 3, GROUP_NUM_LAYERS)[stage]
    return num_layers(mode, depths) + 1


def layer_scales(decay: float, layers: int) -> list[float]:
    """``lr_scale`` of layer ids 0 .. layers + 1: ``decay ** (layers + 1 - i)``."""
    return [decay ** (layers + 1 - i) for i in range(layers + 2)]


def lr_scale(name: str, depths: Sequence[int], mode: LayerDecayMode, decay: float) -> float:
    """The learning-rate multiplier of parameter ``name`` under layer decay ``decay``."""
    layers = num_layers(mode, depths)
    return layer_scales(decay, layers)[layer_id(name, depths, mode)]

