"""Benchmark the pretraining input pipeline: a folder of JPEGs -> the real loader -> the real training loop.

Measurements on one folder of ImageNet-like JPEGs (generated once into ``--data``, reused after):

* ``decode``: ms per image of one training item (read, decode, crop, flip; no loader) in one process on
  the CPU, with ``data.reduced_decode`` on and off;
* ``loader``: images/s through ``fcmae.loader.build_pretrain_loader`` (``--workers`` processes;
  ``--decode-device cpu`` decodes in them, with pinned memory on CUDA, ``cuda`` in this process on the
  GPU, less the ``--cpu-decode-share`` of each batch the workers decode), counted after the first wave
  of batches (one per worker);
* ``train``: images/s of ``Engine.train_one_epoch`` in a ``PretrainingRun`` (the run's accelerator,
  precision, channels-last and optional compile: ``--compile`` in the default mode, ``--compile
  reduce-overhead`` with CUDA graphs), fed by synthetic uint8 batches of the same shape, then by the real
  loader, alternately for ``--rounds`` rounds; real / synthetic of the medians is the input
  pipeline's efficiency. Alternating spreads the host's drift (the synthetic loop alone moves by 10%
  within one process) over both. A real round first drains, untimed, the batches its workers prefetched
  while the synthetic round ran; a synthetic round after a real one waits as many steps, untimed, while
  the workers refill that queue.

Processes of the same code on one machine differ more than the rounds within one: with CUDA graphs on
an H200, real / synthetic was 0.805 in one process and 0.654 in another of the same call, while each
process's rounds agreed within 0.09. ``--processes N`` runs the whole benchmark in N fresh processes of
this script, one after another, and reports the medians of their figures (the training loop's ratio is
the median of the processes' ratios).

``--gpu-decoder`` sets ``data.gpu_decoder`` (who calls nvJPEG). With ``--decoder-sms N`` the synthetic rounds
train on the SM partition too, which is slower than the whole GPU: that ratio compares the two inputs on
the same SMs. ``--against-whole-gpu`` (with ``--processes`` of 2 or more) trains every second process on
the whole GPU instead and also reports the partition's median real images/s over the whole GPU's median
synthetic images/s: real input with the partition against the fastest synthetic loop.

The folder's file list is repeated so that one epoch outlasts warm-up and measurement: an epoch end
stalls every worker at once, which a real corpus (thousands of batches per epoch) almost never sees.

On the GPU machine (16 cores)::

    python scripts/benchmark_input.py --size tiny --backend native --workers 14 --batch-size 128 --compile \\
        --data /tmp/imagenet_like --json input_pipeline.json
    python scripts/benchmark_input.py --size tiny --backend native --workers 4 --decode-device cuda \\
        --batch-size 128 --compile --data /tmp/imagenet_like --json input_pipeline_nvjpeg.json
    python scripts/benchmark_input.py --size tiny --backend native --workers 6 --decode-device cuda \\
        --batch-size 128 --compile reduce-overhead --data /tmp/imagenet_like --json input_pipeline_graphs.json
    python scripts/benchmark_input.py --size tiny --backend native --workers 14 --decode-device cuda \\
        --cpu-decode-share 0.4 --batch-size 128 --compile reduce-overhead --steps 100 --data /tmp/imagenet_like
    python scripts/benchmark_input.py --size tiny --backend native --workers 14 --decode-device cuda \\
        --cpu-decode-share 0.4 --decoder-sms 4 --against-whole-gpu --processes 8 --batch-size 128 \\
        --compile reduce-overhead --steps 100 --data /tmp/imagenet_like
    python scripts/benchmark_input.py --smoke     # CPU-sized run used by the test suite
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import get_args, get_type_hints

import datasets
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcmae.data import ImageSource, PretrainImages, image_folder_dataset  # noqa: E402
from fcmae.device_decode import DECODE_AHEAD, RECEIVE_AHEAD  # noqa: E402
from fcmae.loader import build_pretrain_loader, decode_device  # noqa: E402
from fcmae.pretrain_config import (  # noqa: E402
    GPU_DECODERS,
    DataConfig,
    PretrainConfig,
    TrainConfig,
    load_pretrain_config,
)
from fcmae.pretraining import PretrainingRun  # noqa: E402
from fcmae.transforms import PretrainTransform  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
# (amplitude, cells per 1024 px): smooth fields plus fine texture, about 100 KB at 500x375, quality 90.
_OCTAVES = ((50, 4), (35, 16), (25, 64), (28, 256), (20, 1024))


def photo_size(rng: np.random.Generator, scale: float = 1.0) -> tuple[int, int]:
    """(width, height) like ImageNet's: mostly 500 px on the long side, a tail smaller and larger; 3/4 landscape."""
    long_side = int(rng.choice([500] * 7 + [333, 375, 800]) * scale)
    short_side = round(long_side / rng.choice([4 / 3, 4 / 3, 4 / 3, 3 / 2, 1.0, 16 / 9]))
    return (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)


def random_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB image of smooth random fields at several scales (JPEG sizes like photographs')."""
    out = np.full((height, width, 3), 128.0, dtype=np.float32)
    for amplitude, cells in _OCTAVES:
        grid = rng.normal(0.0, amplitude, (3, max(2, height * cells // 1024 + 2), max(2, width * cells // 1024 + 2)))
        out += np.stack([np.asarray(Image.fromarray(g.astype(np.float32)).resize((width, height), Image.BICUBIC))
                         for g in grid], axis=-1)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _write_photo(job: tuple[str, int, float, int]) -> None:
    path, seed, scale, quality = job
    rng = np.random.default_rng(seed)
    random_photo(rng, *photo_size(rng, scale)).save(path, "JPEG", quality=quality)


def make_jpeg_folder(root: Path, count: int, scale: float = 1.0, quality: int = 90) -> Path:
    """``root`` holding ``img_00000.jpg`` ... (``count`` files; missing ones are written, in parallel)."""
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / f"img_{i:05d}.jpg"), i, scale, quality) for i in range(count)
            if not (root / f"img_{i:05d}.jpg").exists()]
    if jobs:
        with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
            list(pool.map(_write_photo, jobs, chunksize=16))
    return root


def folder_source(root: Path, repeat: int) -> ImageSource:
    """The folder as the loader reads it (paths, decoded by the workers), its file list repeated ``repeat`` times."""
    source = image_folder_dataset(root)
    source.dataset = datasets.concatenate_datasets([source.dataset] * repeat)
    return source


def decode_ms(source: ImageSource, cfg: DataConfig, count: int) -> float:
    """Milliseconds per training item (read + decode + crop + flip -> uint8) in this process."""
    transform = PretrainTransform(cfg.input_size, cfg.crop_scale, cfg.crop_ratio, cfg.hflip, cfg.reduced_decode)
    items = PretrainImages(source, transform, cfg, in_chans=3, seed=0)
    for index in range(min(count, 8)):  # warm-up: first calls pay one-off costs
        items[(1, index)]
    start = time.perf_counter()
    for index in range(count):
        items[(0, index)]
    return 1000 * (time.perf_counter() - start) / count


def loader_images_per_s(cfg: DataConfig, source: ImageSource, batch_size: int, batches: int) -> float:
    """Images/s of the real pretraining loader, timed after the first wave (one batch per worker)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = build_pretrain_loader(cfg, source, in_chans=3, batch_size=batch_size, accumulation=1, rank=0,
                                   world_size=1, seed=0, pin_memory=device.type == "cuda",
                                   decode_device=decode_device(cfg, device))
    wave = max(cfg.num_workers, 1)
    stamps = []
    for _ in loader.epoch(0):
        stamps.append(time.perf_counter())
        if len(stamps) == wave + batches:
            break
    return batches * batch_size / (stamps[-1] - stamps[wave - 1])


def synthetic_batches(batch_size: int, size: int, pin: bool) -> Iterator[dict]:
    """Endless ``{"pixel_values": (B, 3, S, S) uint8, "issues": []}``, one (pinned) tensor copied each step."""
    pixels = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    pixels = pixels.pin_memory() if pin else pixels
    while True:
        yield {"pixel_values": pixels, "issues": []}


def train_images_per_s(run: PretrainingRun, batches, skip: int, steps: int) -> float:
    """Images/s of the run's training loop over ``batches``, timed from optimizer step ``skip`` to ``skip + steps``.

    A step's timestamp is taken when its loss and gradient norm reach the host: with the run's fused AdamW,
    when its update has finished on the GPU (the loop reads them with the next step's first micro-batch
    queued, and drops that micro-batch when it stops).
    """
    stamps: list[float] = []

    def on_step(_) -> bool:
        stamps.append(time.perf_counter())
        return len(stamps) == skip + steps

    run.engine().train_one_epoch(batches, on_step)
    if len(stamps) < skip + steps:
        raise RuntimeError(f"the epoch ended after {len(stamps)} steps, fewer than {skip + steps}")
    return steps * run.global_batch / (stamps[-1] - stamps[skip - 1])


def run_config(args: argparse.Namespace, output_dir: str) -> PretrainConfig:
    """The size's pretraining config (the paper's recipe) with the benchmark's settings."""
    path = CONFIGS / f"convnextv2_{args.size}.yaml"
    return load_pretrain_config(path if path.exists() else None, [
        f"model.name=convnextv2_{args.size}", f"model.backend={args.backend}", f"output_dir={output_dir}",
        f"data.input_size={args.input_size}", f"data.num_workers={args.workers}", f"train.batch_size={args.batch_size}",
        f"data.decode_device={args.decode_device}", f"data.cpu_decode_share={args.cpu_decode_share}",
        f"data.decoder_sms={args.decoder_sms}", f"data.gpu_decoder={args.gpu_decoder}",
        f"train.compile={str(args.compile is not None).lower()}",
        f"train.compile_mode={args.compile or 'default'}", "log.trackers=[]", "log.progress_bar=false",
    ])


def prefetched_batches(workers: int, decode_device: str) -> int:
    """Batches a loader holds ready when its consumer pauses: ``prefetch_factor`` (2) per worker, plus the one
    in the pinning thread, or those the device decoder's two threads hold (each its queue and one in hand)."""
    return 2 * max(workers, 1) + (DECODE_AHEAD + RECEIVE_AHEAD + 2 if decode_device == "cuda" else 1)


def measure_training(args: argparse.Namespace, source: ImageSource) -> dict:
    """Synthetic and real images/s through one run's training loop, alternately for ``args.rounds`` rounds
    (compiled once, by the first synthetic warm-up; both kinds on the run's SM partition, if any); medians,
    their ratio, and every round."""
    with tempfile.TemporaryDirectory() as output_dir:
        run = PretrainingRun(run_config(args, output_dir), dataset=source.dataset)
        pin = run.accelerator.device.type == "cuda"
        real_batches = run.loader.epoch(0)
        synthetic, real = [], []
        prefetched = prefetched_batches(args.workers, args.decode_device)
        with run.on_partition():
            for round_index in range(args.rounds):
                # After a real round its workers refill their prefetch queue. They outrun the loop, so they are
                # done within as many untimed steps as the queue holds.
                settle = args.warmup if round_index == 0 else prefetched + 2
                synthetic.append(train_images_per_s(run, synthetic_batches(args.batch_size, args.input_size, pin),
                                                    settle, args.steps))
                real.append(train_images_per_s(run, real_batches, prefetched, args.steps))
                print(f"round {round_index + 1}/{args.rounds}: synthetic {synthetic[-1]:.1f} img/s, "
                      f"real {real[-1]:.1f} img/s", flush=True)
        device = run.accelerator.device
        precision = run.accelerator.mixed_precision
    medians = statistics.median(synthetic), statistics.median(real)
    per_round = [r / s for r, s in zip(real, synthetic, strict=True)]
    return {"synthetic": medians[0], "real": medians[1], "ratio": medians[1] / medians[0],
            "rounds": {"synthetic": synthetic, "real": real, "ratio": per_round},
            "decoder_sms": args.decoder_sms, "gpu_decoder": args.gpu_decoder, "device_type": device.type,
            "precision": precision}


def process_argv(argv: list[str], index: int, against_whole_gpu: bool) -> list[str]:
    """The command line of fresh process ``index`` (from 0): the caller's, measuring in that one process.
    Under ``--against-whole-gpu`` every odd-numbered process trains on the whole GPU (``--decoder-sms 0``).
    The last occurrence of an option wins, so the appended ones override the caller's."""
    own = [arg for arg in argv if arg != "--against-whole-gpu"]
    whole_gpu = ["--decoder-sms", "0"] if against_whole_gpu and index % 2 else []
    return [*own, *whole_gpu, "--processes", "1"]


def loop_medians(trains: list[dict]) -> dict:
    """Medians over processes of the training loop's synthetic and real images/s and of their ratios; the
    processes' own results under ``processes``."""
    return {"synthetic": statistics.median(t["synthetic"] for t in trains),
            "real": statistics.median(t["real"] for t in trains),
            "ratio": statistics.median(t["ratio"] for t in trains), "processes": trains}


def measure_in_processes(argv: list[str], processes: int, against_whole_gpu: bool = False) -> dict:
    """The whole benchmark in ``processes`` fresh processes of this script, one after another (each prints its
    own table as it ends). They are ordinary ``python benchmark_input.py`` processes: the way these
    measurements ran on the GPU machine.

    Returns:
        The medians over processes of the decode and loader figures and of the training loop's synthetic and
        real speeds and ratios; each process's decode and loader figures under ``per_process``, in the order
        the processes ran, and its training results under ``train["processes"]``. Under
        ``against_whole_gpu`` the loop's medians and ``processes`` are those of the processes on the SM
        partition; those of the processes on the whole GPU are under ``train["whole_gpu"]``, and
        ``train["real_over_whole_gpu"]`` is the median real images/s on the partition over the median
        synthetic images/s on the whole GPU.
    """
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(processes):
            print(f"process {index + 1}/{processes}", flush=True)
            out = Path(scratch) / f"{index}.json"
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()),
                                   *process_argv(argv, index, against_whole_gpu), "--json", str(out)], check=False)
            if done.returncode != 0:
                raise RuntimeError(f"benchmark process {index + 1}/{processes} exited with {done.returncode}")
            runs.append(json.loads(out.read_text()))
    trains = [run["train"] for run in runs]
    train = {**loop_medians(trains[::2] if against_whole_gpu else trains),
             "device_type": trains[0]["device_type"], "precision": trains[0]["precision"]}
    if against_whole_gpu:
        train["whole_gpu"] = loop_medians(trains[1::2])
        train["real_over_whole_gpu"] = train["real"] / train["whole_gpu"]["synthetic"]
    return {
        "decode_ms": {key: statistics.median(run["decode_ms"][key] for run in runs) for key in runs[0]["decode_ms"]},
        "loader": statistics.median(run["loader"] for run in runs),
        "per_process": [{"decode_ms": run["decode_ms"], "loader": run["loader"]} for run in runs],
        "train": train,
    }


def print_table(results: dict) -> None:
    print(f"{'measurement':34} {'value':>10}")
    for reduced, ms in results["decode_ms"].items():
        print(f"{'decode+crop, reduced_decode=' + reduced:34} {ms:8.2f} ms/image")
    settings = results["settings"]
    loader = f"loader ({settings['workers']} workers, {settings['decode_device']})"
    print(f"{loader:34} {results['loader']:8.1f} img/s")
    train = results["train"]
    processes = train.get("processes", [train])
    of = f"median of {settings['rounds']}" + (f", then of {len(processes)} processes" if len(processes) > 1 else "")
    print(f"{'train, synthetic uint8 input':34} {train['synthetic']:8.1f} img/s ({of})")
    print(f"{'train, real loader':34} {train['real']:8.1f} img/s ({of})")
    apart = " (median of the processes')" if len(processes) > 1 else ""
    print(f"{'real / synthetic':34} {train['ratio']:8.3f}{apart}")
    whole = train.get("whole_gpu")
    if whole:
        others = f"median of the other {len(whole['processes'])} processes"
        print(f"{'whole GPU: train, synthetic':34} {whole['synthetic']:8.1f} img/s ({others})")
        print(f"{'whole GPU: real / synthetic':34} {whole['ratio']:8.3f}")
        print(f"{'real / whole-GPU synthetic':34} {train['real_over_whole_gpu']:8.3f}")
    for process in processes + (whole["processes"] if whole else []):
        label = f"per round, decoder_sms={process['decoder_sms']}"
        print(f"{label:34} " + " ".join(f"{r:.3f}" for r in process["rounds"]["ratio"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # process_argv drops --against-whole-gpu by its full name
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "fcmae_imagenet_like",
                   help="folder of JPEGs (written once when missing)")
    p.add_argument("--images", type=int, default=2048, help="JPEG files in the folder")
    p.add_argument("--size", default="tiny", help="convnextv2_<size>")
    p.add_argument("--backend", default="native", choices=["native", "dense", "minkowski"])
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   choices=get_args(get_type_hints(TrainConfig)["compile_mode"]),
                   help="train.compile=true, in train.compile_mode MODE (default: default)")
    p.add_argument("--workers", type=int, default=16, help="data.num_workers")
    p.add_argument("--decode-device", default="cpu", choices=["cpu", "cuda"], help="data.decode_device")
    p.add_argument("--cpu-decode-share", type=float, default=0.0,
                   help="data.cpu_decode_share: with --decode-device cuda, the share of each batch the workers decode")
    p.add_argument("--decoder-sms", type=int, default=0,
                   help="data.decoder_sms: with --decode-device cuda, train on all but about this many SMs")
    p.add_argument("--gpu-decoder", default="direct", choices=GPU_DECODERS,
                   help="data.gpu_decoder: with --decode-device cuda, nvJPEG's hardware decoder called directly, or "
                        "torchvision's decode_jpeg")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=20, help="synthetic optimizer steps before timing (compiles)")
    p.add_argument("--steps", type=int, default=200, help="timed optimizer steps per round, synthetic and real alike")
    p.add_argument("--rounds", type=int, default=3, help="alternating synthetic / real rounds")
    p.add_argument("--processes", type=int, default=1,
                   help="fresh processes that each measure the training loop (median of their ratios)")
    p.add_argument("--against-whole-gpu", action="store_true",
                   help="with --decoder-sms and --processes >= 2: every second process trains on the whole GPU, and "
                        "the table adds the partition's real img/s over the whole GPU's synthetic img/s")
    p.add_argument("--loader-batches", type=int, default=100, help="timed batches of the loader alone")
    p.add_argument("--decode-images", type=int, default=200, help="items timed for the per-image decode cost")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--smoke", action="store_true", help="test model, a few small images, CPU-sized (for tests)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.processes < 1:
        p.error("--rounds, --steps and --processes must be >= 1")
    if args.against_whole_gpu and (args.decoder_sms < 1 or args.processes < 2):
        p.error("--against-whole-gpu needs --decoder-sms >= 1 and --processes >= 2")
    args.image_scale = 1.0
    if args.smoke:
        args.images, args.image_scale, args.size, args.input_size, args.batch_size = 12, 0.25, "test", 64, 4
        args.workers, args.warmup, args.steps, args.loader_batches, args.decode_images = 0, 1, 2, 2, 4
        args.rounds, args.decode_device = 2, "cpu"
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run every measurement; print a table; write JSON when asked. Returns the results."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    make_jpeg_folder(args.data, args.images, args.image_scale)
    results = (measure_in_processes(argv, args.processes, args.against_whole_gpu) if args.processes > 1
               else measure(args))
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results["meta"] = {
        "device": torch.cuda.get_device_name() if results["train"]["device_type"] == "cuda" else "cpu",
        "cpu_cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def measure(args: argparse.Namespace) -> dict:
    """The decode, loader and training measurements in this process."""
    # real rounds only
    train_batches = args.rounds * (prefetched_batches(args.workers, args.decode_device) + args.steps)
    needed = (max(train_batches, max(args.workers, 1) + args.loader_batches) + 1) * args.batch_size
    repeat = math.ceil(needed / args.images)
    source = folder_source(args.data, repeat)
    cfg = load_pretrain_config(None, [f"data.input_size={args.input_size}", f"data.num_workers={args.workers}",
                                      f"data.decode_device={args.decode_device}",
                                      f"data.cpu_decode_share={args.cpu_decode_share}",
                                      f"data.gpu_decoder={args.gpu_decoder}"]).data
    return {
        "decode_ms": {str(on).lower(): decode_ms(source, dataclasses.replace(cfg, reduced_decode=on),
                                                 args.decode_images) for on in (True, False)},
        "loader": loader_images_per_s(cfg, source, args.batch_size, args.loader_batches),
        "train": measure_training(args, source),
    }


if __name__ == "__main__":
    main()
