"""SIGKILL a pretraining run at random steps and inside a checkpoint write; every resume picks the
latest complete checkpoint and the run ends with the weights of an uninterrupted run (fp32 CPU)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fcmae.run_state import is_complete_checkpoint
from tests.reliability._killable import IN_WRITE, train

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def ctx():
    # Children fork from a server that imported torch once: each start costs ~1 s instead of ~10 s.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.reliability._killable"])
    return context


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "log.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the process died
            continue
        if event["event"] == "metrics":
            steps.append(event["step"])
    return steps


def run_until(ctx, run_dir: Path, condition, **kwargs) -> None:
    """Start a training child, SIGKILL it as soon as ``condition()`` holds (it must not finish first)."""
    child = ctx.Process(target=train, args=(str(run_dir),), kwargs=kwargs)
    child.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert child.is_alive(), f"the run ended (exit {child.exitcode}) before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the kill point"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL


def run_to_end(ctx, run_dir: Path) -> None:
    child = ctx.Process(target=train, args=(str(run_dir),))
    child.start()
    child.join(TIMEOUT_S)
    assert child.exitcode == 0


def complete_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    return [int(p.name.split("_")[1]) for p in sorted(root.iterdir()) if is_complete_checkpoint(p)]


def test_sigkill_anywhere_then_resume_matches_an_uninterrupted_run(ctx, tmp_path):
    rng = random.Random(2024)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_to_end(ctx, reference)

    first_kill = rng.randint(2, 5)
    run_until(ctx, killed, lambda: max(logged_steps(killed), default=0) >= first_kill, throttle=0.15)

    hang_step = min(s for s in (3, 4, 6, 8, 9, 12) if s >= first_kill + 2)
    run_until(ctx, killed, lambda: (killed / IN_WRITE).exists(), throttle=0.05, hang_at_checkpoint=hang_step)
    (killed / IN_WRITE).unlink()
    partial = killed / "checkpoints" / f".tmp-checkpoint_{hang_step:08d}"
    assert partial.is_dir() and not is_complete_checkpoint(partial)
    assert max(complete_steps(killed)) < hang_step  # the half-written one is not a candidate

    third_kill = rng.randint(hang_step + 2, 12)  # >= 4 throttled steps before the end: the kill lands in time
    run_until(ctx, killed, lambda: max(logged_steps(killed), default=0) >= third_kill, throttle=0.15)
    run_to_end(ctx, killed)

    assert not partial.exists()
    resumes = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()
               if '"event": "resume"' in line]
    assert len(resumes) == 3
    want = load_file(reference / "weights" / "fcmae.safetensors")
    got = load_file(killed / "weights" / "fcmae.safetensors")
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6
    assert complete_steps(killed)[-1] == 16
