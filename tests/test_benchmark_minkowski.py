"""The MinkowskiEngine benchmark's plan and ratios (no GPU: measuring itself needs CUDA)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_minkowski.py"
ALL_BACKENDS = ["dense", "native", "minkowski"]


def _load():
    spec = importlib.util.spec_from_file_location("benchmark_minkowski", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row(size: str, config: str, images_per_s: float) -> dict:
    return {"size": size, "config": config, "backend": config.split("/")[0], "images_per_s": images_per_s}


def test_labels_name_the_compile_mode():
    bench = _load()
    labels = {(c.backend, c.precision, c.compile_mode): c.label for c in bench.CONFIGS}
    assert labels[("native", "bf16", None)] == "native/bf16"
    assert labels[("native", "bf16", "default")] == "native/bf16+compile"
    assert labels[("native", "bf16", "reduce-overhead")] == "native/bf16+reduce-overhead"
    assert len(set(labels.values())) == len(bench.CONFIGS)


def test_default_plan_compiles_only_the_compile_sizes_and_last():
    bench = _load()
    runs = bench.planned_runs(bench.parse_args(["--sizes", "atto", "base"]), ALL_BACKENDS)
    compiled = [(size, c.label) for size, c in runs if c.compile_mode is not None]
    assert compiled == [("base", "native/bf16+reduce-overhead"), ("base", "native/bf16+compile"),
                        ("base", "dense/bf16+compile")]
    assert runs[-len(compiled):] == [run for run in runs if run[1].compile_mode is not None]
    assert len(runs) == 2 * 6 + 3


def test_plan_skips_missing_backends_and_rejects_unknown_labels():
    bench = _load()
    runs = bench.planned_runs(bench.parse_args(["--sizes", "atto"]), ["dense", "native"])
    assert all(c.backend != "minkowski" for _, c in runs) and runs
    with pytest.raises(SystemExit, match="native/bf16\\+cudagraphs"):
        bench.planned_runs(bench.parse_args(["--configs", "native/bf16+cudagraphs"]), ALL_BACKENDS)


def test_speedups_compare_fp32_and_each_backends_fastest():
    bench = _load()
    rows = [_row("base", "minkowski/fp32", 50.0), _row("base", "minkowski/tf32", 40.0),
            _row("base", "native/fp32", 250.0), _row("base", "native/bf16+reduce-overhead", 2000.0),
            {"size": "base", "config": "dense/bf16+compile", "error": "OutOfMemoryError: ..."}]
    assert bench.speedups(rows) == {"base": {"native_over_minkowski_fp32": 5.0, "native_over_minkowski_best": 40.0}}


def test_speedups_are_none_without_a_minkowski_measurement():
    bench = _load()
    rows = [_row("atto", "native/fp32", 1300.0)]
    assert bench.speedups(rows) == {"atto": {"native_over_minkowski_fp32": None, "native_over_minkowski_best": None}}
