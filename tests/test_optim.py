"""Weight-decay groups (the exact no-decay set) and the step-based learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fcmae
from fcmae.optim import LrSchedule, apply_lr, build_adamw, no_weight_decay_names, param_groups, scaled_lr


@pytest.fixture(scope="module")
def model():
    return fcmae.create_fcmae("convnextv2_test", decoder_embed_dim=16, decoder_depth=1)


def test_no_decay_set_is_biases_norms_grn_and_mask_token(model):
    names = no_weight_decay_names(model)
    params = dict(model.named_parameters())
    # Independent description of the same set: every 1-D parameter, plus the 4-D mask token.
    assert names == {n for n, p in params.items() if p.ndim <= 1} | {"mask_token"}
    decayed = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    assert set(params) - names == decayed
    for expected in ("mask_token", "encoder.stem.1.weight", "encoder.stages.1.downsample.0.bias",
                     "encoder.stages.0.blocks.0.norm.weight", "encoder.stages.0.blocks.0.mlp.grn.weight",
                     "encoder.stages.0.blocks.0.mlp.grn.bias", "decoder.0.mlp.grn.weight", "pred.bias"):
        assert expected in names
    assert "encoder.stem.0.weight" not in names and "decoder.0.mlp.fc1.weight" not in names


def test_param_groups_carry_decay_and_lr_scale(model):
    groups = param_groups(model, 0.05, lr_scale=lambda name: 0.5 if name.startswith("encoder.") else 1.0)
    by_key = {(g["weight_decay"], g["lr_scale"]): g for g in groups}
    assert set(by_key) == {(0.05, 0.5), (0.0, 0.5), (0.05, 1.0), (0.0, 1.0)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert model.mask_token in by_key[(0.0, 1.0)]["params"]
    optimizer = build_adamw(model, lr=1.0, lr_scale=lambda name: 0.5 if name.startswith("encoder.") else 1.0)
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    apply_lr(optimizer, 2e-3)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [1e-3, 2e-3]


def test_frozen_parameters_are_left_out():
    net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    net[0].weight.requires_grad_(False)
    groups = param_groups(net, 0.1)
    assert sum(len(g["params"]) for g in groups) == 3


def test_linear_scaling_rule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)


def test_schedule_warmup_then_cosine_to_min_lr():
    sched = LrSchedule(base_lr=1e-3, min_lr=1e-5, warmup_steps=10, total_steps=110)
    assert sched(0) == 0.0
    assert sched(5) == pytest.approx(5e-4)
    assert sched(10) == pytest.approx(1e-3)
    assert sched(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert sched(110) == pytest.approx(1e-5) and sched(500) == pytest.approx(1e-5)
    values = [sched(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_schedule_matches_official_fractional_epoch_rule():
    """convnextv2.md §5a: lr at fractional epoch e = i / steps_per_epoch, warmup and cosine in epochs."""
    steps_per_epoch, epochs, warmup, lr, min_lr = 7, 20, 3, 2.4e-3, 1e-6
    sched = LrSchedule(lr, min_lr, warmup * steps_per_epoch, epochs * steps_per_epoch)
    for i in range(epochs * steps_per_epoch):
        e = i / steps_per_epoch
        if e < warmup:
            official = lr * e / warmup
        else:
            official = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
        assert sched(i) == pytest.approx(official, rel=1e-12, abs=1e-15)


def test_schedule_is_a_pure_function_of_the_step():
    sched = LrSchedule(1e-3, 0.0, 3.5, 20)
    assert [sched(s) for s in range(20)] == [sched(s) for s in range(20)]
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.0)
    apply_lr(opt, sched(7))
    assert opt.param_groups[0]["lr"] == sched(7)
