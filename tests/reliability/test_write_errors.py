"""Disk full or I/O errors while writing a checkpoint or the weights: a clear error, the previous
checkpoint intact and resumable, no half-written folder left for resume to pick."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import accelerate.checkpointing
import pytest

import fcmae.pretraining
import fcmae.run_state
from fcmae.cli import pretrain_main
from fcmae.pretraining import run_pretraining
from fcmae.run_state import CheckpointWriteError, is_complete_checkpoint
from tests.pretrain_helpers import TINY, reset_accelerate, tiny_config

RECIPE = ["data.generated_images=16", "train.epochs=3", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    reset_accelerate()


def fill_disk_while_writing(monkeypatch, checkpoint_step: int) -> None:
    original = accelerate.checkpointing.save

    def save(obj, f, *args, **kwargs):
        if "optimizer" in str(f) and f"checkpoint_{checkpoint_step:08d}" in str(f):
            Path(f).write_bytes(b"the first bytes of an optimizer state")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_disk_full_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    fill_disk_while_writing(monkeypatch, 6)
    with pytest.raises(CheckpointWriteError) as info:
        run_pretraining(tiny_config(run_dir, *RECIPE))
    message = str(info.value)
    assert message.startswith("could not write checkpoint checkpoint_00000006 in ")
    assert "No space left on device" in message and "checkpoint_00000004 is intact" in message
    assert checkpoint_names(run_dir) == ["checkpoint_00000002", "checkpoint_00000004"]
    assert all(is_complete_checkpoint(run_dir / "checkpoints" / n) for n in checkpoint_names(run_dir))

    monkeypatch.undo()
    reset_accelerate()
    run_pretraining(tiny_config(run_dir, *RECIPE))
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "resume"] == [4]
    assert [e["step"] for e in log if e["event"] == "end"] == [12]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names file descriptors through /proc")
def test_io_error_while_sealing_a_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    original = os.fsync

    def fsync(fd):
        if "checkpoint_00000004" in os.readlink(f"/proc/self/fd/{fd}"):  # the second checkpoint's seal
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return original(fd)

    monkeypatch.setattr(fcmae.run_state.os, "fsync", fsync)
    with pytest.raises(CheckpointWriteError, match="checkpoint_00000004 .*Input/output error.*checkpoint_00000002 is"):
        run_pretraining(tiny_config(run_dir, *RECIPE))
    assert checkpoint_names(run_dir) == ["checkpoint_00000002"]


def test_cli_reports_a_write_error_in_one_line(tmp_path, monkeypatch, capsys):
    fill_disk_while_writing(monkeypatch, 2)
    with pytest.raises(SystemExit) as info:
        pretrain_main([*TINY, *RECIPE, f"output_dir={tmp_path / 'run'}"])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: could not write checkpoint checkpoint_00000002")
    assert err[-1].endswith("the previous checkpoint (none) is intact")
    assert checkpoint_names(tmp_path / "run") == []


def test_weights_write_error_keeps_the_previous_file(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_pretraining(tiny_config(run_dir, *RECIPE, "train.epochs=1"))
    before = (run_dir / "weights" / "fcmae.safetensors").read_bytes()
    reset_accelerate()

    def no_space(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fcmae.pretraining, "save_file", no_space)
    with pytest.raises(CheckpointWriteError, match=r"weights/fcmae.safetensors: No space left on device"):
        run_pretraining(tiny_config(run_dir, *RECIPE, "train.epochs=2"))
    assert (run_dir / "weights" / "fcmae.safetensors").read_bytes() == before
    assert sorted(p.name for p in (run_dir / "weights").iterdir()) == ["encoder.safetensors", "fcmae.safetensors"]
