"""The optimizer step's gradient norm and clipping: torch's numbers, with less host work."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from fcmae.grad_norm import clip_gradients
from tests.pretrain_helpers import reset_accelerate


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    reset_accelerate()


def model_with_grads(scale: float = 1.0) -> nn.Module:
    """Conv, norm and linear layers (one of them frozen) with gradients of about ``scale``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    model[1].weight.requires_grad_(False)
    (model(torch.randn(4, 3, 8, 8)).pow(2).sum() * scale).backward()
    return model


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("max_norm", [None, 1e-3, 1e6])
def test_norm_and_clipped_gradients_match_torch(max_norm):
    model, reference = model_with_grads(), model_with_grads()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm or math.inf)
    norm = clip_gradients(Accelerator(cpu=True), model.parameters(), max_norm)
    assert norm.shape == () and norm.dtype == torch.float32
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    if max_norm == 1e-3:  # clipping did happen
        clipped = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads_of(model)]))
        assert clipped.item() == pytest.approx(1e-3, rel=1e-4)


def test_no_limit_leaves_the_gradients_as_they_were():
    model = model_with_grads()
    before = [g.clone() for g in grads_of(model)]
    clip_gradients(Accelerator(cpu=True), model.parameters(), None)
    assert all(torch.equal(a, g) for a, g in zip(before, grads_of(model), strict=True))


def test_a_non_finite_gradient_gives_a_non_finite_norm_and_no_error():
    model = model_with_grads()
    model[0].weight.grad[0, 0, 0, 0] = math.inf
    assert not math.isfinite(clip_gradients(Accelerator(cpu=True), model.parameters(), 1.0).item())


def test_no_gradients_give_a_zero_norm():
    model = nn.Linear(3, 2)
    norm = clip_gradients(Accelerator(cpu=True), model.parameters(), 1.0)
    assert norm.item() == 0.0


def test_gradients_are_unscaled_before_the_norm(monkeypatch):
    acc, model = Accelerator(cpu=True), model_with_grads(scale=1024.0)
    unscaled = model_with_grads()

    def unscale(optimizer=None):  # what accelerate's fp16 scaler does, at a scale of 1024
        torch._foreach_div_(grads_of(model), 1024.0)

    monkeypatch.setattr(acc, "unscale_gradients", unscale)
    expected = torch.nn.utils.clip_grad_norm_(unscaled.parameters(), math.inf)
    torch.testing.assert_close(clip_gradients(acc, model.parameters(), None), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA])
def test_sharded_gradients_go_through_accelerate(monkeypatch, kind):
    acc, model, reference = Accelerator(cpu=True), model_with_grads(), model_with_grads()
    calls = []

    def recording_clip(params, max_norm):
        calls.append((list(params), max_norm))
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    monkeypatch.setattr(type(acc), "distributed_type", property(lambda self: kind))
    monkeypatch.setattr(acc, "clip_grad_norm_", recording_clip)
    norm = clip_gradients(acc, model.parameters(), None)
    assert len(calls) == 1 and calls[0][1] == math.inf and len(calls[0][0]) == len(list(model.parameters()))
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(reference.parameters(), math.inf))
