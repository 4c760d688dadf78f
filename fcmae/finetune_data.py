"""Labeled images for finetuning: sources, the official timm transforms, and loaders.

Sources and decoding are :mod:`fcmae.data`'s (broken files are skipped and counted, never fatal);
batches come from :mod:`fcmae.loader`'s resumable sampler. Training augmentation is timm's
``create_transform`` as the official ``main_finetune.py`` builds it (RandomResizedCrop, flip,
RandAugment, random erasing, bicubic); its random draws are seeded per sample from
(seed, epoch, index), so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader

from fcmae.config import ConfigError
from fcmae.data import (
    ImageSource,
    LabeledImages,
    collate_examples,
    decode_first_good,
    image_folder_dataset,
    load_image_source,
)
from fcmae.finetune_config import AugmentConfig, FinetuneDataConfig
from fcmae.images import MODES_BY_CHANNELS
from fcmae.loader import EpochBatchSampler, PretrainLoader
from fcmae.pretrain_config import DataConfig
from fcmae.transforms import keyed_generator

LABEL_COLUMN_NAMES = ("label", "labels")
TRANSFORM_STREAM = 3
# At and above this size the official evaluation resizes to the square without cropping.
WARP_EVAL_SIZE = 384


@dataclass
class LabeledSource:
    """Undecoded images with integer labels in ``label_column``; ``class_names`` when the data names them."""

    images: ImageSource
    label_column: str
    num_classes: int
    class_names: list[str] | None

    def __len__(self) -> int:
        return len(self.images.dataset)


def _is_class_folder_root(path: str) -> bool:
    folder = Path(path)
    return folder.is_dir() and not any((folder / n).is_file() for n in ("state.json", "dataset_dict.json"))


def _class_folder_root(path: str, split: str, train_split: str) -> Path:
    """``<path>/<split>`` when it exists; ``path`` itself for the training split; ConfigError otherwise."""
    if (Path(path) / split).is_dir():
        return Path(path) / split
    if split == train_split:
        return Path(path)
    raise ConfigError("data.eval_split", f"{path} has no {split}/ subfolder: set data.eval_split to the evaluation "
                                         "subfolder, data.eval_path to its own folder, or data.eval_split=null")


def load_labeled_source(cfg: FinetuneDataConfig, split: str, path: str | None = None,
                        dataset: datasets.Dataset | None = None) -> LabeledSource:
    """Open the labeled data of ``split`` from ``path`` (or ``cfg.name``), or wrap ``dataset``.

    Raises:
        ConfigError: no image or label column, labels that are not class indices, a missing split folder.
    """
    if dataset is None and path is not None and _is_class_folder_root(path):
        images = image_folder_dataset(_class_folder_root(path, split, cfg.train_split), with_labels=True)
    else:
        source = DataConfig(path=path, name=cfg.name if path is None else None, config_name=cfg.config_name,
                            split=split, image_column=cfg.image_column)
        images = load_image_source(source, dataset)
    column = find_label_column(images.dataset, cfg.label_column)
    feature = images.dataset.features[column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    labels = images.dataset[column]
    if not all(isinstance(v, int) and v >= 0 for v in labels):
        raise ConfigError("data.label_column", f"column {column!r} must hold class indices (integers >= 0)")
    return LabeledSource(images, column, len(names) if names else max(labels) + 1, names)


def find_label_column(ds: datasets.Dataset, requested: str | None) -> str:
    """``requested``, else ``label`` or ``labels``; ConfigError naming the columns otherwise."""
    columns = sorted(ds.features or {})
    if requested is not None and requested not in columns:
        raise ConfigError("data.label_column", f"no column {requested!r}; columns: {columns}")
    found = [requested] if requested else [c for c in LABEL_COLUMN_NAMES if c in columns]
    if not found:
        raise ConfigError("data.label_column", f"no label column among {columns}; set data.label_column")
    return found[0]


def train_transform(data: FinetuneDataConfig, aug: AugmentConfig) -> Callable:
    """timm's training transform with the official arguments: PIL image -> (C, S, S)."""
    return create_transform(
        data.input_size, is_training=True, scale=aug.scale, hflip=aug.hflip, color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment, interpolation=aug.interpolation, mean=data.mean, std=data.std,
        re_prob=aug.reprob, re_mode=aug.remode, re_count=aug.recount,
    )


def eval_transform(data: FinetuneDataConfig) -> Callable:
    """Resize to ``input_size / crop_pct`` and centre crop (below 384 px), else resize to the square."""
    if data.input_size >= WARP_EVAL_SIZE:
        return create_transform(data.input_size, crop_pct=1.0, crop_mode="squash", interpolation="bicubic",
                                mean=data.mean, std=data.std)
    return create_transform(data.input_size, crop_pct=data.crop_pct, interpolation="bicubic", mean=data.mean,
                            std=data.std)


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Run the block with Python's, NumPy's and torch's CPU RNGs seeded by ``seed``, then restore them.

    timm's transforms draw from these global generators; scoping them keeps augmentation a function of
    the sample alone and leaves the caller's streams (mixup, drop path) untouched.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class LabeledTrainImages(torch.utils.data.Dataset):
    """Training items keyed (epoch, index) -> ``{"pixel_values", "label", "issues"}``.

    A broken file is replaced by the next decodable one (with its own label), so batches keep their size.
    """

    def __init__(self, source: LabeledSource, transform: Callable, data: FinetuneDataConfig, in_chans: int,
                 seed: int):
        self.dataset, self.column = source.images.dataset, source.images.image_column
        self.labels = source.images.dataset[source.label_column]
        self.transform, self.mode, self.seed = transform, MODES_BY_CHANNELS[in_chans], seed
        self.max_pixels, self.max_bad = data.max_image_pixels, data.max_bad_in_a_row

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        fetched: list[int] = []  # decode_first_good stops at the first good index: the last one fetched

        def fetch(i: int) -> Any:
            fetched.append(i)
            return self.dataset[i][self.column]

        img, _, issues = decode_first_good(fetch, index, len(self), self.mode, self.max_pixels, self.max_bad)
        with seeded_global_rngs(keyed_generator(self.seed, TRANSFORM_STREAM, epoch, index).initial_seed()):
            pixels = self.transform(img)
        return {"pixel_values": pixels, "label": self.labels[fetched[-1]], "issues": issues}


def build_train_loader(source: LabeledSource, data: FinetuneDataConfig, aug: AugmentConfig, *, in_chans: int,
                       batch_size: int, accumulation: int, rank: int, world_size: int, seed: int,
                       pin_memory: bool = False) -> PretrainLoader:
    """Resumable per-process training batches (the same count on every process, remainder dropped).

    Raises:
        ConfigError: fewer labeled images than one optimizer step.
    """
    per_step = batch_size * world_size * accumulation
    batches = len(source) // per_step * accumulation
    if batches == 0:
        raise ConfigError("train.batch_size", f"{len(source)} training images are fewer than one optimizer step of "
                                              f"{per_step} (batch x processes x accumulation)")
    sampler = EpochBatchSampler(len(source), batch_size, batches, rank, world_size, seed)
    dataset = LabeledTrainImages(source, train_transform(data, aug), data, in_chans, seed)
    # Own generators: creating loader iterators must not draw from the global RNG that drop path uses,
    # or a resumed run (which creates one more iterator) would drift from an uninterrupted one.
    kwargs = dict(num_workers=data.num_workers, collate_fn=collate_examples, pin_memory=pin_memory,
                  persistent_workers=data.num_workers > 0, generator=torch.Generator().manual_seed(seed))
    return PretrainLoader(dataset, batches, kwargs, sampler)


class LabeledEvalImages(LabeledImages):
    """:class:`fcmae.data.LabeledImages` whose undecodable items become a zero image with label -1.

    Batches then keep their size on every process (``gather_for_metrics`` needs that); evaluation
    leaves label -1 out of every metric, and the issue is counted.
    """

    def __init__(self, source: LabeledSource, transform: Callable, in_chans: int, input_size: int, max_pixels: int):
        super().__init__(source.images, source.label_column, transform, in_chans, max_pixels)
        self.blank_shape = (in_chans, input_size, input_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        if "pixel_values" not in item:
            item = {"pixel_values": torch.zeros(self.blank_shape), "label": -1, "issues": item["issues"]}
        return item


def build_eval_loader(source: LabeledSource, data: FinetuneDataConfig, *, in_chans: int,
                      batch_size: int) -> DataLoader:
    """Evaluation batches in dataset order (shard them with ``accelerator.prepare``)."""
    dataset = LabeledEvalImages(source, eval_transform(data), in_chans, data.input_size, data.max_image_pixels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=data.num_workers,
                      collate_fn=collate_examples, generator=torch.Generator().manual_seed(0))
