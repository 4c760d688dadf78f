"""Finetuning data and configuration: sources, official transforms, keyed augmentation, presets, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import models
from fcmae.config import ConfigError
from fcmae.finetune_cli import finetune_main
from fcmae.finetune_config import load_finetune_config
from fcmae.finetune_data import (
    LabeledEvalImages,
    LabeledTrainImages,
    eval_transform,
    load_labeled_source,
    train_transform,
)
from tests.finetune_helpers import class_image, labeled_dataset, write_class_folders
from tests.pretrain_helpers import reset_accelerate

SIZES = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


def test_class_folders_with_split_subfolders(tmp_path):
    root = write_class_folders(tmp_path, "train", per_class=3)
    write_class_folders(tmp_path, "val", per_class=2, seed=1)
    cfg = load_finetune_config(None, [f"data.path={root}", "data.eval_split=val"]).data
    train, val = load_labeled_source(cfg, "train", str(root)), load_labeled_source(cfg, "val", str(root))
    assert (len(train), len(val), train.num_classes) == (12, 8, 4)
    assert train.class_names == ["class_0", "class_1", "class_2", "class_3"]
    with pytest.raises(ConfigError, match="has no validation/ subfolder"):
        load_labeled_source(cfg, "validation", str(root))


def test_image_and_label_columns_from_parquet(tmp_path):
    buffers = []
    for img in (class_image(i % 3, np.random.default_rng(i)) for i in range(6)):
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        buffers.append({"bytes": buffer.getvalue(), "path": None})
    table = datasets.Dataset.from_dict({"picture": buffers, "target": [i % 3 for i in range(6)]},
                                       features=datasets.Features({"picture": datasets.Image(),
                                                                   "target": datasets.Value("int64")}))
    table.to_parquet(str(tmp_path / "train.parquet"))
    cfg = load_finetune_config(None, [f"data.path={tmp_path / 'train.parquet'}", "data.label_column=target"]).data
    source = load_labeled_source(cfg, "train", cfg.path)
    assert (source.images.image_column, source.label_column, source.num_classes) == ("picture", "target", 3)
    with pytest.raises(ConfigError, match=r"no label column among \['picture', 'target'\]"):
        load_labeled_source(load_finetune_config().data, "train", cfg.path)


def test_official_transforms():
    cfg = load_finetune_config()
    names = [type(t).__name__ for t in train_transform(cfg.data, cfg.augment).transforms]
    assert names == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment", "MaybeToTensor",
                     "Normalize", "RandomErasing"]
    erasing = train_transform(cfg.data, cfg.augment).transforms[-1]
    assert (erasing.probability, erasing.mode) == (0.25, "pixel")
    resize, crop = eval_transform(cfg.data).transforms[:2]
    assert (resize.size, crop.size) == (256, (224, 224))  # 224 / (224 / 256)
    assert eval_transform(load_finetune_config(None, ["data.input_size=384"]).data)(
        Image.new("RGB", (500, 300))).shape == (3, 384, 384)


def test_augmentation_is_keyed_by_epoch_and_index_and_broken_files_are_replaced():
    cfg = load_finetune_config(None, ["data.input_size=32"])
    ds = labeled_dataset(2)
    broken = ds.cast_column("image", datasets.Image(decode=False))
    rows = broken.to_dict()
    rows["image"][0] = {"bytes": b"not an image", "path": "broken.jpg"}
    broken = datasets.Dataset.from_dict(rows, features=broken.features)
    source = load_labeled_source(cfg.data, "train", dataset=broken)
    items = LabeledTrainImages(source, train_transform(cfg.data, cfg.augment), cfg.data, in_chans=3, seed=0)
    first, again, other = items[(0, 3)], items[(0, 3)], items[(1, 3)]
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    replaced = items[(0, 0)]
    assert replaced["label"] == source.images.dataset[1]["label"] and replaced["issues"][0][0] == "skipped:corrupt"
    evaluated = LabeledEvalImages(source, eval_transform(cfg.data), 3, 32, cfg.data.max_image_pixels)[0]
    assert evaluated["label"] == -1 and not evaluated["pixel_values"].any()


def test_augmentation_leaves_the_global_rng_alone():
    cfg = load_finetune_config(None, ["data.input_size=32"])
    source = load_labeled_source(cfg.data, "train", dataset=labeled_dataset(1))
    items = LabeledTrainImages(source, train_transform(cfg.data, cfg.augment), cfg.data, in_chans=3, seed=0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    items[(0, 1)]
    assert torch.equal(torch.rand(3), expected)


def test_presets_load_and_match_the_recipes(tmp_path):
    recipes = {size: load_finetune_config(CONFIGS / f"convnextv2_{size}.yaml") for size in SIZES}
    assert {s: r.model.name for s, r in recipes.items()} == {s: f"convnextv2_{s}" for s in SIZES}
    atto, tiny, base = recipes["atto"], recipes["tiny"], recipes["base"]  # official TRAINING.md
    assert (atto.optim.blr, atto.train.epochs, atto.optim.weight_decay, atto.augment.smoothing) == (2e-4, 600, 0.3, 0.2)
    assert (tiny.optim.blr, tiny.optim.warmup_epochs, tiny.model.drop_path_rate) == (8e-4, 40, 0.2)
    assert (base.optim.layer_decay, base.optim.layer_decay_type, base.train.epochs) == (0.6, "group", 100)
    assert all(r.ema.enabled and r.train.batch_size * r.train.gradient_accumulation_steps * 8 == 1024
               for r in recipes.values())
    probe = load_finetune_config(CONFIGS / "linear_probe.yaml", [f"model.pretrained={tmp_path}"])
    assert probe.model.linear_probe and probe.augment.auto_augment is None


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size: must be even with mixup"):
        load_finetune_config(None, ["augment.mixup=0.8", "train.batch_size=15"])
    with pytest.raises(ConfigError, match="model.pretrained: eval_only needs a classifier"):
        load_finetune_config(None, ["train.eval_only=true"])
    with pytest.raises(ConfigError, match="optim.layer_decay: must be in"):
        load_finetune_config(None, ["optim.layer_decay=1.5"])
    with pytest.raises(ConfigError, match="model.pretrained: not found"):
        load_finetune_config(None, [f"model.pretrained={tmp_path / 'missing.pt'}"])


def test_cli_trains_then_evaluates_class_folders(tmp_path, capsys):
    torch.set_num_threads(1)
    root = write_class_folders(tmp_path / "data", "train", per_class=8)
    write_class_folders(tmp_path / "data", "val", per_class=4, seed=1)
    common = ["model.name=convnextv2_test", "data.input_size=32", "data.num_workers=0", "data.eval_split=val",
              f"data.path={root}", "train.batch_size=8", "log.trackers=[]", "log.progress_bar=false"]
    finetune_main(["--config", str(CONFIGS / "convnextv2_atto.yaml"), *common, "train.epochs=1",
                   "train.gradient_accumulation_steps=1", f"output_dir={tmp_path / 'run'}"])
    reset_accelerate()
    weights = tmp_path / "run" / "weights" / "best_ema.safetensors"
    assert models.create_model("convnextv2_test", num_classes=4, pretrained=weights) is not None
    finetune_main([*common, "train.eval_only=true", f"model.pretrained={weights}", f"output_dir={tmp_path / 'eval'}"])
    reset_accelerate()
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["count"] == 16 and 0 <= printed["top1"] <= 100
    with pytest.raises(SystemExit) as exit_info:
        finetune_main([*common, "train.eval_only=true"])
    assert exit_info.value.code == 2 and "config error: model.pretrained" in capsys.readouterr().err


def test_too_few_classes_for_the_labels(tmp_path, capsys):
    root = write_class_folders(tmp_path / "data", "train", per_class=2)
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["model.name=convnextv2_test", "model.num_classes=3", "data.input_size=32", "data.num_workers=0",
                       f"data.path={root}", "data.eval_split=null", "log.trackers=[]", f"output_dir={tmp_path / 'o'}"])
    reset_accelerate()
    assert exit_info.value.code == 2 and "model.num_classes: is 3, but the labels go up to 3" in capsys.readouterr().err


def test_eval_only_refuses_a_classifier_of_other_classes(tmp_path, capsys):
    save_file(models.create_model("convnextv2_test", num_classes=10).state_dict(), tmp_path / "cls10.safetensors")
    root = write_class_folders(tmp_path / "data", "val", per_class=1)
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["model.name=convnextv2_test", "data.input_size=32", "data.num_workers=0", f"data.path={root}",
                       "data.eval_split=val", "train.eval_only=true", "log.trackers=[]",
                       f"model.pretrained={tmp_path / 'cls10.safetensors'}", f"output_dir={tmp_path / 'out'}"])
    reset_accelerate()
    assert exit_info.value.code == 2 and "mis-shaped (2): head.fc.bias" in capsys.readouterr().err


def test_randaugment_posterize_at_full_magnitude_runs():
    """The finetune presets' RandAugment can draw magnitude 10, i.e. posterize to 0 bits (Pillow >= 13 rejects it)."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert op(Image.new("RGB", (32, 32), (200, 100, 50))).size == (32, 32)
