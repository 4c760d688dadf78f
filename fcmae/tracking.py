"""Seeing progress: ``log.jsonl`` in the run directory, accelerate trackers and a progress bar.

Only the main process writes; every method is safe to call on all processes.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available
from PIL import Image
from tqdm.auto import tqdm

_BAR_KEYS = {"train/loss": "loss", "train/lr": "lr", "train/images_per_s": "img/s"}


def default_trackers(requested: list[str] | None) -> list[str]:
    """``requested``, or TensorBoard when it is installed (None means the default)."""
    if requested is not None:
        return list(requested)
    return ["tensorboard"] if is_tensorboard_available() else []


def memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak on GPU, process peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RunLog:
    """Metrics and events to ``log.jsonl`` and the trackers; a tqdm bar (step, loss, lr, images/s, ETA)."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, total_steps: int, start_step: int,
                 progress_bar: bool = True, desc: str = "pretrain"):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = run_dir / "log.jsonl"
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not (self.main and progress_bar))
        if self.main and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:  # a run killed mid-line must not glue two events together
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def event(self, name: str, **fields: Any) -> None:
        """Append ``{"event": name, "time": ..., **fields}`` to log.jsonl."""
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": name, "time": round(time.time(), 3), **fields}) + "\n")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Log scalar ``values`` at optimizer step ``step`` to log.jsonl, the trackers and the bar."""
        self.event("metrics", step=step, **values)
        self.accelerator.log(values, step=step)
        shown = {short: f"{values[key]:.4g}" for key, short in _BAR_KEYS.items() if key in values}
        self.bar.set_postfix(shown, refresh=False)

    def advance(self) -> None:
        self.bar.update(1)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        """Send ``image`` to every tracker that takes images."""
        if not self.main:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({tag: np.asarray(image)[None]}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({tag: [image]}, step=step)

    def write(self, message: str) -> None:
        """Print on the main process without breaking the bar."""
        if self.main:
            self.bar.write(message)

    def resumed(self, checkpoint: str | Path, step: int, epoch: int) -> None:
        """Say (and record in log.jsonl) where a resumed run continues."""
        self.write(f"resumed from {checkpoint} at step {step}, epoch {epoch}")
        self.event("resume", checkpoint=str(checkpoint), step=step, epoch=epoch)

    def close(self) -> None:
        self.bar.close()
