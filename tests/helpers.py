"""Test helpers importable from test modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ``|a - e| / |e|`` (the absolute error when ``e`` is zero)."""
    actual, expected = actual.detach(), expected.detach()
    diff = (actual.double() - expected.double()).norm()
    scale = expected.double().norm()
    return float(diff / scale) if scale > 0 else float(diff)


def perturb_parameters(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Move every parameter off its initial value so zero-initialised GRN and norms matter."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def run_in_triton_interpreter(script: str) -> tuple[int, float]:
    """Run ``script`` with ``TRITON_INTERPRET=1`` (Triton kernels on the CPU) in a fresh process.

    The script ends by printing how many errors it checked and the worst one.

    Returns:
        (count, worst) from the script's last line.
    """
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    count, worst = done.stdout.split()[-2:]
    return int(count), float(worst)
