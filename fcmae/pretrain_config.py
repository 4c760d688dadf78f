"""The pretraining configuration schema (defaults = the paper's recipe, convnextv2.md §5a).

Field names mirror the keyword arguments they feed (``create_fcmae``, ``torch.optim.AdamW``,
``accelerate.Accelerator``). Load with ``load_pretrain_config(path, overrides)``.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fcmae.config import ConfigError, check_writable_dir, load_config
from models import TOTAL_STRIDE, list_models

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_DEFAULT_MAX_PIXELS = 89_478_485


@dataclass
class ModelConfig:
    """Arguments of ``fcmae.create_fcmae``."""

    name: str = "convnextv2_atto"  # encoder variant, convnextv2_{atto..huge} (or convnextv2_test)
    backend: Literal["auto", "native", "dense", "minkowski"] = "auto"  # sparse backend of the encoder
    mask_ratio: float = 0.6  # fraction of 32x32 patches masked, in [0, 1)
    decoder_depth: int = 1  # ConvNeXt V2 blocks in the decoder
    decoder_embed_dim: int = 512  # decoder width
    norm_pix_loss: bool = True  # per-patch normalised pixel targets
    in_chans: int = 3  # 1 (grayscale), 3 (RGB) or 4 (RGBA)
    grn_scope: Literal["sample", "batch"] = "sample"  # GRN statistics per sample (paper) or per batch (official ME)
    pretrained: str | None = None  # FCMAE or encoder weights (file or folder, any layout models.checkpoint reads)
    drop_path_rate: float = 0.0  # stochastic depth of the encoder

    def validate(self) -> None:
        if self.name not in list_models():
            raise ConfigError("name", f"unknown model {self.name!r}; choose one of {', '.join(list_models())}")
        _check(0.0 <= self.mask_ratio < 1.0, "mask_ratio", f"must be in [0, 1), got {self.mask_ratio}")
        _check(self.decoder_depth >= 0, "decoder_depth", f"must be >= 0, got {self.decoder_depth}")
        _check(self.decoder_embed_dim >= 1, "decoder_embed_dim", f"must be >= 1, got {self.decoder_embed_dim}")
        _check(self.in_chans in (1, 3, 4), "in_chans", f"must be 1, 3 or 4 for image data, got {self.in_chans}")
        _check(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        if self.pretrained is not None and not Path(self.pretrained).exists():
            raise ConfigError("pretrained", f"not found: {self.pretrained}")


GPU_DECODERS = ("direct", "torchvision")  # data.gpu_decoder's choices


@dataclass
class DataConfig:
    """Where images come from and how they are augmented.

    Set exactly one of path, name and generated_images (none only when the Python API is handed an
    in-memory dataset instead).
    """

    path: str | None = None  # image folder (recursive), parquet/arrow file(s) or glob, or a save_to_disk folder
    name: str | None = None  # a datasets hub name (read from the local cache when offline)
    config_name: str | None = None  # the hub dataset's configuration
    split: str = "train"  # split of a hub dataset, save_to_disk DatasetDict or image folder with split subfolders
    image_column: str | None = None  # column holding images; None: the first Image column, or image/img/path
    generated_images: int = 0  # > 0: use a built-in corpus of this many images drawn at run time
    streaming: bool = False  # iterate without loading the whole index (split across processes)
    num_samples: int | None = None  # images per epoch when streaming (default: the dataset's recorded size)
    shuffle_buffer: int = 10_000  # shuffle buffer of a streaming dataset
    input_size: int = 224  # crop side in pixels, a multiple of 32
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    hflip: float = 0.5  # horizontal flip probability
    reduced_decode: bool = True  # decode JPEGs at 1/2, 1/4 or 1/8 size (DCT scaling) when the crop still fits
    decode_device: str = "cpu"  # cuda: the training process decodes and crops JPEGs on its GPU (nvJPEG)
    cpu_decode_share: float = 0.0  # with decode_device=cuda: share of each batch the workers still decode on the CPU
    decoder_sms: int = 0  # with decode_device=cuda: train on all but about this many SMs, left to the decoder (0: all)
    gpu_decoder: str = "direct"  # with decode_device=cuda: direct (nvJPEG's hardware decoder itself) or torchvision
    mean: tuple[float, ...] = IMAGENET_MEAN  # per-channel normalisation mean (one value per in_chans)
    std: tuple[float, ...] = IMAGENET_STD  # per-channel normalisation std
    num_workers: int = 4  # DataLoader worker processes per training process
    max_image_pixels: int = PIL_DEFAULT_MAX_PIXELS  # larger images are skipped (decompression bombs)
    max_bad_in_a_row: int = 32  # consecutive undecodable files tolerated before the run stops

    def num_sources(self) -> int:
        return sum([self.path is not None, self.name is not None, self.generated_images > 0])

    def require_source(self) -> None:
        """ConfigError unless a source is set (checked when no in-memory dataset is given instead)."""
        if self.num_sources() == 0:
            raise ConfigError("data.path", "missing: set data.path (image folder or parquet/arrow files), "
                                           "data.name (a datasets hub name) or data.generated_images")

    def validate(self) -> None:
        if self.num_sources() > 1:
            raise ConfigError("path", "set only one of data.path, data.name and data.generated_images")
        if self.path is not None:
            _check_data_path(self.path)
        _check(self.input_size > 0 and self.input_size % TOTAL_STRIDE == 0, "input_size",
               f"must be a positive multiple of {TOTAL_STRIDE}, got {self.input_size}")
        low, high = self.crop_scale
        _check(0.0 < low <= high <= 1.0, "crop_scale", f"must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        _check(0.0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio", f"bad range {self.crop_ratio}")
        _check(0.0 <= self.hflip <= 1.0, "hflip", f"must be a probability, got {self.hflip}")
        _check(all(s > 0 for s in self.std), "std", f"must be positive, got {self.std}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.decode_device in ("cpu", "cuda"), "decode_device",
               f"must be cpu or cuda, got {self.decode_device!r}")
        _check(0.0 <= self.cpu_decode_share <= 1.0, "cpu_decode_share",
               f"must be in [0, 1], got {self.cpu_decode_share}")
        _check(self.cpu_decode_share == 0.0 or self.decode_device == "cuda", "cpu_decode_share",
               "splits decoding between the workers and the GPU, so it needs decode_device=cuda")
        _check(self.decoder_sms >= 0, "decoder_sms", f"must be >= 0, got {self.decoder_sms}")
        _check(self.decoder_sms == 0 or self.decode_device == "cuda", "decoder_sms",
               "leaves SMs to the GPU's JPEG decoder, so it needs decode_device=cuda")
        _check(self.gpu_decoder in GPU_DECODERS, "gpu_decoder",
               f"must be direct or torchvision, got {self.gpu_decoder!r}")
        _check(self.max_image_pixels > 0, "max_image_pixels", "must be > 0")
        _check(self.max_bad_in_a_row >= 1, "max_bad_in_a_row", "must be >= 1")
        _check(self.num_samples is None or self.num_samples > 0, "num_samples", "must be > 0")
        _check(self.shuffle_buffer >= 1, "shuffle_buffer", "must be >= 1")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule; ``lr = blr * effective_batch / 256`` unless ``lr`` is set."""

    blr: float = 1.5e-4  # base learning rate per 256 images
    lr: float | None = None  # absolute peak learning rate (overrides blr scaling)
    min_lr: float = 0.0  # end of the cosine decay
    warmup_epochs: float = 40.0  # linear warmup length, per iteration
    weight_decay: float = 0.05  # on conv/linear weights only (see fcmae.optim)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad: float | None = None  # max global gradient norm; None: no clipping

    def validate(self) -> None:
        _check(self.blr > 0, "blr", f"must be > 0, got {self.blr}")
        _check(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.min_lr >= 0, "min_lr", f"must be >= 0, got {self.min_lr}")
        _check(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(all(0 <= b < 1 for b in self.betas), "betas", f"must be in [0, 1), got {self.betas}")
        _check(self.clip_grad is None or self.clip_grad > 0, "clip_grad", f"must be > 0, got {self.clip_grad}")


@dataclass
class TrainConfig:
    """Length, batch and numerics of the run."""

    epochs: int = 800
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still spans all epochs)
    batch_size: int = 64  # images per process per forward pass
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model (through accelerate's dynamo backend)
    # torch.compile mode; reduce-overhead and max-autotune also capture CUDA graphs on a GPU (one graph
    # replay per step instead of thousands of kernel launches from Python)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    seed: int = 0
    stop_after_nonfinite: int = 5  # consecutive non-finite steps (each skipped) that stop the run

    def validate(self) -> None:
        _check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        _check(self.stop_after_nonfinite >= 1, "stop_after_nonfinite", "must be >= 1")
        _check(self.compile or self.compile_mode == "default", "compile_mode",
               f"{self.compile_mode} needs train.compile=true")

    @property
    def captures_cuda_graphs(self) -> bool:
        """Whether the compiled model captures CUDA graphs (on a CUDA device)."""
        return self.compile and self.compile_mode in ("reduce-overhead", "max-autotune")


@dataclass
class CheckpointConfig:
    """Resumable training state under ``<output_dir>/checkpoints``."""

    every_steps: int = 0  # also save every N optimizer steps (0: only at epoch ends)
    every_epochs: int = 1  # save at the end of every N-th epoch
    keep_last: int = 3  # complete checkpoints kept
    resume: bool = True  # continue from the latest complete checkpoint in output_dir

    def validate(self) -> None:
        _check(self.every_steps >= 0, "every_steps", "must be >= 0")
        _check(self.every_epochs >= 1, "every_epochs", "must be >= 1")
        _check(self.keep_last >= 1, "keep_last", "must be >= 1")


@dataclass
class LogConfig:
    """Progress bar, metrics, trackers and reconstruction previews."""

    every_steps: int = 20  # metrics to log.jsonl and the trackers
    trackers: list[str] | None = None  # accelerate trackers; None: tensorboard when installed; []: none
    project_name: str = "fcmae-pretrain"
    progress_bar: bool = True
    preview_every_steps: int = 1000  # reconstruction PNG (0: only at the end)
    preview_images: int = 4

    def validate(self) -> None:
        _check(self.every_steps >= 1, "every_steps", "must be >= 1")
        _check(self.preview_every_steps >= 0, "preview_every_steps", "must be >= 0")
        _check(self.preview_images >= 1, "preview_images", "must be >= 1")


@dataclass
class KnnConfig:
    """Optional kNN monitor on pooled encoder features (folders with one subfolder per class)."""

    every_epochs: int = 0  # 0: off
    train_path: str | None = None
    val_path: str | None = None
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 64

    def validate(self) -> None:
        if self.every_epochs == 0:
            return
        _check(self.every_epochs > 0, "every_epochs", "must be >= 0")
        for key in ("train_path", "val_path"):
            path = getattr(self, key)
            _check(path is not None and Path(path).is_dir(), key, f"must be a class-folder directory, got {path}")
        _check(self.k >= 1 and self.batch_size >= 1, "k", "k and batch_size must be >= 1")
        _check(self.temperature > 0, "temperature", "must be > 0")


@dataclass
class PretrainConfig:
    """Everything ``pretrain.py`` needs; defaults are the paper's recipe."""

    output_dir: str = "runs/pretrain"  # run directory: config, logs, checkpoints, weights, previews
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)

    def validate(self) -> None:
        check_writable_dir(self.output_dir, "output_dir")
        chans = self.model.in_chans
        for key in ("mean", "std"):
            values = getattr(self.data, key)
            _check(len(values) == chans, f"data.{key}", f"has {len(values)} values but model.in_chans is {chans}")


def load_pretrain_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """``load_config(PretrainConfig, path, overrides)``."""
    return load_config(PretrainConfig, path, overrides)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _check_data_path(path: str) -> None:
    if glob.has_magic(path):
        _check(bool(glob.glob(path, recursive=True)), "path", f"no file matches {path}")
    else:
        _check(Path(path).exists(), "path", f"{path} does not exist")
