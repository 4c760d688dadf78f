"""A real 2-process CPU run through ``accelerate launch`` (gloo DDP).

``accelerate launch --multi_gpu`` starts the processes through torchrun; without CUDA our
Accelerator joins them as a CPU group (``accelerate launch --cpu`` would start a single process).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pretrain_helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_cpu_run_completes_and_ranks_agree(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(ROOT / "pretrain.py"), *TINY, f"output_dir={run_dir}", "data.generated_images=16",
        "train.epochs=2", "train.gradient_accumulation_steps=2", "train.batch_size=2", "checkpoint.every_steps=1",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    start = next(e for e in log if e["event"] == "start")
    end = next(e for e in log if e["event"] == "end")
    assert start["processes"] == 2 and start["effective_batch"] == 8 and start["steps_per_epoch"] == 2
    assert end["processes"] == 2 and end["ranks_agree"] is True and end["step"] == 4
    last = run_dir / "checkpoints" / "checkpoint_00000004"
    assert (last / "random_states_0.pkl").is_file() and (last / "random_states_1.pkl").is_file()
    assert (run_dir / "weights" / "encoder.safetensors").is_file()
