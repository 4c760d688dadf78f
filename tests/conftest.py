"""Shared fixtures and marker handling: GPU and MinkowskiEngine tests skip cleanly when absent."""

from __future__ import annotations

import pytest
import torch

from sparse_ops import minkowski_available


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_me = pytest.mark.skip(reason="needs MinkowskiEngine (python scripts/install_minkowski.py)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "minkowski" in item.keywords and not minkowski_available():
            item.add_marker(skip_me)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

