"""The shared optimizer step: where the finiteness check runs, and what a skipped step leaves behind."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn

import fcmae.engine
from fcmae.engine import optimizer_step
from fcmae.optim import build_adamw
from fcmae.run_state import TrainState
from tests.pretrain_helpers import reset_accelerate


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    reset_accelerate()


def prepared(fused: bool):
    """A tiny model and AdamW (fused or per-tensor) prepared by a CPU accelerator, with gradients from one
    backward pass."""
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    optimizer = build_adamw(model, lr=1e-2) if fused else torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = acc.prepare(model, optimizer)
    loss = model(torch.randn(16, 4)).pow(2).mean()
    acc.backward(loss)
    return acc, model, optimizer, loss.detach()


def record_order(monkeypatch, optimizer) -> list[str]:
    """What happens, in order: the optimizer's step (with the found_inf flag it saw) and host reads."""
    order: list[str] = []
    inner = optimizer.optimizer
    step, read, start_read = inner.step, fcmae.engine.host_values, fcmae.engine.start_host_read

    def recording_step(*args, **kwargs):
        flag = getattr(inner, "found_inf", None)
        order.append("step" if flag is None else f"step(found_inf={flag.item():g})")
        return step(*args, **kwargs)

    def recording_read(*args):
        order.append("read")
        return read(*args)

    def recording_start_read(*args):
        order.append("copy to host")
        return start_read(*args)

    monkeypatch.setattr(inner, "step", recording_step)
    monkeypatch.setattr(fcmae.engine, "host_values", recording_read)
    monkeypatch.setattr(fcmae.engine, "start_host_read", recording_start_read)
    return order


def adam_moments(optimizer) -> list[torch.Tensor]:
    """Every parameter's first and second moment, in a fixed order."""
    return [s[key] for s in optimizer.optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]


def take_step(acc, model, optimizer, loss, state=None):
    return optimizer_step(acc, model, optimizer, lambda step: 1e-2, state or TrainState(), loss, global_batch=16,
                          clip_grad=1.0, stop_after_nonfinite=3)


def test_a_fused_optimizer_queues_its_step_before_the_host_reads_loss_and_norm(monkeypatch):
    acc, model, optimizer, loss = prepared(fused=True)
    order = record_order(monkeypatch, optimizer)
    stats = take_step(acc, model, optimizer, loss)
    assert order == ["step(found_inf=0)", "copy to host"]
    assert stats.loss == pytest.approx(loss.item()) and not stats.skipped
    assert not hasattr(optimizer.optimizer, "found_inf")  # the flag lives for one step only
    assert all(p.grad is None for p in model.parameters())


def test_a_per_tensor_optimizer_is_checked_on_the_host_first(monkeypatch):
    acc, model, optimizer, loss = prepared(fused=False)
    order = record_order(monkeypatch, optimizer)
    take_step(acc, model, optimizer, loss)
    assert order == ["read", "step"]
    order.clear()
    stats = take_step(acc, model, optimizer, loss * math.nan)
    assert order == ["read"] and stats.skipped  # no step at all


def test_a_step_skipped_on_the_device_leaves_weights_moments_and_step_counts_alone():
    acc, model, optimizer, loss = prepared(fused=True)
    take_step(acc, model, optimizer, loss)  # one real step, so that there are moments to keep
    acc.backward(model(torch.randn(16, 4)).pow(2).mean())
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [v.clone() for v in adam_moments(optimizer)]
    steps = [s["step"].item() for s in optimizer.optimizer.state.values()]
    state = TrainState()
    stats = take_step(acc, model, optimizer, loss * math.inf, state)
    assert stats.skipped and math.isinf(stats.loss)
    assert (state.nonfinite_in_a_row, state.nonfinite_total, state.step) == (1, 1, 1)
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))
    assert [s["step"].item() for s in optimizer.optimizer.state.values()] == steps == [1.0] * len(steps)
    assert all(torch.equal(m, kept) for m, kept in zip(moments, adam_moments(optimizer), strict=True))
    assert all(p.grad is None for p in model.parameters())


class RecordingScaler:
    def __init__(self):
        self.updates = 0

    def update(self):
        self.updates += 1


@pytest.mark.parametrize(("loss", "norm", "steps", "updates", "overflow"), [
    (1.0, 2.0, 1, 0, False),  # an ordinary step
    (1.0, math.inf, 1, 0, True),  # fp16 overflow: stepped through the scaler, which skips it itself
    (math.nan, 2.0, 0, 1, False),  # a non-finite loss: no step, but the scaler still backs off
])
def test_under_a_grad_scaler_the_host_decides_and_overflow_is_the_scalers_business(loss, norm, steps, updates,
                                                                                   overflow):
    scaler, stepped = RecordingScaler(), []
    accelerator = type("FakeAccelerator", (), {"scaler": scaler})()
    optimizer = type("FakeOptimizer", (), {"step": lambda self: stepped.append(1),
                                           "zero_grad": lambda self, set_to_none: None})()
    out = fcmae.engine.step_checked_on_host(accelerator, optimizer, torch.tensor(loss), torch.tensor(norm))
    assert out[2] is overflow and (len(stepped), scaler.updates) == (steps, updates)
