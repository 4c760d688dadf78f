"""Exporting an encoder or classifier to the official, timm and transformers layouts.

Any checkpoint :func:`models.checkpoint.read_canonical` reads can be exported; an FCMAE decoder is left
out. timm and transformers models always have the final LayerNorm after pooling, which FCMAE encoders
lack: it is exported identity-initialised (weight 1, bias 0, as timm loads its ``.fcmae`` weights), so
pooled features are the LayerNorm-standardised mean of the encoder output. The official export keeps the
released ``*_fcmae.pt`` shape (no final norm) in that case.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from models.checkpoint import encoder_spec, read_canonical, split_parts
from models.formats import from_canonical

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("official", "timm", "hf")
# timm builds these sizes with conv_mlp=True: 1x1 conv MLP weights (out, in, 1, 1).
TIMM_CONV_MLP_SIZES = ("atto", "femto", "pico", "nano")


def _weights(canonical: dict[str, Tensor], with_norm: bool) -> dict[str, Tensor]:
    """Encoder, norm and classifier parts of ``canonical``; an identity norm added if ``with_norm``."""
    parts = split_parts(canonical)
    if "encoder" not in parts:
        raise ValueError("the checkpoint holds no encoder")
    if with_norm and "norm" not in parts:
        width = encoder_spec(parts["encoder"]).dims[-1]
        parts["norm"] = {"head.norm.weight": torch.ones(width), "head.norm.bias": torch.zeros(width)}
    return {k: v for p in ("encoder", "norm", "classifier") for k, v in parts.get(p, {}).items()}


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def to_official(canonical: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{"model": state_dict}`` in the official dense layout (GRN (1, 1, 1, C), ``norm``/``head``)."""
    return {"model": _contiguous(from_canonical(_weights(canonical, with_norm=False), "official"))}


def to_timm(canonical: dict[str, Tensor], conv_mlp: bool | None = None) -> dict[str, Tensor]:
    """timm's ``convnextv2_*`` state dict; ``conv_mlp`` None follows timm (True for atto..nano)."""
    if conv_mlp is None:
        conv_mlp = encoder_spec(split_parts(canonical)["encoder"]).size in TIMM_CONV_MLP_SIZES
    layout = "timm_conv_mlp" if conv_mlp else "ours"
    return _contiguous(from_canonical(_weights(canonical, with_norm=True), layout))


def hf_config(canonical: dict[str, Tensor]) -> dict:
    """transformers ``ConvNextV2Config`` fields for ``canonical`` (final LayerNorm eps 1e-6, as ours)."""
    spec = encoder_spec(split_parts(canonical)["encoder"])
    config = {
        "model_type": "convnextv2", "architectures": ["ConvNextV2Model"], "num_channels": spec.in_chans,
        "patch_size": 4, "num_stages": 4, "hidden_sizes": list(spec.dims), "depths": list(spec.depths),
        "hidden_act": "gelu", "initializer_range": 0.02, "layer_norm_eps": 1e-6, "drop_path_rate": 0.0,
        "image_size": 224,
    }
    if "head.fc.weight" in canonical:
        classes = canonical["head.fc.weight"].shape[0]
        config["architectures"] = ["ConvNextV2ForImageClassification"]
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(classes)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(classes)}
    return config


def to_hf(canonical: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers state dict: ConvNextV2ForImageClassification keys with a classifier, else ConvNextV2Model."""
    weights = _weights(canonical, with_norm=True)
    return _contiguous(from_canonical(weights, "hf" if "head.fc.weight" in weights else "hf_base"))


def export_weights(checkpoint: str | Path, fmt: str, output: str | Path, conv_mlp: bool | None = None) -> Path:
    """Convert ``checkpoint`` (any layout we read) to ``fmt`` and write it.

    Args:
        checkpoint: weights file or directory.
        fmt: ``"official"`` (a torch file ``{"model": state_dict}``), ``"timm"`` (a directory with
            ``model.safetensors`` and, for the paper sizes, the ``config.json`` timm's ``local-dir:`` reads)
            or ``"hf"`` (a transformers directory: ``config.json`` + ``model.safetensors``).
        output: file (official) or directory (timm, hf) to write.
        conv_mlp: timm only, override timm's 1x1-conv MLP choice (default: by size).

    Returns:
        The path written.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {EXPORT_FORMATS}")
    canonical, layout = read_canonical(checkpoint)
    output = Path(output)
    if fmt == "official":
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.save(to_official(canonical), output)
    elif fmt == "timm":
        _write_dir(output, to_timm(canonical, conv_mlp), _timm_config(canonical))
    else:
        _write_dir(output, to_hf(canonical), hf_config(canonical))
    logger.info("exported %s (%s layout) to %s as %s", checkpoint, layout, output, fmt)
    return output


def _timm_config(canonical: dict[str, Tensor]) -> dict | None:
    """timm ``config.json`` for ``local-dir:`` loading; None for sizes timm does not register."""
    spec = encoder_spec(split_parts(canonical)["encoder"])
    if spec.size is None or spec.size == "test":
        logger.info("no timm config.json: timm has no convnextv2 of %s", spec)
        return None
    classes = canonical["head.fc.weight"].shape[0] if "head.fc.weight" in canonical else 0
    return {
        "architecture": f"convnextv2_{spec.size}", "num_classes": classes, "num_features": spec.dims[-1],
        "model_args": {"in_chans": spec.in_chans},
        "pretrained_cfg": {"input_size": [spec.in_chans, 224, 224], "crop_pct": 0.875,
                           "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }


def _write_dir(output: Path, state: dict[str, Tensor], config: dict | None) -> None:
    output.mkdir(parents=True, exist_ok=True)
    save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
