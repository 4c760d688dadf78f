"""Data: sources through datasets, decoding, transforms, sampling across processes, broken files."""

from __future__ import annotations

import io

import datasets
import pytest
import torch
from PIL import Image

from fcmae.config import ConfigError
from fcmae.data import (
    CorpusError,
    LabeledImages,
    PretrainImages,
    collate_examples,
    image_folder_dataset,
    load_image_source,
)
from fcmae.images import BadImageError, DataIssues, decode_image, scan_image_folder
from fcmae.loader import EpochBatchSampler, build_pretrain_loader, preview_images
from fcmae.pretrain_config import DataConfig
from fcmae.transforms import EvalTransform, PretrainTransform, keyed_generator, sample_crop_box
from tests.pretrain_helpers import random_image, write_images


def data_cfg(**kw) -> DataConfig:
    base = dict(generated_images=8, input_size=32, num_workers=0)
    return DataConfig(**{**base, **kw})


def test_folder_is_scanned_recursively_sorted_images_only(tmp_path):
    write_images(tmp_path / "a" / "deep", 2)
    write_images(tmp_path / "b", 2, ext="jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "gone.png").symlink_to(tmp_path / "missing.png")
    paths, problems = scan_image_folder(tmp_path)
    assert [p.split(str(tmp_path))[1] for p in paths] == [
        "/a/deep/img_000.png", "/a/deep/img_001.png", "/b/img_000.jpg", "/b/img_001.jpg"]
    assert problems == [(str(tmp_path / "b" / "gone.png"), "not a regular file (dangling link, pipe or device)")]


def test_folder_with_class_subfolders_gets_labels_when_asked(tmp_path):
    write_images(tmp_path, 6, classes=3)
    source = image_folder_dataset(tmp_path, with_labels=True)
    assert source.dataset.features["label"].names == ["class_0", "class_1", "class_2"]
    assert source.dataset["label"] == [0, 0, 1, 1, 2, 2]
    unlabeled = load_image_source(data_cfg(generated_images=0, path=str(tmp_path)))
    assert unlabeled.dataset.column_names == ["image"] and len(unlabeled.dataset) == 6


def test_labels_come_from_the_top_level_subfolder_however_deep_the_file(tmp_path):
    write_images(tmp_path / "cat" / "indoor", 2)
    write_images(tmp_path / "dog", 1)
    source = image_folder_dataset(f"{tmp_path}/", with_labels=True)  # a trailing slash changes nothing
    assert source.dataset.features["label"].names == ["cat", "dog"]
    assert source.dataset["label"] == [0, 0, 1]


def test_labeled_folder_with_a_file_outside_the_class_subfolders_is_a_config_error(tmp_path):
    write_images(tmp_path / "cat", 2)
    random_image(9).save(tmp_path / "stray.png")
    with pytest.raises(ConfigError, match="must hold one subfolder per class"):
        image_folder_dataset(tmp_path, with_labels=True)


def test_parquet_arrow_and_saved_datasets_load(tmp_path):
    images = [random_image(i) for i in range(5)]
    ds = datasets.Dataset.from_dict({"picture": images, "caption": list("abcde")},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    ds.to_parquet(str(tmp_path / "part-0.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (str(tmp_path / "*.parquet"), str(tmp_path / "saved"),
                 str(next((tmp_path / "saved").glob("*.arrow")))):
        source = load_image_source(data_cfg(generated_images=0, path=path))
        assert source.image_column == "picture" and len(source.dataset) == 5
        row = source.dataset[0]["picture"]
        assert isinstance(row, dict) and row["bytes"]  # left undecoded: decoding is ours
    with pytest.raises(ConfigError, match="data.image_column: no column 'img'"):
        load_image_source(data_cfg(generated_images=0, path=str(tmp_path / "saved"), image_column="img"))


def test_dataset_name_with_split_goes_through_load_dataset(tmp_path):
    # A local dataset repository stands in for a hub name (tests never download).
    (tmp_path / "data").mkdir()
    for split, count in (("train", 4), ("test", 2)):
        ds = datasets.Dataset.from_dict({"image": [random_image(i) for i in range(count)]},
                                        features=datasets.Features({"image": datasets.Image()}))
        ds.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))
    source = load_image_source(data_cfg(generated_images=0, name=str(tmp_path), split="test"))
    assert len(source.dataset) == 2 and source.image_column == "image"


def test_streaming_source_is_an_iterable_dataset(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [random_image(i) for i in range(6)]},
                                    features=datasets.Features({"image": datasets.Image()}))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    source = load_image_source(data_cfg(generated_images=0, path=str(tmp_path / "train.parquet"), streaming=True))
    assert isinstance(source.dataset, datasets.IterableDataset)
    assert sum(1 for _ in source.dataset) == 6
    loader = build_pretrain_loader(data_cfg(generated_images=0, streaming=True, num_samples=6), source, in_chans=3,
                                   batch_size=2, accumulation=1, rank=0, world_size=1, seed=0)
    batches = list(loader.epoch(0))
    assert len(batches) == 3 and batches[0]["pixel_values"].shape == (2, 3, 32, 32)


def test_decode_converts_and_reports(tmp_path):
    img, notes = decode_image(random_image(0, mode="L"), "RGB")
    assert img.mode == "RGB" and notes == ["channels"]
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    img, notes = decode_image(rgba, "RGB")
    assert img.getpixel((0, 0)) == (255, 255, 255) and notes == ["alpha"]
    buffer = io.BytesIO()
    random_image(1).save(buffer, "PNG")
    img, notes = decode_image({"bytes": buffer.getvalue(), "path": "x.png"}, "L")
    assert img.mode == "L" and notes == ["channels"]


@pytest.mark.parametrize("payload, kind", [(b"", "corrupt"), (b"hello, not an image", "corrupt")])
def test_decode_refuses_non_images(tmp_path, payload, kind):
    path = tmp_path / "fake.jpg"
    path.write_bytes(payload)
    with pytest.raises(BadImageError) as info:
        decode_image(str(path))
    assert info.value.kind == kind


def test_crop_box_is_valid_and_keyed():
    for seed in range(50):
        top, left, h, w = sample_crop_box(60, 90, (0.2, 1.0), (3 / 4, 4 / 3), keyed_generator(seed))
        assert 0 <= top <= 60 - h and 0 <= left <= 90 - w and h > 0 and w > 0
    assert sample_crop_box(60, 90, (0.2, 1), (0.75, 1.3), keyed_generator(3)) == \
        sample_crop_box(60, 90, (0.2, 1), (0.75, 1.3), keyed_generator(3))


def test_pretrain_transform_shape_dtype_and_determinism():
    t = PretrainTransform(32, (0.2, 1.0), (3 / 4, 4 / 3), 0.5)
    img = random_image(0)
    a, notes = t(img, keyed_generator(1, 2, 3))
    b, _ = t(img, keyed_generator(1, 2, 3))
    c, _ = t(img, keyed_generator(1, 2, 4))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8 and notes == []
    assert torch.equal(a, b) and not torch.equal(a, c)
    _, notes = t(random_image(0, size=(20, 40)), keyed_generator(0))
    assert notes == ["small"]
    white = EvalTransform(32, (0.5,) * 3, (0.5,) * 3)(Image.new("RGB", (50, 40), (255, 255, 255)))
    assert white.shape == (3, 32, 32) and torch.allclose(white, torch.ones_like(white))


def test_sampler_shards_disjointly_and_resumes_mid_epoch():
    world, batch, per_epoch = 3, 4, 2
    samplers = [EpochBatchSampler(25, batch, per_epoch, r, world, seed=7) for r in range(world)]
    seen = [i for s in samplers for b in s for _, i in b]
    assert len(seen) == world * batch * per_epoch == len(set(seen))
    full = list(samplers[1])
    samplers[1].set_epoch(0, start_batch=1)
    assert list(samplers[1]) == full[1:]
    samplers[1].set_epoch(1)
    assert list(samplers[1]) != full and all(e == 1 for b in samplers[1] for e, _ in b)


def test_broken_files_are_replaced_counted_and_named(tmp_path, caplog):
    write_images(tmp_path, 4)
    (tmp_path / "img_001.png").write_bytes(b"garbage")
    (tmp_path / "img_002.png").write_bytes(b"")
    source = load_image_source(data_cfg(generated_images=0, path=str(tmp_path)))
    t = PretrainTransform(32, (0.2, 1.0), (3 / 4, 4 / 3), 0.5)
    ds = PretrainImages(source, t, data_cfg(), in_chans=3, seed=0)
    batch = collate_examples([ds[(0, i)] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    skipped = [(kind, path.rsplit("/", 1)[1]) for kind, path, _ in batch["issues"] if kind.startswith("skipped")]
    assert skipped == [("skipped:corrupt", "img_001.png"), ("skipped:corrupt", "img_002.png"),
                       ("skipped:corrupt", "img_002.png")]
    issues = DataIssues(named_per_kind=2)
    with caplog.at_level("INFO"):
        issues.record(batch["issues"])
    assert issues.summary() == "3 images skipped (corrupt 3); 0 converted"
    assert sum("img_00" in r.message for r in caplog.records) == 2 and "counting only" in caplog.text


def test_all_broken_stops_with_a_clear_message(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_text("text")
    source = load_image_source(data_cfg(generated_images=0, path=str(tmp_path)))
    t = PretrainTransform(32, (0.2, 1.0), (3 / 4, 4 / 3), 0.5)
    with pytest.raises(CorpusError, match="3 consecutive files could not be decoded"):
        PretrainImages(source, t, data_cfg(max_bad_in_a_row=3), in_chans=3, seed=0)[(0, 0)]


def test_labeled_images_drop_broken_items(tmp_path):
    write_images(tmp_path, 4, classes=2)
    (tmp_path / "class_1" / "img_001.png").write_bytes(b"junk")
    source = image_folder_dataset(tmp_path, with_labels=True)
    ds = LabeledImages(source, "label", EvalTransform(32, (0.5,) * 3, (0.5,) * 3))
    batch = collate_examples([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["label"].tolist() == [0, 0, 1]
    assert [kind for kind, _, _ in batch["issues"]] == ["skipped:corrupt"]


def test_too_small_corpus_is_a_config_error():
    source = load_image_source(data_cfg(generated_images=3))
    with pytest.raises(ConfigError, match="3 images, fewer than one optimizer step of 8"):
        build_pretrain_loader(data_cfg(), source, in_chans=3, batch_size=2, accumulation=2, rank=0, world_size=2,
                              seed=0)


def test_preview_images_are_fixed(tmp_path):
    source = load_image_source(data_cfg(generated_images=5))
    a = preview_images(data_cfg(), source, 3, in_chans=3)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, preview_images(data_cfg(), source, 3, in_chans=3))
