"""Numerical trouble: non-finite losses or gradients skip the step (counted) or stop the run; a
checkpoint is never written from non-finite weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import fcmae.model
from fcmae.cli import pretrain_main
from fcmae.engine import NonFiniteLossError, NonFiniteWeightsError
from fcmae.pretraining import run_pretraining
from fcmae.run_state import is_complete_checkpoint
from tests.pretrain_helpers import TINY, reset_accelerate, tiny_config

RECIPE = ["data.generated_images=16", "train.epochs=2", "checkpoint.every_steps=1", "checkpoint.keep_last=20",
          "train.stop_after_nonfinite=2"]


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    reset_accelerate()


def poison_training_steps(monkeypatch, steps: set[int], what: str = "loss") -> None:
    """Make the loss (or one parameter's gradient) non-finite at the given 1-based training forwards."""
    original = fcmae.model.FCMAE.forward
    calls = {"n": 0}

    def forward(self, imgs, mask=None, generator=None):
        out = original(self, imgs, mask, generator)
        if not self.training:
            return out
        calls["n"] += 1
        if calls["n"] not in steps:
            return out
        if what == "loss":
            return out._replace(loss=out.loss * math.nan)
        def once(grad):
            handle.remove()
            return torch.full_like(grad, math.inf)

        handle = self.pred.bias.register_hook(once)
        return out

    monkeypatch.setattr(fcmae.model.FCMAE, "forward", forward)


def checkpoint_weights(run_dir, step):
    return load_file(run_dir / "checkpoints" / f"checkpoint_{step:08d}" / "model.safetensors")


def events(run_dir, name):
    return [e for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if e["event"] == name]


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch, what):
    poison_training_steps(monkeypatch, {3, 5}, what)
    run_dir = run_pretraining(tiny_config(tmp_path / "run", *RECIPE))
    assert events(run_dir, "end")[0]["skipped_steps"] == 2
    skipped = {m["step"]: m["train/skipped_steps"] for m in events(run_dir, "metrics")}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2, 8: 2}
    before, after = checkpoint_weights(run_dir, 2), checkpoint_weights(run_dir, 3)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed nothing
    assert not all(torch.equal(after[k], checkpoint_weights(run_dir, 4)[k]) for k in after)
    assert all(torch.isfinite(t).all() for t in load_file(run_dir / "weights" / "fcmae.safetensors").values())


def test_nonfinite_steps_in_a_row_stop_the_run_with_a_message(tmp_path, monkeypatch, capsys):
    poison_training_steps(monkeypatch, set(range(4, 100)))
    with pytest.raises(SystemExit) as info:
        pretrain_main([*TINY, *RECIPE, f"output_dir={tmp_path / 'run'}"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 2 optimizer steps in a row (up to step 5) had a non-finite loss")
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == [f"checkpoint_{s:08d}" for s in (1, 2, 3, 4)]
    for step in (1, 2, 3, 4):
        assert all(torch.isfinite(t).all() for t in checkpoint_weights(tmp_path / "run", step).values())


def test_stop_after_one_raises_at_the_first(tmp_path, monkeypatch):
    poison_training_steps(monkeypatch, {2})
    with pytest.raises(NonFiniteLossError, match="1 optimizer steps in a row"):
        run_pretraining(tiny_config(tmp_path / "run", *RECIPE, "train.stop_after_nonfinite=1"))


def test_nan_weights_are_never_checkpointed(tmp_path, monkeypatch):
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            self.param_groups[0]["params"][0].data.fill_(math.nan)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(NonFiniteWeightsError, match="non-finite weights at step 2: no checkpoint written"):
        run_pretraining(tiny_config(tmp_path / "run", *RECIPE))
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["checkpoint_00000001"]
    assert is_complete_checkpoint(root / "checkpoint_00000001")
    assert not (tmp_path / "run" / "weights").exists()
