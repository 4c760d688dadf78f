"""The benchmark script keeps working (smoke mode: tiny size, CPU, no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def _load():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    results = _load().main(["--smoke", "--device", "cpu", "--backends", "dense", "native", "--json", str(out)])
    assert [(r.backend, r.error) for r in results] == [("dense", None), ("native", None)]
    assert all(r.images_per_s > 0 for r in results)
    saved = json.loads(out.read_text())
    assert saved["meta"]["device"] == "cpu" and len(saved["results"]) == 2


def test_useful_flops_count_visible_sites_only():
    bench = _load()
    full = bench.useful_flops_per_image("atto", 224, 0.0)
    masked = bench.useful_flops_per_image("atto", 224, 0.6)
    assert 0.39 * full < masked < 0.6 * full


@pytest.mark.minkowski
def test_benchmark_smoke_includes_minkowski():
    results = _load().main(["--smoke", "--device", "cpu", "--backends", "native", "minkowski"])
    assert [(r.backend, r.error) for r in results] == [("native", None), ("minkowski", None)]


def test_interleaved_smoke_measures_every_configuration():
    results = _load().main(["--smoke", "--device", "cpu", "--backends", "dense", "native", "--compile", "off",
                            "--interleave"])
    assert [(r.backend, r.compile, r.error) for r in results] == [("dense", "off", None), ("native", "off", None)]
    assert all(r.images_per_s > 0 and r.step_ms > 0 for r in results)


def test_interleave_refuses_cuda():
    with pytest.raises(SystemExit):
        _load().parse_args(["--interleave", "--device", "cuda"])
