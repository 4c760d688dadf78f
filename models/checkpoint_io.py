"""Reading weight files without running code from them.

``.safetensors`` files hold raw tensors only. Anything else goes through ``torch.load(weights_only=True)``,
whose unpickler refuses every Python object but tensors and plain containers; the one class we add is
``argparse.Namespace``, which the official ConvNeXt V2 ``.pt``/``.pth`` files carry as ``args``.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

# Inside a directory: accelerate ``save_state`` folders and transformers ``save_pretrained`` folders.
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
# Where containers keep the model weights: official files use "model", others "state_dict".
STATE_DICT_KEYS = ("model", "state_dict")


class CheckpointError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that holds objects which could run code when loaded."""


def resolve_weights_file(path: str | Path) -> Path:
    """``path`` itself, or the weights file inside a checkpoint or transformers directory."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a directory without a weights file ({', '.join(WEIGHT_FILE_NAMES)})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, in whatever layout the file uses.

    Args:
        path: a ``.safetensors`` file, a torch file (state dict, or a dict holding it under ``"model"``
            or ``"state_dict"``), or a directory holding ``model.safetensors`` / ``pytorch_model.bin``.

    Raises:
        UnsafeCheckpointError: the file is a pickle with objects other than tensors and containers.
        CheckpointError: the file is truncated, corrupt or holds no state dict of tensors.
    """
    path = resolve_weights_file(path)
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    for key in STATE_DICT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None


def _read_torch(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path} is not a readable torch file (truncated or corrupt?): {err}") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else "an object that is not a tensor"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds a pickled Python object ({what}) and unpickling it could run "
            "code. Only tensors, plain containers and argparse.Namespace are read. If you trust the file, "
            "re-save its tensors with safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable torch file (truncated or corrupt?): {err}") from None
