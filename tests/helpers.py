"""Test helpers importable from test modules."""

from __future__ import annotations

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
