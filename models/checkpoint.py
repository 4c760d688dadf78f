"""Loading weights of any supported layout strictly into our models.

A file and a model each consist of parts (see :func:`models.formats.part_of`): ``encoder``, ``norm``,
``classifier`` and ``decoder``. The encoder must be in the file and match exactly. Every other part the
model has is loaded when the file has it (and then must match exactly), or keeps its fresh
initialisation when the file has none, which is how a released encoder gets a fresh FCMAE decoder or a
fresh classifier. Parts of the file the model has no place for are left out and reported. Any key no
layout rule accounts for, any missing key inside a part and any tensor of the wrong shape is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from torch import Tensor, nn

from models.checkpoint_io import CheckpointError, UnsafeCheckpointError, read_state_dict
from models.convnextv2 import MODEL_SIZES
from models.formats import (
    LayoutError,
    describe_key_problems,
    detect_layout,
    from_canonical,
    part_of,
    to_canonical,
)

__all__ = [
    "CheckpointError",
    "LoadReport",
    "UnsafeCheckpointError",
    "EncoderSpec",
    "encoder_spec",
    "load_pretrained",
    "read_canonical",
    "read_state_dict",
    "split_parts",
]

logger = logging.getLogger(__name__)
PARTS = ("encoder", "norm", "classifier", "decoder")


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did: the file's layout and which parts went where."""

    source: str
    layout: str
    loaded: tuple[str, ...]
    fresh: tuple[str, ...]
    left_out: tuple[str, ...]

    def __str__(self) -> str:
        text = f"loaded {', '.join(self.loaded)} from {self.source} ({self.layout} layout)"
        if self.fresh:
            text += f"; freshly initialised: {', '.join(self.fresh)}"
        if self.left_out:
            text += f"; left out of the file: {', '.join(self.left_out)}"
        return text


def read_canonical(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """A weights file of any supported layout as our canonical state dict, and the layout's name."""
    raw = read_state_dict(path)
    try:
        layout = detect_layout(raw)
    except LayoutError as err:
        raise CheckpointError(f"{path}: {err}") from None
    try:
        return to_canonical(raw, layout), layout.name
    except LayoutError as err:
        message = f"{path} looks like the {layout.name} layout ({layout.description}), but:\n{err}"
        raise CheckpointError(message) from None


def split_parts(canonical: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{part: {key: tensor}}`` of a canonical state dict, parts in :data:`PARTS` order."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in canonical.items():
        parts.setdefault(part_of(key), {})[key] = tensor
    return {p: parts[p] for p in PARTS if p in parts}


class EncoderSpec(NamedTuple):
    """Architecture of an encoder as read from its weights; ``size`` is None for unregistered shapes."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    in_chans: int
    size: str | None

    def __str__(self) -> str:
        name = f"convnextv2_{self.size}" if self.size else "no registered size"
        return f"depths {self.depths}, dims {self.dims}, in_chans {self.in_chans} ({name})"


def encoder_spec(encoder: dict[str, Tensor]) -> EncoderSpec:
    """The :class:`EncoderSpec` of the encoder part of a canonical state dict."""
    depths = tuple(len({k.split(".")[3] for k in encoder if k.startswith(f"stages.{s}.blocks.")}) for s in range(4))
    dims = tuple(encoder[f"stages.{s}.blocks.0.conv_dw.weight"].shape[0] if depths[s] else 0 for s in range(4))
    in_chans = encoder["stem.0.weight"].shape[1] if "stem.0.weight" in encoder else 0
    sizes = [name for name, size in MODEL_SIZES.items() if size == (depths, dims)]
    return EncoderSpec(depths, dims, in_chans, sizes[0] if sizes else None)


def _compare(part: str, file: dict[str, Tensor], own: dict[str, Tensor]) -> str | None:
    """None when ``file`` fits ``own`` key for key and shape for shape, else a description of the misfit."""
    misshaped = [
        f"{k}: file {tuple(file[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(file) & set(own)) if file[k].shape != own[k].shape
    ]
    problems = describe_key_problems(
        missing=sorted(set(own) - set(file)), unexpected=sorted(set(file) - set(own)), misshaped=misshaped
    )
    if not problems:
        return None
    if part == "encoder":
        return f"encoder: the file holds {encoder_spec(file)}, the model is {encoder_spec(own)}\n{problems}"
    return f"{part}:\n{problems}"


def load_pretrained(model: nn.Module, path: str | Path, fresh: Collection[str] = ()) -> LoadReport:
    """Load a weights file of any supported layout into ``model`` (a ConvNeXtV2 or an FCMAE).

    Args:
        model: the model to fill; its parts missing from the file keep their current values.
        path: weights file or directory (see :func:`models.checkpoint_io.read_state_dict`).
        fresh: parts to keep as they are even when the file has them (e.g. ``("classifier",)`` to put a
            new head on a finetuned classifier).

    Raises:
        CheckpointError: unreadable file, unknown layout, or a part that does not fit (the message names
            missing, unexpected and mis-shaped keys, and the encoder sizes of file and model).
        UnsafeCheckpointError: a pickle that holds objects which could run code.
    """
    unknown = set(fresh) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; parts are {PARTS}")
    canonical, file_layout = read_canonical(path)
    file_parts = split_parts(canonical)
    layout = detect_layout(model.state_dict())
    own_parts = split_parts(to_canonical(model.state_dict(), layout))
    if "encoder" not in file_parts:
        raise CheckpointError(f"{path} holds no encoder weights")
    loaded = [p for p in own_parts if p in file_parts and p not in fresh]
    misfits = [m for p in loaded if (m := _compare(p, file_parts[p], own_parts[p]))]
    if misfits:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}:\n" + "\n".join(misfits))
    merged = {k: v for p in own_parts for k, v in (file_parts if p in loaded else own_parts)[p].items()}
    model.load_state_dict(from_canonical(merged, layout), strict=True)
    report = LoadReport(
        source=str(path),
        layout=file_layout,
        loaded=tuple(loaded),
        fresh=tuple(p for p in own_parts if p not in loaded),
        left_out=tuple(p for p in file_parts if p not in loaded),
    )
    logger.info("%s", report)
    return report
