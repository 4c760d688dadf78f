"""Helpers for the pretraining tests: small image files and tiny run configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fcmae.pretrain_config import PretrainConfig, load_pretrain_config

TINY = [
    "model.name=convnextv2_test", "model.decoder_embed_dim=16", "data.input_size=64", "data.num_workers=0",
    "train.batch_size=4", "optim.warmup_epochs=1", "log.trackers=[]", "log.progress_bar=false",
    "log.every_steps=1", "log.preview_every_steps=0",
]


def random_image(seed: int, size: tuple[int, int] = (80, 72), mode: str = "RGB") -> Image.Image:
    """A noise image of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode)


def write_images(folder: Path, count: int, classes: int = 0, start_seed: int = 0, ext: str = "png") -> list[Path]:
    """``count`` images under ``folder`` (spread over ``classes`` subfolders when > 0)."""
    paths = []
    for i in range(count):
        sub = folder / f"class_{i % classes}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img_{i:03d}.{ext}"
        random_image(start_seed + i).save(path)
        paths.append(path)
    return paths


def tiny_config(output_dir: Path, *overrides: str) -> PretrainConfig:
    """A seconds-long CPU config for convnextv2_test at 64 px (add a data source in ``overrides``)."""
    return load_pretrain_config(None, [*TINY, f"output_dir={output_dir}", *overrides])


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state so the next run in this process starts fresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
