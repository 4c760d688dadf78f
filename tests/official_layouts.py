"""Synthetic official ConvNeXt V2 checkpoints, built from our state dicts by the official layout rules.

Written independently of ``models.formats`` (plain string rules read off the official
``models/convnextv2.py``, ``models/convnextv2_sparse.py`` and ``utils.remap_checkpoint_keys``), so the
tests compare two implementations rather than one table with itself.
"""

from __future__ import annotations

import re

from torch import Tensor

_BLOCK_RENAMES = (
    ("conv_dw.", "dwconv."), ("mlp.fc1.", "pwconv1."), ("mlp.fc2.", "pwconv2."),
    ("mlp.grn.weight", "grn.gamma"), ("mlp.grn.bias", "grn.beta"),
)


def _official_name(key: str) -> str:
    key = re.sub(r"^stem\.", "downsample_layers.0.", key)
    key = re.sub(r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1.", key)
    key = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2.", key)
    key = re.sub(r"^head\.norm\.", "norm.", key)
    key = re.sub(r"^head\.fc\.", "head.", key)
    for ours, theirs in _BLOCK_RENAMES:
        key = key.replace(ours, theirs)
    return key


def official_dense(state: dict[str, Tensor], grn_shape: str = "4d") -> dict[str, Tensor]:
    """Our ConvNeXtV2 state dict in the official dense layout; GRN as (1,1,1,C), (1,C) or (C,)."""
    shapes = {"4d": (1, 1, 1, -1), "2d": (1, -1), "1d": (-1,)}
    out = {}
    for key, value in state.items():
        name = _official_name(key)
        out[name] = value.reshape(shapes[grn_shape]) if ".grn." in name else value.clone()
    return out


def _me_encoder_entry(name: str, value: Tensor) -> tuple[str, Tensor]:
    """One official dense encoder tensor in the MinkowskiEngine training layout (with ``encoder.``)."""
    if re.match(r"downsample_layers\.[123]\.1\.weight$", name):
        k = value.shape[-1]  # W[o, i, kh, kw] -> K[kw * k + kh, i, o]
        kernel = value.permute(3, 2, 1, 0).reshape(k * k, value.shape[1], value.shape[0])
        return "encoder." + name[: -len("weight")] + "kernel", kernel
    if re.match(r"stages\.\d\.\d+\.dwconv\.weight$", name):
        k = value.shape[-1]
        return "encoder." + name[: -len("weight")] + "kernel", value[:, 0].permute(2, 1, 0).reshape(k * k, -1)
    if re.match(r"(downsample_layers\.[123]\.1|stages\.\d\.\d+\.dwconv)\.bias$", name):
        return "encoder." + name, value.reshape(1, -1)
    name = re.sub(r"^(downsample_layers\.[123]\.0)\.", r"\1.ln.", name)
    name = re.sub(r"\.norm\.(weight|bias)$", r".norm.ln.\1", name)
    name = re.sub(r"\.(pwconv[12])\.", r".\1.linear.", name)
    if ".grn." in name:
        value = value.reshape(1, -1)
    return "encoder." + name, value.clone()


def official_me_training(fcmae_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our FCMAE state dict as the official ``main_pretrain.py`` writes it under ``"model"``."""
    out = {}
    for key, value in fcmae_state.items():
        if key.startswith("encoder."):
            name, tensor = _me_encoder_entry(_official_name(key[len("encoder."):]), value)
        else:
            name = key
            for ours, theirs in _BLOCK_RENAMES:
                name = name.replace(ours, theirs)
            tensor = value.reshape(1, 1, 1, -1) if ".grn." in name else value.clone()
        out[name] = tensor
    return out


def official_remap(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official ``main_finetune.py --finetune`` path: drop the decoder, ``remap_checkpoint_keys``."""
    state = {k: v for k, v in state.items() if not any(s in k for s in ("decoder", "mask_token", "proj", "pred"))}
    out = {}
    for key, value in state.items():
        key = key[len("encoder."):] if key.startswith("encoder") else key
        if key.endswith("kernel"):
            ks = int(value.shape[0] ** 0.5)
            if value.ndim == 3:
                value = value.permute(2, 1, 0).reshape(value.shape[2], value.shape[1], ks, ks).transpose(3, 2)
            else:
                value = value.permute(1, 0).reshape(value.shape[1], 1, ks, ks).transpose(3, 2)
            out[key[: -len("kernel")] + "weight"] = value
            continue
        if "ln" in key or "linear" in key:
            parts = key.split(".")
            parts.pop(-2)
            key = ".".join(parts)
        out[key] = value
    for key in list(out):
        if key.endswith("bias") and out[key].ndim != 1:
            out[key] = out[key].reshape(-1)
        if "grn" in key:
            out[key] = out[key].unsqueeze(0).unsqueeze(1)
    return out
