"""Finetuning runs on CPU: learning, EMA + mixup, eval_only, linear probe, head init, layer decay, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fcmae
import models
from fcmae.finetune_config import load_finetune_config
from fcmae.finetuning import build_classifier, layer_decay_scale, run_finetuning
from fcmae.layer_decay import layer_scales
from fcmae.optim import param_groups
from tests.finetune_helpers import labeled_dataset, tiny_config
from tests.helpers import perturb_parameters
from tests.pretrain_helpers import reset_accelerate

SIZE = "convnextv2_test"


@pytest.fixture(autouse=True)
def _one_thread_fresh_accelerate():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: thread overhead dominates
    yield
    torch.set_num_threads(threads)
    reset_accelerate()


@pytest.fixture(scope="module")
def data():
    return labeled_dataset(16), labeled_dataset(8, seed=1)


def _events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_tiny_labeled_set_is_learned_well_above_chance(tmp_path, data):
    metrics = run_finetuning(tiny_config(tmp_path / "run", "train.epochs=6"), *data)
    assert metrics["model"]["count"] == 32
    assert metrics["model"]["top1"] >= 90.0  # chance is 25%
    weights = tmp_path / "run" / "weights"
    assert {p.name for p in weights.iterdir()} == {"best.safetensors", "last.safetensors"}
    assert [e["event"] for e in _events(tmp_path / "run")].count("eval") == 6

    reset_accelerate()  # eval_only on the saved classifier gives the run's final numbers
    again = run_finetuning(tiny_config(tmp_path / "eval", "train.eval_only=true",
                                       f"model.pretrained={weights / 'last.safetensors'}"), eval_dataset=data[1])
    assert again["model"]["top1"] == metrics["model"]["top1"]
    assert again["model"]["loss"] == pytest.approx(metrics["model"]["loss"], rel=1e-5) and again["model"]["loss"] < 1.0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["model"] == again["model"]


def test_ema_mixup_cutmix_randaugment_run(tmp_path, data):
    cfg = tiny_config(tmp_path / "run", "train.epochs=2", "augment.mixup=0.8", "augment.cutmix=1.0",
                      "augment.smoothing=0.1", "augment.auto_augment=rand-m9-mstd0.5-inc1", "augment.reprob=0.25",
                      "ema.enabled=true", "ema.decay=0.9", "optim.layer_decay=0.9", "model.drop_path_rate=0.1")
    metrics = run_finetuning(cfg, *data)
    assert set(metrics) == {"model", "ema"}
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics.values())
    weights = tmp_path / "run" / "weights"
    model, ema = load_file(weights / "last.safetensors"), load_file(weights / "last_ema.safetensors")
    assert model.keys() == ema.keys()
    assert not torch.equal(model["stem.0.weight"], ema["stem.0.weight"])  # an average, not a copy
    losses = [e["train/loss"] for e in _events(tmp_path / "run") if "train/loss" in e]
    assert len(losses) == 8 and all(0 < v < 10 for v in losses)


def _pretrained_encoder(path) -> fcmae.FCMAE:
    model = fcmae.create_fcmae(SIZE, decoder_embed_dim=16)
    perturb_parameters(model)
    save_file(model.state_dict(), path)
    return model


def test_pretrained_encoder_gets_a_small_fresh_head(tmp_path):
    source = _pretrained_encoder(tmp_path / "fcmae.safetensors")
    cfg = tiny_config(tmp_path, f"model.pretrained={tmp_path / 'fcmae.safetensors'}")
    model = build_classifier(cfg.model, num_classes=7)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert 0 < model.head.fc.weight.std() < 4e-5 and not model.head.fc.bias.any()  # official trunc_normal(2e-5)
    assert torch.equal(model.head.norm.weight, torch.ones(32))
    scratch = build_classifier(tiny_config(tmp_path).model, num_classes=7)  # head_init_scale 0.001
    assert 1e-6 < scratch.head.fc.weight.std() < 1e-4


def test_linear_probe_trains_only_the_head(tmp_path, data):
    source = _pretrained_encoder(tmp_path / "fcmae.safetensors")
    cfg = tiny_config(tmp_path / "run", "train.epochs=3", "model.linear_probe=true", "model.drop_path_rate=0.1",
                      f"model.pretrained={tmp_path / 'fcmae.safetensors'}")
    metrics = run_finetuning(cfg, *data)
    trained = load_file(tmp_path / "run" / "weights" / "last.safetensors")
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(trained[key], value), key
    assert trained["head.fc.weight"].std() > 1e-3  # moved far from its 2e-5 start
    assert metrics["model"]["top1"] >= 75.0


def test_layer_decay_reaches_the_optimizer():
    cfg = load_finetune_config(None, ["optim.layer_decay=0.8", "optim.layer_decay_type=single"])
    model = models.create_model("convnextv2_atto", num_classes=10)
    groups = param_groups(model, 0.05, layer_decay_scale(cfg.optim, model.depths))
    assert {round(g["lr_scale"], 12) for g in groups} == {round(s, 12) for s in layer_scales(0.8, 12)[1:]}
    assert layer_decay_scale(load_finetune_config().optim, model.depths) is None


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, data):
    common = ("train.epochs=3", "augment.mixup=0.8", "augment.cutmix=1.0", "augment.reprob=0.25",
              "augment.auto_augment=rand-m9-mstd0.5-inc1", "ema.enabled=true", "ema.decay=0.9",
              "model.drop_path_rate=0.1")
    run_finetuning(tiny_config(tmp_path / "straight", *common), *data)
    reset_accelerate()
    run_finetuning(tiny_config(tmp_path / "cut", *common, "train.max_steps=6"), *data)  # stops inside epoch 2
    reset_accelerate()
    run_finetuning(tiny_config(tmp_path / "cut", *common), *data)
    assert "resume" in [e["event"] for e in _events(tmp_path / "cut")]
    for name in ("last.safetensors", "last_ema.safetensors"):
        straight, resumed = (load_file(tmp_path / run / "weights" / name) for run in ("straight", "cut"))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name
