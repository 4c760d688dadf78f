"""A pretraining run in a child process that the parent can SIGKILL at chosen moments.

Fault injection lives here, in the child, not in the library: ``throttle`` slows every optimizer
step so the parent can aim; ``hang_at_checkpoint`` makes the writer of ``checkpoint_<step>`` leave
a half-written optimizer file, touch ``IN_CHECKPOINT_WRITE`` and wait to be killed.
"""

from __future__ import annotations

import time
from pathlib import Path

import accelerate.checkpointing

import fcmae.engine
from fcmae.pretraining import run_pretraining
from tests.pretrain_helpers import tiny_config

IN_WRITE = "IN_CHECKPOINT_WRITE"
RECIPE = [
    "data.generated_images=16", "train.batch_size=2", "train.gradient_accumulation_steps=2", "train.epochs=4",
    "model.drop_path_rate=0.1", "checkpoint.every_steps=3", "checkpoint.keep_last=2", "data.hflip=0.5",
]


def train(run_dir: str, throttle: float = 0.0, hang_at_checkpoint: int | None = None) -> None:
    """Pretrain :data:`RECIPE` into ``run_dir`` (resuming if it holds a checkpoint)."""
    if throttle:
        _slow_down_steps(throttle)
    if hang_at_checkpoint is not None:
        _hang_in_checkpoint_write(Path(run_dir), hang_at_checkpoint)
    run_pretraining(tiny_config(Path(run_dir), *RECIPE))


def _slow_down_steps(seconds: float) -> None:
    original = fcmae.engine.Engine.settle

    def slow(self, *args):
        time.sleep(seconds)
        return original(self, *args)

    fcmae.engine.Engine.settle = slow


def _hang_in_checkpoint_write(run_dir: Path, step: int) -> None:
    original = accelerate.checkpointing.save

    def hanging(obj, f, *args, **kwargs):
        if "optimizer" in str(f) and f"checkpoint_{step:08d}" in str(f):
            Path(f).write_bytes(b"half of an optimizer state")
            (run_dir / IN_WRITE).touch()
            time.sleep(600)
        return original(obj, f, *args, **kwargs)

    accelerate.checkpointing.save = hanging
