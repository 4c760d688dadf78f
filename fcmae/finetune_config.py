"""The finetuning configuration schema; defaults are the official ``main_finetune.py`` defaults.

Per-size recipes live in ``configs/finetune/convnextv2_<size>.yaml`` (official TRAINING.md for atto,
tiny and base; the paper's appendix tables 9-11 for the others). Load with
``load_finetune_config(path, overrides)``; the loader and its strictness are :mod:`fcmae.config`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fcmae.config import ConfigError, check_writable_dir, load_config
from fcmae.pretrain_config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIL_DEFAULT_MAX_PIXELS,
    CheckpointConfig,
    OptimConfig,
    TrainConfig,
)
from models import TOTAL_STRIDE, list_models


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


@dataclass
class FinetuneModelConfig:
    """The classifier: ``models.create_model`` arguments and where its weights start."""

    name: str = "convnextv2_atto"  # convnextv2_{atto..huge} (or convnextv2_test)
    pretrained: str | None = None  # weights of any layout models.checkpoint reads (FCMAE, encoder, official, timm, HF)
    num_classes: int | None = None  # None: the number of classes in the training data
    in_chans: int = 3  # 1, 3 or 4
    drop_path_rate: float = 0.0  # stochastic depth
    head_init_scale: float = 0.001  # from scratch: initial head weight and bias scaled by this (official default)
    head_init_std: float = 2e-5  # from pretrained weights: head weight ~ trunc_normal(std), bias 0 (official)
    linear_probe: bool = False  # freeze the encoder; train only the head (final norm + linear) on pooled features

    def validate(self) -> None:
        _check(self.name in list_models(), "name", f"unknown model {self.name!r}; choose one of {list_models()}")
        _check(self.num_classes is None or self.num_classes >= 2, "num_classes", "must be >= 2")
        _check(self.in_chans in (1, 3, 4), "in_chans", f"must be 1, 3 or 4, got {self.in_chans}")
        _check(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        _check(self.head_init_std > 0 and self.head_init_scale > 0, "head_init_std", "head init values must be > 0")
        if self.pretrained is not None:
            _check(Path(self.pretrained).exists(), "pretrained", f"not found: {self.pretrained}")


@dataclass
class FinetuneDataConfig:
    """Labeled images: class folders, or a dataset with an image and a label column.

    ``path`` may be ``<path>/<split>/<class>/*.jpg`` (ImageNet layout), ``<path>/<class>/*.jpg`` (training
    only; pass ``eval_path``), parquet/arrow files or a ``save_to_disk`` folder; or set ``name``.
    """

    path: str | None = None  # training source (see above)
    name: str | None = None  # a datasets hub name
    config_name: str | None = None  # the hub dataset's configuration
    train_split: str = "train"
    eval_split: str | None = "validation"  # ImageNet folders use "val"; null: no evaluation
    eval_path: str | None = None  # separate evaluation source (class folders or files), read whole
    image_column: str | None = None  # None: the first Image column, or image/img/path
    label_column: str | None = None  # None: "label" or "labels"
    input_size: int = 224  # a multiple of 32
    crop_pct: float = 224 / 256  # evaluation: resize to input_size / crop_pct, centre crop
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_workers: int = 4
    max_image_pixels: int = PIL_DEFAULT_MAX_PIXELS  # larger images are skipped (decompression bombs)
    max_bad_in_a_row: int = 32  # consecutive undecodable training files tolerated

    def require_source(self) -> None:
        """ConfigError unless exactly one source is set (checked when no in-memory dataset is given)."""
        sources = (self.path is not None) + (self.name is not None)
        _check(sources == 1, "data.path", "set exactly one of data.path (class folders or parquet/arrow files) "
                                          "and data.name (a datasets hub name)")

    def validate(self) -> None:
        for key in ("path", "eval_path"):
            value = getattr(self, key)
            _check(value is None or Path(value).exists() or "*" in value, key, f"{value} does not exist")
        _check(self.input_size > 0 and self.input_size % TOTAL_STRIDE == 0, "input_size",
               f"must be a positive multiple of {TOTAL_STRIDE}, got {self.input_size}")
        _check(0.0 < self.crop_pct <= 1.0, "crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        _check(all(s > 0 for s in self.std), "std", f"must be positive, got {self.std}")
        _check(self.num_workers >= 0, "num_workers", "must be >= 0")
        _check(self.max_image_pixels > 0 and self.max_bad_in_a_row >= 1, "max_bad_in_a_row", "must be >= 1")


@dataclass
class AugmentConfig:
    """Training augmentation (timm ``create_transform``, ``Mixup``) and label smoothing."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment policy; null: off
    color_jitter: float | None = 0.4  # timm applies it only without auto_augment
    interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: float = 0.5
    reprob: float = 0.25  # random erasing probability
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: int = 1
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    cutmix_minmax: tuple[float, float] | None = None
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    smoothing: float = 0.1  # label smoothing

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def validate(self) -> None:
        low, high = self.scale
        _check(0.0 < low <= high <= 1.0, "scale", f"must satisfy 0 < low <= high <= 1, got {self.scale}")
        for key in ("hflip", "reprob", "mixup_prob", "mixup_switch_prob"):
            _check(0.0 <= getattr(self, key) <= 1.0, key, f"must be a probability, got {getattr(self, key)}")
        _check(self.mixup >= 0 and self.cutmix >= 0, "mixup", "mixup and cutmix alphas must be >= 0")
        _check(0.0 <= self.smoothing < 1.0, "smoothing", f"must be in [0, 1), got {self.smoothing}")
        _check(self.recount >= 1, "recount", "must be >= 1")


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """AdamW, warmup + cosine, and layer-wise lr decay (official ids, see ``fcmae.layer_decay``)."""

    blr: float = 5e-4  # base learning rate per 256 images
    min_lr: float = 1e-6
    warmup_epochs: float = 20.0
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 1.0  # 1.0: off
    layer_decay_type: Literal["single", "group"] = "single"  # group: 12 groups, written for depths 3-3-27-3

    def validate(self) -> None:
        super().validate()
        _check(0.0 < self.layer_decay <= 1.0, "layer_decay", f"must be in (0, 1], got {self.layer_decay}")


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (timm ``ModelEmaV3``), evaluated beside the model."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = False  # timm's decay warmup for short runs

    def validate(self) -> None:
        _check(0.0 < self.decay < 1.0, "decay", f"must be in (0, 1), got {self.decay}")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """Length, batch and numerics (``fcmae.pretrain_config.TrainConfig``) plus evaluation."""

    epochs: int = 100
    eval_only: bool = False  # evaluate model.pretrained (a classifier) and stop
    eval_every_epochs: int = 1
    eval_batch_size: int | None = None  # None: 2 x batch_size

    def validate(self) -> None:
        super().validate()
        _check(self.eval_every_epochs >= 1, "eval_every_epochs", "must be >= 1")
        _check(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")


@dataclass
class FinetuneLogConfig:
    """Metrics to ``log.jsonl``, the trackers and the progress bar."""

    every_steps: int = 20
    trackers: list[str] | None = None  # accelerate trackers; None: tensorboard when installed; []: none
    project_name: str = "fcmae-finetune"
    progress_bar: bool = True

    def validate(self) -> None:
        _check(self.every_steps >= 1, "every_steps", "must be >= 1")


@dataclass
class FinetuneConfig:
    """Everything ``finetune.py`` needs."""

    output_dir: str = "runs/finetune"  # config, logs, checkpoints/, weights/{best,last}[_ema].safetensors
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: FinetuneLogConfig = field(default_factory=FinetuneLogConfig)

    def validate(self) -> None:
        check_writable_dir(self.output_dir, "output_dir")
        for key in ("mean", "std"):
            count = len(getattr(self.data, key))
            _check(count == self.model.in_chans, f"data.{key}", f"has {count} values, model.in_chans is "
                                                                f"{self.model.in_chans}")
        if self.augment.mixing:
            _check(self.train.batch_size % 2 == 0, "train.batch_size", "must be even with mixup/cutmix (timm Mixup)")
        if self.train.eval_only:
            _check(self.model.pretrained is not None, "model.pretrained", "eval_only needs a classifier to evaluate")
        if self.train.eval_only:
            _check(self.data.eval_split is not None or self.data.eval_path is not None, "data.eval_split",
                   "evaluation needs data.eval_split or data.eval_path")
        if self.model.linear_probe:
            _check(self.model.pretrained is not None, "model.pretrained", "a linear probe needs pretrained weights")


def load_finetune_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """``load_config(FinetuneConfig, path, overrides)``."""
    return load_config(FinetuneConfig, path, overrides)
