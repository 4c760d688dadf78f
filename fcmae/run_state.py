"""Resumable training state and crash-safe checkpoints.

A checkpoint is a folder ``checkpoints/checkpoint_<step>`` written by ``accelerator.save_state``
(model, optimizer, scaler, every process's RNG states, and the registered :class:`TrainState`).
It is written under a temporary name, its files are fsynced, a ``manifest.json`` with every file's
size is added, and only then is the folder renamed into place. A folder without the final name or
whose manifest does not match is never picked for resume, so a crash or a full disk mid-write
leaves the previous checkpoint as the latest one.

Resume loads pickled optimizer and RNG state written by this code: resume only from run
directories you trust.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d{8,})$")
MANIFEST = "manifest.json"
_PARTIAL_PREFIXES = (".tmp-", ".trash-")


@dataclass
class TrainState:
    """Counters saved with every checkpoint (``accelerator.register_for_checkpointing``).

    Attributes:
        step: optimizer steps done; the learning rate is a function of it.
        epoch: current epoch.
        batch_in_epoch: micro-batches of ``epoch`` already consumed on each process (data position).
        images_seen: images consumed over all processes.
        nonfinite_in_a_row: consecutive skipped steps with a non-finite loss or gradient.
        nonfinite_total: all such skipped steps.
        global_batch: images per optimizer step when the state was written (checked on resume).
        steps_per_epoch: optimizer steps per epoch when the state was written (checked on resume).
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    global_batch: int = 0
    steps_per_epoch: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        names = {f.name for f in fields(self)}
        if set(state) != names:
            raise ValueError(f"train state keys differ: missing {sorted(names - set(state))}, "
                             f"unexpected {sorted(set(state) - names)}")
        for name in names:
            setattr(self, name, int(state[name]))


class ResumeError(ValueError):
    """The latest checkpoint in the output directory cannot continue this run (another model, optimizer, ...)."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the previous complete checkpoint is untouched."""


class CheckpointManager:
    """Atomic ``save_state`` into ``root``, rotation to the last ``keep_last``, and resume.

    Every process calls :meth:`save` and :meth:`resume` together (they synchronise).
    """

    def __init__(self, root: str | Path, accelerator: Accelerator, keep_last: int):
        self.root, self.accelerator, self.keep_last = Path(root), accelerator, keep_last
        self.last_saved_step: int | None = None

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (final name and a matching manifest)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
        return [p for _, p in sorted(found) if is_complete_checkpoint(p)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def remove_partial(self) -> None:
        """Delete leftovers of interrupted writes or rotations (main process)."""
        if self.accelerator.is_main_process and self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(_PARTIAL_PREFIXES):
                    logger.warning("removing incomplete checkpoint folder %s (an interrupted write)", path)
                    shutil.rmtree(path, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, step: int) -> Path:
        """Write ``checkpoint_<step>`` atomically, then drop checkpoints beyond ``keep_last``.

        Raises:
            CheckpointWriteError: on any process's OSError (disk full, permissions); the
                temporary folder is removed and earlier checkpoints stay as they were.
        """
        final = self.root / f"checkpoint_{step:08d}"
        tmp = self.root / f".tmp-checkpoint_{step:08d}"
        error = None
        try:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(tmp))
        except OSError as e:
            error = e
        self._raise_if_any_failed(error, tmp, final)
        try:
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                _seal(tmp, final)
                self._rotate()
        except OSError as e:
            error = e
        self._raise_if_any_failed(error, tmp, final)
        self.last_saved_step = step
        return final

    def _raise_if_any_failed(self, error: OSError | None, tmp: Path, final: Path) -> None:
        failed = torch.tensor([float(error is not None)], device=self.accelerator.device)
        if self.accelerator.reduce(failed, reduction="sum").item() == 0:
            return
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = self.latest()
        detail = f"{error.strerror or error}" if error is not None else "failed on another process"
        raise CheckpointWriteError(
            f"could not write checkpoint {final.name} in {self.root}: {detail}; "
            f"the previous checkpoint {previous if previous else '(none)'} is intact"
        )

    def _rotate(self) -> None:
        """Drop old checkpoints (rename first, so a crash never leaves a half-deleted one under its name)."""
        for old in self.complete()[:-self.keep_last]:
            trash = old.with_name(f".trash-{old.name}")
            try:
                os.replace(old, trash)
            except OSError as e:
                logger.warning("could not remove old checkpoint %s: %s", old, e)
                continue
            shutil.rmtree(trash, ignore_errors=True)

    def resume(self, state: TrainState) -> Path | None:
        """Load the latest complete checkpoint (every process); None when there is none."""
        self.remove_partial()
        path = self.latest()
        if path is None:
            return None
        expected = (state.global_batch, state.steps_per_epoch)
        try:
            self.accelerator.load_state(str(path))
        except (RuntimeError, ValueError, KeyError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ResumeError(
                f"{path} does not fit this run ({reason}); point output_dir at a new folder, "
                f"or set checkpoint.resume=false to start over in this one"
            ) from e
        if (state.global_batch, state.steps_per_epoch) != expected:
            raise ResumeError(
                f"{path} was written with {state.global_batch} images per step and {state.steps_per_epoch} steps "
                f"per epoch, this run has {expected[0]} and {expected[1]}: resume needs the same batch size, "
                f"accumulation, process count and corpus (or a new output_dir)"
            )
        self.last_saved_step = state.step
        return path


def _seal(tmp: Path, final: Path) -> None:
    """fsync every file, write the manifest, and rename ``tmp`` to ``final`` (replacing a stale one)."""
    sizes = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        sizes[str(path.relative_to(tmp))] = path.stat().st_size
    manifest = tmp / MANIFEST
    with open(manifest, "w") as f:
        json.dump({"files": sizes}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        stale = final.with_name(f".trash-{final.name}")
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a manifest and every file it lists, at the listed size."""
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        return all((path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False
