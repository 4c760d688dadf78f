"""Helpers for the finetuning tests: a generated labeled image set and tiny run configs (no downloads)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from fcmae.finetune_config import FinetuneConfig, load_finetune_config

# Four classes told apart by hue; brightness, saturation and pixel noise vary within a class.
HUES = ((1.0, 0.15, 0.15), (0.15, 1.0, 0.2), (0.2, 0.25, 1.0), (1.0, 0.9, 0.1))
TINY = [
    "model.name=convnextv2_test", "data.input_size=32", "data.num_workers=0", "train.batch_size=16",
    "optim.lr=4e-3", "optim.warmup_epochs=1", "augment.auto_augment=null", "augment.reprob=0",
    "augment.smoothing=0", "log.trackers=[]", "log.progress_bar=false", "log.every_steps=1",
]


def class_image(label: int, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """One image of class ``label``: its hue, a random brightness and pixel noise."""
    color = np.array(HUES[label]) * rng.uniform(120, 250)
    pixels = color + rng.normal(0, 25, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def labeled_dataset(per_class: int, seed: int = 0, classes: int = 4) -> datasets.Dataset:
    """``per_class`` images of each class: columns ``image`` (Image) and ``label`` (ClassLabel)."""
    rng = np.random.default_rng(seed)
    labels = [c for c in range(classes) for _ in range(per_class)]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(classes)])})
    return datasets.Dataset.from_dict({"image": [class_image(c, rng) for c in labels], "label": labels},
                                      features=features)


def write_class_folders(root: Path, split: str, per_class: int, seed: int = 0, classes: int = 4) -> Path:
    """``root/split/class_<c>/img_<i>.png``; returns ``root``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / split / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            class_image(c, rng).save(folder / f"img_{i:03d}.png")
    return root


def tiny_config(output_dir: Path, *overrides: str) -> FinetuneConfig:
    """A seconds-long CPU finetuning config for convnextv2_test at 32 px."""
    return load_finetune_config(None, [*TINY, f"output_dir={output_dir}", *overrides])
