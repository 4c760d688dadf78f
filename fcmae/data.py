"""Image data through Hugging Face ``datasets``: sources, torch datasets, sampling and loading.

Reusable pieces (finetuning builds on them):

* :func:`load_image_source` / :func:`image_folder_dataset`: a ``datasets.Dataset`` (or streaming
  ``IterableDataset``) plus the name of its image column, images left undecoded.
* :class:`PretrainImages`, :class:`StreamingPretrainImages`, :class:`LabeledImages`: torch datasets
  that decode with :mod:`fcmae.images` (training images as uint8, JPEGs at reduced size where the crop
  allows, see :class:`fcmae.transforms.PretrainTransform`), so a broken file is skipped and reported,
  never fatal.
* :func:`collate_examples`: stacks ``pixel_values`` (and ``label``) and gathers the ``issues``.
* :class:`EpochBatchSampler` and :class:`PretrainLoader`: the same number of micro-batches on every
  process, in an order that is a pure function of (seed, epoch), resumable at any batch.
"""

from __future__ import annotations

import glob
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor
from torch.utils.data import default_collate, get_worker_info

from fcmae.config import ConfigError
from fcmae.images import (
    MODES_BY_CHANNELS,
    BadImageError,
    decode_image,
    open_image,
    scan_image_folder,
    source_name,
)
from fcmae.pretrain_config import DataConfig
from fcmae.transforms import PretrainTransform, keyed_generator

IMAGE_COLUMN_NAMES = ("image", "img", "image_path", "path", "file", "filepath")
Issue = tuple[str, str, str]  # (kind, path, detail); kind "skipped:<why>" or "converted:<what>"


class CorpusError(RuntimeError):
    """Too many files in a row could not be decoded: the source is probably not an image corpus."""


@dataclass
class ImageSource:
    """A dataset with undecoded images in ``image_column``; ``problems`` found while listing files."""

    dataset: datasets.Dataset | datasets.IterableDataset
    image_column: str
    problems: list[Issue]


def top_folders(paths: list[str], root: str | Path) -> list[str | None]:
    """The subfolder of ``root`` that holds each of ``paths`` (None for a file in ``root`` itself).

    ``paths`` are :func:`fcmae.images.scan_image_folder`'s, which all begin with ``root`` as given; cutting
    strings takes a fraction of a second for ImageNet's 1.28M files, where ``Path.relative_to`` took 13 s.
    """
    start = len(os.path.join(str(root), ""))
    return [rel.split(os.sep, 1)[0] if os.sep in rel else None for rel in (p[start:] for p in paths)]


def image_folder_dataset(root: str | Path, with_labels: bool = False) -> ImageSource:
    """Every image below ``root`` as a dataset of paths (column ``image``).

    With ``with_labels`` a ``label`` column holds the index of each file's top-level subfolder
    (class names sorted, as ``datasets.ClassLabel``).
    """
    paths, problems = scan_image_folder(root)
    issues = [("skipped:unreadable", p, why) for p, why in problems]
    if not paths:
        raise ConfigError("data.path", f"no image files under {root} (extensions: jpg, png, webp, ...)")
    columns: dict[str, list] = {"image": paths}
    features = {"image": datasets.Value("string")}
    if with_labels:
        classes = top_folders(paths, root)
        names = sorted(set(classes) - {None})
        if None in classes or not names:
            raise ConfigError("path", f"{root} must hold one subfolder per class, with images inside")
        index = {name: i for i, name in enumerate(names)}
        columns["label"] = [index[name] for name in classes]
        features["label"] = datasets.ClassLabel(names=names)
    return ImageSource(datasets.Dataset.from_dict(columns, features=datasets.Features(features)), "image", issues)


def load_image_source(cfg: DataConfig, dataset: datasets.Dataset | None = None, num_shards: int = 1) -> ImageSource:
    """Open the corpus ``cfg`` names (or wrap ``dataset``), images undecoded, streaming if asked.

    Args:
        cfg: data section of the config.
        dataset: an in-memory ``datasets.Dataset`` to use instead of ``cfg``'s source.
        num_shards: shards when a map-style source is turned into a stream (processes x workers).
    """
    from fcmae.sample_corpus import sample_corpus

    problems: list[Issue] = []
    if dataset is not None:
        ds = dataset
    elif cfg.generated_images:
        ds = sample_corpus(cfg.generated_images)
    elif cfg.name is not None:
        ds = datasets.load_dataset(cfg.name, cfg.config_name, split=cfg.split, streaming=cfg.streaming)
    elif Path(cfg.path).is_dir() and not _is_saved_dataset(Path(cfg.path)):
        source = image_folder_dataset(cfg.path)
        ds, problems = source.dataset, source.problems
    else:
        ds = _load_files(cfg.path, cfg.split, cfg.streaming)
    column = find_image_column(ds, cfg.image_column)
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    if cfg.streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset(num_shards=min(num_shards, len(ds)))
    return ImageSource(ds, column, problems)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def _load_files(path: str, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    if Path(path).is_dir():
        ds = datasets.load_from_disk(path)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return ds
    files = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path]
    suffixes = {Path(f).suffix for f in files}
    if suffixes not in ({".parquet"}, {".arrow"}):
        raise ConfigError("data.path", f"expected .parquet or .arrow files (or a folder), got {sorted(suffixes)}")
    builder = "parquet" if suffixes == {".parquet"} else "arrow"
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming)


def find_image_column(ds: datasets.Dataset | datasets.IterableDataset, requested: str | None) -> str:
    """``requested``, else the first ``datasets.Image`` column, else a column named like an image path."""
    features = ds.features or {}
    if requested is not None:
        if requested not in features:
            raise ConfigError("data.image_column", f"no column {requested!r}; columns: {sorted(features)}")
        return requested
    typed = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    named = [name for name in IMAGE_COLUMN_NAMES if name in features]
    if not typed and not named:
        raise ConfigError("data.image_column", f"no image column found in {sorted(features)}; set data.image_column")
    return (typed or named)[0]


def decode_first_good(sources: Callable[[int], Any], start: int, count: int, mode: str, max_pixels: int,
                      max_bad_in_a_row: int) -> tuple[Any, Any, list[Issue]]:
    """Decode ``sources(start)`` with :func:`decode_image`, moving on past broken files (see :func:`first_good`).

    Returns:
        (image, source, issues): issues name every skipped file and the conversions applied.
    """
    return first_good(sources, start, count, lambda source: decode_image(source, mode, max_pixels),
                      max_bad_in_a_row)


def first_good(sources: Callable[[int], Any], start: int, count: int,
               decode: Callable[[Any], tuple[Any, list[str]]], max_bad_in_a_row: int) -> tuple[Any, Any, list[Issue]]:
    """``decode(sources(start))``, moving to the next index (mod ``count``) past broken files.

    Args:
        decode: source -> (result, conversion notes); raises BadImageError for a broken file.

    Returns:
        (result, source, issues): issues name every skipped file and the conversions applied.

    Raises:
        CorpusError: ``max_bad_in_a_row`` consecutive files could not be decoded.
    """
    issues: list[Issue] = []
    for attempt in range(max_bad_in_a_row):
        source = sources((start + attempt) % count)
        try:
            result, notes = decode(source)
        except BadImageError as e:
            issues.append((f"skipped:{e.kind}", source_name(source), str(e)))
            continue
        return result, source, issues + [(f"converted:{n}", source_name(source), n) for n in notes]
    raise CorpusError(
        f"{max_bad_in_a_row} consecutive files could not be decoded (from index {start}, last: {issues[-1][1]}: "
        f"{issues[-1][2]}); is this an image corpus? Raise data.max_bad_in_a_row to tolerate more."
    )


class PretrainImages(torch.utils.data.Dataset):
    """Map-style training images; item key (epoch, index) -> ``{"pixel_values": (C, S, S) uint8, "issues"}``.

    A broken file is replaced by the next decodable one, so batches keep their size on every process;
    the replacement is augmented with the generator of the original key.
    """

    def __init__(self, source: ImageSource, transform: PretrainTransform, cfg: DataConfig, in_chans: int, seed: int):
        self.dataset, self.column, self.transform = source.dataset, source.image_column, transform
        self.mode, self.seed = MODES_BY_CHANNELS[in_chans], seed
        self.max_pixels, self.max_bad = cfg.max_image_pixels, cfg.max_bad_in_a_row

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key

        def augment(source: Any) -> tuple[Tensor, list[str]]:
            generator = keyed_generator(self.seed, epoch, index)
            return self.transform(open_image(source, self.max_pixels), generator, self.mode)

        x, _, issues = first_good(lambda i: self.dataset[i][self.column], index, len(self), augment, self.max_bad)
        return {"pixel_values": x, "issues": issues}


class StreamingPretrainImages(torch.utils.data.IterableDataset):
    """Streaming training images (already split across processes), uint8 like :class:`PretrainImages`;
    broken files are dropped.

    ``set_epoch(epoch, skip_batches)`` reshuffles and skips the batches a resumed run has seen
    (counted in raw examples: exact unless broken files were dropped before the resume point).
    """

    def __init__(self, source: ImageSource, transform: PretrainTransform, cfg: DataConfig, in_chans: int,
                 seed: int, rank: int, batch_size: int):
        self.dataset, self.column, self.transform = source.dataset, source.image_column, transform
        self.mode, self.seed, self.rank, self.batch_size = MODES_BY_CHANNELS[in_chans], seed, rank, batch_size
        self.max_pixels = cfg.max_image_pixels
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        own_skipped = max(0, self.skip_batches - worker + workers - 1) // workers  # batches k with k % workers == w
        pending: list[Issue] = []
        for position, example in enumerate(itertools.islice(self.dataset, own_skipped * self.batch_size, None)):
            source = example[self.column]
            key = keyed_generator(self.seed, self.epoch, self.rank, worker, position)
            try:
                x, notes = self.transform(open_image(source, self.max_pixels), key, self.mode)
            except BadImageError as e:
                pending.append((f"skipped:{e.kind}", source_name(source), str(e)))
                continue
            issues = pending + [(f"converted:{n}", source_name(source), n) for n in notes]
            pending = []
            yield {"pixel_values": x, "issues": issues}


class LabeledImages(torch.utils.data.Dataset):
    """Map-style labeled images for evaluation or finetuning; a broken file yields an item with issues only.

    Args:
        source: dataset with an image column.
        label_column: integer class column.
        transform: PIL image -> (C, S, S) tensor.
        in_chans: 1, 3 or 4.
        max_pixels: decompression-bomb guard.
    """

    def __init__(self, source: ImageSource, label_column: str, transform: Callable, in_chans: int = 3,
                 max_pixels: int = 89_478_485):
        self.dataset, self.column, self.label_column = source.dataset, source.image_column, label_column
        self.transform, self.mode, self.max_pixels = transform, MODES_BY_CHANNELS[in_chans], max_pixels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[index]
        source = row[self.column]
        try:
            img, notes = decode_image(source, self.mode, self.max_pixels)
        except BadImageError as e:
            return {"issues": [(f"skipped:{e.kind}", source_name(source), str(e))]}
        issues = [(f"converted:{n}", source_name(source), n) for n in notes]
        return {"pixel_values": self.transform(img), "label": int(row[self.label_column]), "issues": issues}


def collate_examples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values`` into (B, C, S, S) of the items' dtype, and any other per-item values; drop
    items without pixels.

    Returns:
        ``{"pixel_values": Tensor, ..., "issues": list of (kind, path, detail)}``; ``pixel_values``
        is empty (0, ...) when every item was broken.
    """
    issues = [issue for item in items for issue in item.get("issues", ())]
    good = [item for item in items if "pixel_values" in item]
    if not good:
        return {"pixel_values": torch.empty(0), "issues": issues}
    batch = {key: torch.as_tensor([item[key] for item in good]) for key in good[0] if key not in ("pixel_values",
                                                                                                     "issues")}
    # default_collate stacks straight into shared memory inside a worker: one copy less on the way out.
    batch["pixel_values"] = default_collate([item["pixel_values"] for item in good])
    batch["issues"] = issues
    return batch
