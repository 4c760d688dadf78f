"""Per-process training batches: the same count on every process, resumable at any batch.

An epoch is ``batches_per_epoch`` micro-batches per process, a multiple of the gradient
accumulation steps (the remainder of the dataset is dropped, as ``drop_last`` does), so optimizer
steps line up with epoch ends and a checkpoint's data position is one integer.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, Sampler

from fcmae.config import ConfigError
from fcmae.data import ImageSource, PretrainImages, StreamingPretrainImages, collate_examples
from fcmae.device_decode import (
    DEVICE_READ_MODES,
    DeviceCropDecoder,
    EncodedPretrainImages,
    decode_ahead,
    pack_encoded,
    worker_slots,
)
from fcmae.images import MODES_BY_CHANNELS, BadImageError, decode_image
from fcmae.pretrain_config import DataConfig
from fcmae.transforms import EvalTransform, PretrainTransform, keyed_generator

_SHUFFLE_STREAM = 0x5EED
LOADER_PREFETCH = 2  # batches per worker in the loader's queue (DataLoader's default)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, index) keys for one process.

    Epoch ``e`` shuffles all indices with a generator keyed by (seed, e); global micro-batch ``b``
    is the slice ``[b * G, (b + 1) * G)`` of that order (G = batch x processes), and this process
    takes its ``batch_size`` share. ``set_epoch(e, start_batch)`` resumes mid-epoch without
    loading the skipped samples.
    """

    def __init__(self, num_samples: int, batch_size: int, batches_per_epoch: int, rank: int, world_size: int,
                 seed: int):
        self.num_samples, self.batch_size, self.batches_per_epoch = num_samples, batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.num_samples, generator=keyed_generator(self.seed, self.epoch)).tolist()
        for b in range(self.start_batch, self.batches_per_epoch):
            first = (b * self.world_size + self.rank) * self.batch_size
            yield [(self.epoch, i) for i in order[first:first + self.batch_size]]


# Loader workers run this much nicer than the training process. Decoding keeps every core busy, and the
# training loop waits on the GPU at each optimizer step: at equal priority, waking it up again
# queues behind the workers and the GPU idles meanwhile.
WORKER_NICENESS = 10


def lower_worker_priority(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give the training process's threads first claim on the CPU."""
    os.nice(WORKER_NICENESS)


class PretrainLoader:
    """Micro-batches ``{"pixel_values": (B, C, S, S) uint8, "issues": [...]}`` of one epoch at a time.

    Pixels are normalised on the training device (:func:`fcmae.transforms.normalize_pixels`). With a
    ``decoder`` the workers' batches are :class:`fcmae.device_decode.EncodedBatch` es, decoded on the
    decoder's device a few batches ahead (the pixels arrive there); each micro-batch then also carries its
    ``worker_batch``, for the training loop to free (see :class:`fcmae.device_decode.DeviceCropDecoder`).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, batches_per_epoch: int, loader_kwargs: dict[str, Any],
                 sampler: EpochBatchSampler | None = None, decoder: DeviceCropDecoder | None = None):
        self.dataset, self.batches_per_epoch, self.sampler = dataset, batches_per_epoch, sampler
        self.decoder = decoder
        if sampler is not None:
            self.loader = DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)
        else:
            self.loader = DataLoader(dataset, **loader_kwargs)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """The micro-batches ``start_batch .. batches_per_epoch - 1`` of ``epoch``."""
        batches = self._worker_batches(epoch, start_batch)
        return batches if self.decoder is None else decode_ahead(batches, self.decoder)

    def _worker_batches(self, epoch: int, start_batch: int) -> Iterator[Any]:
        wanted = self.batches_per_epoch - start_batch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start_batch)
            yield from self.loader
            return
        self.dataset.set_epoch(epoch, start_batch)
        while wanted > 0:
            got = 0
            for batch in itertools.islice(self.loader, wanted):
                got += 1
                yield batch
            if got == 0:
                raise RuntimeError("the streaming dataset yielded no complete batch on this process")
            wanted -= got
            self.dataset.set_epoch(epoch, 0)  # a short shard restarts from its beginning


def decode_device(cfg: DataConfig, training_device: torch.device) -> torch.device | None:
    """Where ``data.decode_device`` has the loader decode JPEGs: None for the CPU, else the training GPU.

    Raises:
        ConfigError: ``cuda`` asked for a run that does not train on a CUDA device.
    """
    if cfg.decode_device == "cpu":
        return None
    if training_device.type != "cuda":
        raise ConfigError("data.decode_device", f"cuda needs a run on a CUDA device; this one trains on "
                                                f"{training_device.type} (use cpu)")
    index = training_device.index if training_device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", index)


def build_pretrain_loader(cfg: DataConfig, source: ImageSource, *, in_chans: int, batch_size: int,
                          accumulation: int, rank: int, world_size: int, seed: int,
                          pin_memory: bool = False, decode_device: torch.device | None = None) -> PretrainLoader:
    """A :class:`PretrainLoader` over ``source`` for process ``rank`` of ``world_size``.

    Args:
        decode_device: decode JPEGs and crop them on this device in this process, a few batches ahead (see
            :mod:`fcmae.device_decode`); None decodes on the CPU in the workers.

    Raises:
        ConfigError: fewer images than one global batch, a stream of unknown size, or ``decode_device`` with
            a stream or with RGBA input.
    """
    transform = PretrainTransform(cfg.input_size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip, cfg.reduced_decode)
    kwargs = dict(num_workers=cfg.num_workers, collate_fn=collate_examples, pin_memory=pin_memory,
                  generator=torch.Generator().manual_seed(seed), worker_init_fn=lower_worker_priority)
    per_step = batch_size * world_size * accumulation
    if isinstance(source.dataset, datasets.IterableDataset):
        num_samples = cfg.num_samples or _recorded_size(source.dataset, cfg.split)
        batches = num_samples // per_step * accumulation
        stream = split_dataset_by_node(
            source.dataset.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer), rank, world_size)
        if decode_device is not None:
            raise ConfigError("data.decode_device", "decoding on the GPU needs a map-style dataset; a streaming "
                                                    "one decodes on the CPU (data.decode_device=cpu)")
        dataset = StreamingPretrainImages(
            ImageSource(stream, source.image_column, []), transform, cfg, in_chans, seed, rank, batch_size)
        loader = PretrainLoader(dataset, batches, dict(kwargs, batch_size=batch_size, drop_last=True))
    else:
        num_samples = len(source.dataset)
        batches = num_samples // per_step * accumulation
        sampler = EpochBatchSampler(num_samples, batch_size, batches, rank, world_size, seed)
        kwargs["persistent_workers"] = cfg.num_workers > 0
        decoder = None
        if decode_device is None:
            dataset = PretrainImages(source, transform, cfg, in_chans, seed)
        elif MODES_BY_CHANNELS[in_chans] not in DEVICE_READ_MODES:
            raise ConfigError("data.decode_device", f"the GPU decodes RGB or grayscale JPEGs, not the "
                                                    f"{MODES_BY_CHANNELS[in_chans]} of in_chans={in_chans} (use cpu)")
        else:
            dataset = EncodedPretrainImages(source, transform, cfg, in_chans, seed)
            # JPEG bytes go to nvJPEG from pageable memory: nothing to pin.
            kwargs.update(collate_fn=pack_encoded, pin_memory=False)
            if cfg.num_workers > 0:
                kwargs.update(prefetch_factor=LOADER_PREFETCH, collate_fn=functools.partial(
                    pack_encoded, slots=worker_slots(cfg.num_workers, LOADER_PREFETCH)))
            decoder = DeviceCropDecoder(cfg.input_size, decode_device, dataset, cfg.gpu_decoder)
        loader = PretrainLoader(dataset, batches, kwargs, sampler, decoder)
    if batches == 0:
        raise ConfigError("train.batch_size", f"the corpus has {num_samples} images, fewer than one optimizer step "
                                              f"of {per_step} (batch x processes x accumulation)")
    return loader


def _recorded_size(dataset: datasets.IterableDataset, split: str) -> int:
    splits = getattr(dataset.info, "splits", None) or {}
    if split in splits and splits[split].num_examples:
        return splits[split].num_examples
    raise ConfigError("data.num_samples", "required for a streaming dataset that does not record its size")


def preview_images(cfg: DataConfig, source: ImageSource, count: int, in_chans: int) -> torch.Tensor:
    """The first ``count`` decodable images, resized, centre-cropped and normalised: (count, C, S, S) float32,
    fixed for a run."""
    transform = EvalTransform(cfg.input_size, cfg.mean, cfg.std)
    mode = MODES_BY_CHANNELS[in_chans]
    if isinstance(source.dataset, datasets.IterableDataset):
        rows = [row[source.image_column] for row in itertools.islice(source.dataset, 4 * count)]
    else:
        rows = [source.dataset[i][source.image_column] for i in range(min(len(source.dataset), 4 * count))]
    images = []
    for row in rows:
        try:
            img, _ = decode_image(row, mode, cfg.max_image_pixels)
        except BadImageError:
            continue
        images.append(transform(img))
        if len(images) == count:
            break
    if not images:
        raise RuntimeError("no decodable image among the first rows of the corpus")
    return torch.stack(images)
