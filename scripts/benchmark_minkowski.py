"""FCMAE training-step throughput and peak memory of the minkowski, native and dense backends on one GPU.

One step is forward, loss, backward and an AdamW step on random images with a fresh random mask. Each
configuration is a backend with a precision mode:

- ``fp32``: fp32 with TF32 off (the strict comparison);
- ``tf32``: fp32 weights, TF32 matmuls and convolutions (MinkowskiEngine's best: it has no bf16 kernels);
- ``bf16``: bf16 autocast (TF32 on for what stays fp32).

A suffix compiles the model: ``+compile`` is ``torch.compile`` in its default mode, ``+reduce-overhead`` the mode
that also captures CUDA graphs (every step then starts with ``torch.compiler.cudagraph_mark_step_begin()``).
The optimizer is fused AdamW for every configuration.

Results are written as JSON after every configuration, so a run cut short still reports what it measured.

Usage::

    python scripts/benchmark_minkowski.py --sizes atto tiny base --out bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fcmae  # noqa: E402
from sparse_ops import available_backends  # noqa: E402

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch.compile modes that capture CUDA graphs


@dataclass(frozen=True)
class Config:
    backend: str
    precision: str  # fp32 | tf32 | bf16
    compile_mode: str | None = None  # None runs eagerly; else the torch.compile mode

    @property
    def label(self) -> str:
        suffix = {None: "", "default": "+compile"}.get(self.compile_mode, f"+{self.compile_mode}")
        return f"{self.backend}/{self.precision}{suffix}"


CONFIGS = (
    Config("minkowski", "fp32"), Config("minkowski", "tf32"),
    Config("native", "fp32"), Config("dense", "fp32"),
    Config("native", "bf16"), Config("dense", "bf16"),
    Config("native", "bf16", "reduce-overhead"), Config("native", "bf16", "default"),
    Config("dense", "bf16", "default"),
)


def set_precision(precision: str) -> contextlib.AbstractContextManager:
    """Set TF32 flags for ``precision`` and return the autocast context to run steps in."""
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, optimizer, imgs, autocast, graphs: bool) -> None:
    if graphs:  # a new iteration: the previous step's graph outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    with autocast:
        loss = model(imgs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(size: str, config: Config, args: argparse.Namespace) -> dict:
    """Images/s of ``args.steps`` timed training steps after ``args.warmup`` untimed ones; peak memory over both.

    The peak includes the warm-up because CUDA graph pools are allocated while the graphs are recorded.
    """
    torch._dynamo.reset()  # drop earlier configurations' graphs (and their recompile budget)
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = fcmae.create_fcmae(f"convnextv2_{size}", backend=config.backend, mask_ratio=args.mask_ratio).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    compiled = config.compile_mode is not None
    step_model = torch.compile(model, mode=config.compile_mode) if compiled else model
    graphs = config.compile_mode in CUDA_GRAPH_MODES
    imgs = torch.randn(args.batch, 3, args.img, args.img, device="cuda")
    autocast = set_precision(config.precision)
    start = time.perf_counter()
    for _ in range(max(args.warmup, 3) if compiled else args.warmup):  # compiled graphs settle by step 3
        train_step(step_model, optimizer, imgs, autocast, graphs)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(step_model, optimizer, imgs, autocast, graphs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "size": size, "config": config.label, "backend": config.backend, "precision": config.precision,
        "compile_mode": config.compile_mode, "images_per_s": round(args.steps * args.batch / elapsed, 1),
        "step_ms": round(1000 * elapsed / args.steps, 1), "peak_memory_gib": round(
            torch.cuda.max_memory_allocated() / 2**30, 2), "warmup_s": round(warmup_s, 1),
    }


def _fastest(rows: list[dict], backend: str, precision: str | None = None) -> float | None:
    """Highest images/s of ``backend`` among ``rows`` (only ``backend/precision`` when given)."""
    speeds = [r["images_per_s"] for r in rows
              if r["backend"] == backend and (precision is None or r["config"] == f"{backend}/{precision}")]
    return max(speeds) if speeds else None


def speedups(results: list[dict]) -> dict:
    """native over minkowski per size: both fp32, and each at its fastest configuration."""
    out = {}
    for size in sorted({r["size"] for r in results}):
        rows = [r for r in results if r["size"] == size and "images_per_s" in r]
        ratios = {}
        for key, precision in (("fp32", "fp32"), ("best", None)):
            me, native = _fastest(rows, "minkowski", precision), _fastest(rows, "native", precision)
            ratios[f"native_over_minkowski_{key}"] = round(native / me, 2) if me and native else None
        out[size] = ratios
    return out


def environment(args: argparse.Namespace) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "batch": args.batch, "img": args.img, "mask_ratio": args.mask_ratio, "steps": args.steps,
        "warmup": args.warmup, "step": "forward + loss + backward + AdamW step",
    }
    if "minkowski" in available_backends():
        from sparse_ops.minkowski import import_minkowski

        info["minkowski_engine"] = import_minkowski().__version__
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["atto", "tiny", "base"])
    parser.add_argument("--configs", nargs="+", default=[c.label for c in CONFIGS],
                        help="labels such as native/bf16+compile or native/bf16+reduce-overhead")
    parser.add_argument("--compile-sizes", nargs="+", default=["base"],
                        help="sizes that run the compiled configurations (compiling takes minutes)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "benchmark_minkowski.json")
    return parser.parse_args(argv)


def planned_runs(args: argparse.Namespace, backends: list[str]) -> list[tuple[str, Config]]:
    """(size, config) pairs to measure: the chosen configs of installed backends, compiled ones last."""
    unknown = set(args.configs) - {c.label for c in CONFIGS}
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from {[c.label for c in CONFIGS]}")
    configs = [c for c in CONFIGS if c.label in args.configs and c.backend in backends]
    runs = [(size, c) for size in args.sizes for c in configs
            if c.compile_mode is None or size in args.compile_sizes]
    return sorted(runs, key=lambda run: run[1].compile_mode is not None)  # the slow compiles last


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = planned_runs(args, available_backends())
    report = {"environment": environment(args), "results": []}
    for size, config in runs:
        try:
            row = measure(size, config, args)
        except Exception as error:  # record the failure (OOM, compile error) and go on
            row = {"size": size, "config": config.label, "error": f"{type(error).__name__}: {error}"[:500]}
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        report["results"].append(row)
        report["speedups"] = speedups(report["results"])
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["speedups"], indent=2))


if __name__ == "__main__":
    main()
