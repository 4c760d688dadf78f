"""A 2-process CPU finetuning run through ``accelerate launch`` (gloo DDP): metrics gathered exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcmae.finetuning import run_finetuning
from tests.finetune_helpers import TINY, tiny_config, write_class_folders
from tests.pretrain_helpers import reset_accelerate
from tests.test_pretrain_distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_run_evaluates_every_image_once(tmp_path):
    root = write_class_folders(tmp_path / "data", "train", per_class=8)
    write_class_folders(tmp_path / "data", "val", per_class=5, seed=1)  # 20 images: uneven over 2 x 3
    overrides = [*TINY, f"data.path={root}", "data.eval_split=val", "train.batch_size=4", "train.eval_batch_size=3",
                 "train.epochs=2", "ema.enabled=true", "ema.decay=0.9", "augment.mixup=0.8"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(ROOT / "finetune.py"), *overrides, f"output_dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    start = next(e for e in log if e["event"] == "start")
    assert start["processes"] == 2 and start["effective_batch"] == 8 and start["steps_per_epoch"] == 4
    final = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert final["step"] == 8 and final["model"]["count"] == 20 and final["ema"]["count"] == 20

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights evaluated by one process give the same numbers
    try:
        single = run_finetuning(tiny_config(tmp_path / "eval", *overrides[len(TINY):], "train.eval_only=true",
                                            f"model.pretrained={tmp_path / 'run' / 'weights' / 'last.safetensors'}"))
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()
    assert single["model"]["top1"] == final["model"]["top1"]
    assert single["model"]["loss"] == pytest.approx(final["model"]["loss"], rel=1e-5)
