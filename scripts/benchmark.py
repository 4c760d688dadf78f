"""Benchmark the full FCMAE training step across sizes, backends, compile and precision.

Measures forward + loss + backward + optimizer step on synthetic input: images/s (median of repeats),
peak memory, and model FLOP utilisation of the useful FLOPs (stem, visible sites of the encoder,
decoder with its tail at masked patches; x3 for forward + backward). Ratios are computed within one
run. Prints a table and writes JSON.

    python scripts/benchmark.py --sizes base --backends dense native --compile off default reduce-overhead
    python scripts/benchmark.py --sizes atto --batch-size 16 --steps 3 --compile off default --interleave  # CPU
    python scripts/benchmark.py --smoke     # tiny CPU run used by the test suite
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fcmae  # noqa: E402
from fcmae.masking import num_visible  # noqa: E402
from models import create_model  # noqa: E402

COMPILE_MODES = ["off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 494.7}, "H200": {"bf16": 989.0, "fp32": 494.7}}


@dataclass
class Result:
    size: str
    backend: str
    compile: str  # "off" or the torch.compile mode
    precision: str
    batch_size: int
    images_per_s: float | None
    step_ms: float | None
    peak_mem_gib: float | None
    mfu: float | None
    error: str | None = None


def useful_flops_per_image(size: str, img_size: int, mask_ratio: float) -> float:
    """Training FLOPs of one image counting only the work the visible sites need (x3 for fwd+bwd)."""
    grid = img_size // 32
    keep = num_visible(grid * grid, mask_ratio) / (grid * grid)
    with torch.device("meta"):
        encoder = create_model(f"convnextv2_{size}", with_head=False)
        model = fcmae.create_fcmae(f"convnextv2_{size}", backend="dense")
    x = torch.empty(1, 3, img_size, img_size, device="meta")
    counts = []
    for fn in (
        lambda: encoder.stem(x),
        lambda: encoder.forward_features(x),
        lambda: model.forward_decoder(
            torch.empty(1, encoder.num_features, grid, grid, device="meta"),
            torch.zeros(1, grid, grid, dtype=torch.bool, device="meta"),
            torch.arange(grid * grid - num_visible(grid * grid, mask_ratio), device="meta"),  # masked patches
        ),
    ):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        counts.append(counter.get_total_flops())
    stem, encoder_total, decoder = counts
    return 3.0 * (stem + (encoder_total - stem) * keep + decoder)


def peak_tflops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v[precision] for k, v in PEAK_TFLOPS.items() if k in name), None)


def build_step(size: str, backend: str, compile_mode: str, precision: str, device: torch.device, args):
    model = fcmae.create_fcmae(f"convnextv2_{size}", backend=backend, mask_ratio=args.mask_ratio).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    forward = model if compile_mode == "off" else torch.compile(model, mode=compile_mode)
    graphs = compile_mode in ("reduce-overhead", "max-autotune")  # the modes that capture CUDA graphs
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    if device.type == "cuda":
        imgs = imgs.contiguous(memory_format=torch.channels_last)

    def step():
        if graphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
            loss = forward(imgs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, steps: int) -> float:
    """Seconds per step over ``steps`` consecutive steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def finish(result: Result, times: list[float], device: torch.device, args) -> Result:
    """Fill in the speed, peak memory and FLOP utilisation of ``result`` from its step times."""
    step_s = statistics.median(times)
    result.step_ms = 1000 * step_s
    result.images_per_s = args.batch_size / step_s
    if device.type == "cuda":
        result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    peak = peak_tflops(device, result.precision)
    if peak:
        flops = useful_flops_per_image(result.size, args.img_size, args.mask_ratio)
        result.mfu = flops * result.images_per_s / (peak * 1e12)
    return result


def measure(size, backend, compile_mode, precision, device, args) -> Result:
    result = Result(size, backend, compile_mode, precision, args.batch_size, None, None, None, None)
    torch._dynamo.reset()  # drop earlier configurations' graphs (and their recompile budget)
    if device.type == "cuda":  # peak over warm-up too: CUDA graph pools are allocated while recording
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = build_step(size, backend, compile_mode, precision, device, args)
        for _ in range(args.warmup):
            step()
        times = [time_steps(step, device, args.steps) for _ in range(args.repeats)]
    except torch.cuda.OutOfMemoryError as err:
        result.error = f"OOM: {str(err).splitlines()[0]}"
        return result
    if args.profile:
        print(f"== profile: {size} {backend} compile={compile_mode} {precision}")
        profile_step(step, device)
    return finish(result, times, device, args)


def measure_interleaved(configs: list[tuple[str, str, str, str]], device: torch.device, args) -> list[Result]:
    """Like :func:`measure` for every (size, backend, compile, precision), taking turns between repeats.

    Every configuration is built and warmed up first; then each repeat times each configuration once,
    so slow drift of a shared machine's speed falls on all of them alike instead of on whichever ran
    during it.
    """
    steps = []
    for config in configs:
        steps.append(build_step(*config, device, args))
        for _ in range(args.warmup):
            steps[-1]()
    times = [[] for _ in configs]
    for _ in range(args.repeats):
        for step, config_times in zip(steps, times, strict=True):
            config_times.append(time_steps(step, device, args.steps))
    return [
        finish(Result(*config, args.batch_size, None, None, None, None), config_times, device, args)
        for config, config_times in zip(configs, times, strict=True)
    ]


def profile_step(step, device: torch.device, rows: int = 40) -> None:
    """Print where the time of two steps goes: kernel table and kernel time vs wall clock."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync(device)
    wall = (time.perf_counter() - start) / 2
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_key, row_limit=rows, max_name_column_width=70))
    if device.type == "cuda":
        kernel_us = sum(e.device_time for e in prof.events() if e.device_type == DeviceType.CUDA) / 2
        print(f"per step: wall {1000 * wall:.1f} ms (profiled), GPU kernels {kernel_us / 1000:.1f} ms")


def print_table(results: list[Result]) -> None:
    best_dense = {}
    for r in results:
        if r.backend == "dense" and r.images_per_s:
            best_dense[r.size] = max(best_dense.get(r.size, 0.0), r.images_per_s)
    header = (
        f"{'size':6} {'backend':9} {'compile':15} {'prec':5} {'batch':5} "
        f"{'img/s':>9} {'ms':>8} {'GiB':>6} {'MFU':>6} {'vs best dense':>13}"
    )
    print(header)
    for r in results:
        if r.error:
            print(f"{r.size:6} {r.backend:9} {r.compile:15} {r.precision:5} {r.batch_size:5} {r.error}")
            continue
        ratio = r.images_per_s / best_dense[r.size] if r.size in best_dense else float("nan")
        mem = f"{r.peak_mem_gib:6.2f}" if r.peak_mem_gib is not None else "     -"
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else "     -"
        print(
            f"{r.size:6} {r.backend:9} {r.compile:15} {r.precision:5} {r.batch_size:5} "
            f"{r.images_per_s:9.1f} {r.step_ms:8.1f} {mem} {mfu} {ratio:12.2f}x"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["atto", "tiny", "base"])
    p.add_argument("--backends", nargs="+", default=["dense", "native"])
    p.add_argument(
        "--compile", nargs="+", choices=COMPILE_MODES, default=["off"],
        help="off (eager) and/or torch.compile modes to measure",
    )
    p.add_argument(
        "--precision", nargs="+", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--smoke", action="store_true", help="tiny size, few steps (for tests)")
    p.add_argument("--profile", action="store_true", help="print a kernel-time profile of every configuration")
    p.add_argument(
        "--interleave", action="store_true",
        help="take turns between configurations at every repeat (CPU only: on CUDA peak memory needs each alone)",
    )
    args = p.parse_args(argv)
    if args.interleave and (args.device.startswith("cuda") or args.profile):
        p.error("--interleave measures CPU runs without --profile")
    if args.smoke:
        args.sizes, args.batch_size, args.img_size = ["test"], 2, 64
        args.warmup, args.steps, args.repeats = 1, 1, 1
    if args.precision is None:
        args.precision = ["bf16"] if args.device.startswith("cuda") else ["fp32"]
    return args


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    device = torch.device(args.device)
    configs = list(itertools.product(args.sizes, args.backends, args.compile, args.precision))
    if args.interleave:
        results = measure_interleaved(configs, device, args)
        for result in results:
            print(json.dumps(asdict(result)), flush=True)
    else:
        results = []
        for config in configs:
            results.append(measure(*config, device, args))
            print(json.dumps(asdict(results[-1])), flush=True)
    print_table(results)
    if args.json:
        meta = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "args": vars(args) | {"json": str(args.json)},
        }
        args.json.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    return results


if __name__ == "__main__":
    main()
