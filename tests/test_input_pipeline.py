"""Input pipeline: libjpeg and reduced-size JPEG decoding, uint8 batches normalised on the device, the benchmark."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import InterpolationMode

import fcmae
import fcmae.pretraining
import fcmae.transforms
from fcmae.config import ConfigError
from fcmae.data import collate_examples, load_image_source
from fcmae.engine import input_memory_format
from fcmae.images import BadImageError, can_reduce, decode_plain_jpeg, jpeg_bytes, load_image, open_image
from fcmae.loader import WORKER_NICENESS, build_pretrain_loader
from fcmae.pretrain_config import DataConfig, load_pretrain_config
from fcmae.pretraining import run_pretraining
from fcmae.transforms import (
    EvalTransform,
    PretrainTransform,
    dct_reduction,
    keyed_generator,
    normalize_pixels,
    reduced_box,
    resized_crop,
    resized_crop_pixels,
    sample_crop_box,
)
from tests.pretrain_helpers import random_image, reset_accelerate, tiny_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLOSE = 2.5  # mean absolute difference (of 255) between reduced and full decoding of a smooth image
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_input.py"


def smooth_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Low-frequency random colour fields (a bicubic upsampling of an 8x6 grid of noise)."""
    grid = np.random.default_rng(seed).normal(0.0, 60.0, (3, 6, 8)).astype(np.float32)
    planes = [np.asarray(Image.fromarray(g).resize((width, height), Image.BICUBIC)) for g in grid]
    return Image.fromarray(np.clip(np.stack(planes, axis=-1) + 128, 0, 255).astype(np.uint8)).convert(mode)


def jpeg(img: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def both_ways(data: bytes, key: int, size: int = 64, mode: str = "RGB"):
    """(output, notes) of the transform with reduced decoding on, then off, for the same generator key."""
    return [PretrainTransform(size, (0.2, 1.0), (3 / 4, 4 / 3), 0.5, reduced)(
        open_image(data), keyed_generator(key), mode) for reduced in (True, False)]


def test_reduced_decode_is_a_config_switch_on_by_default(tmp_path):
    assert DataConfig().reduced_decode is True
    cfg = load_pretrain_config(None, [f"output_dir={tmp_path}", "data.reduced_decode=false"])
    assert cfg.data.reduced_decode is False
    with pytest.raises(ConfigError, match="data.reduced_decode"):
        load_pretrain_config(None, [f"output_dir={tmp_path}", "data.reduced_decode=sometimes"])
    with pytest.raises(ConfigError, match="did you mean 'data.reduced_decode'"):
        load_pretrain_config(None, [f"output_dir={tmp_path}", "data.reduce_decode=true"])


def test_dct_reduction_is_the_smallest_scale_that_still_covers_the_output():
    assert dct_reduction(447, 1000, 224) == 1
    assert dct_reduction(448, 1000, 224) == 2
    assert dct_reduction(1000, 900, 224) == 4
    assert dct_reduction(1792, 1800, 224) == 8 and dct_reduction(5000, 5000, 224) == 8


def test_load_image_reduces_jpegs_only_and_maps_pixel_edges():
    data = jpeg(smooth_image(401, 301))
    img, notes, factor = load_image(open_image(data), "RGB", reduce=4)
    assert (img.size, notes, factor) == ((101, 76), [], 4)  # ceil(401 / 4) x ceil(301 / 4)
    full, _, _ = load_image(open_image(data), "RGB")
    # the reduced image is the full one averaged over 4x4 blocks (up to JPEG's own rounding)
    blocks = np.asarray(full, dtype=np.float32)[:300, :400].reshape(75, 4, 100, 4, 3).mean(axis=(1, 3))
    assert np.abs(np.asarray(img, dtype=np.float32)[:75, :100] - blocks).mean() < 1.5
    png = io.BytesIO()
    smooth_image(401, 301).save(png, "PNG")
    assert load_image(open_image(png.getvalue()), "RGB", reduce=4)[0].size == (401, 301)
    assert load_image(full, "RGB", reduce=4)[2] == 1  # already decoded: nothing to reduce


def test_reduced_outputs_are_close_to_full_decoding_and_identical_in_form():
    data = jpeg(smooth_image(960, 720))
    for key in range(12):
        (on, notes_on), (off, notes_off) = both_ways(data, key)
        box = sample_crop_box(720, 960, (0.2, 1.0), (3 / 4, 4 / 3), keyed_generator(key))
        assert dct_reduction(box[2], box[3], 64) >= 4  # the reduced path really ran
        assert on.shape == off.shape == (3, 64, 64) and on.dtype == off.dtype == torch.uint8
        assert notes_on == notes_off == []
        # box edges move by at most half a reduced pixel: a fraction of an output pixel
        assert (on.float() - off.float()).abs().mean() < CLOSE
        other_crop, _ = both_ways(data, key + 100)[1]
        assert (on.float() - other_crop.float()).abs().mean() > 20


def test_formats_without_reduction_give_exactly_the_full_decode():
    png = io.BytesIO()
    smooth_image(300, 200).save(png, "PNG")
    (on, _), (off, _) = both_ways(png.getvalue(), key=3)
    assert torch.equal(on, off)


def test_exif_rotated_jpeg_skips_reduction_and_keeps_its_orientation():
    img = smooth_image(600, 300)  # landscape, tagged 'rotate 90 degrees clockwise to display': portrait
    img.paste((255, 0, 0), (0, 0, 300, 300))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg(img, exif=exif.tobytes())
    assert not can_reduce(open_image(data))
    (on, notes), (off, _) = both_ways(data, key=5, size=32)
    assert notes == ["exif"] and torch.equal(on, off)
    displayed, _, factor = load_image(open_image(data), "RGB", reduce=2)
    assert displayed.size == (300, 600) and factor == 1
    assert displayed.getpixel((150, 100))[0] > 200  # the red half is on top once rotated


def test_reduced_decoding_keeps_conversions_and_bad_image_reports():
    cmyk = jpeg(Image.new("CMYK", (512, 512), (0, 255, 255, 0)))
    (on, notes), (off, _) = both_ways(cmyk, key=1)
    assert notes == ["color-space"] and (on.float() - off.float()).abs().max() <= 2
    (gray, notes), _ = both_ways(jpeg(smooth_image(512, 512)), key=2, mode="L")
    assert gray.shape == (1, 64, 64) and notes == ["channels"]
    progressive = jpeg(smooth_image(512, 512), progressive=True)
    (on, _), (off, _) = both_ways(progressive, key=4)
    assert (on.float() - off.float()).abs().mean() < CLOSE
    truncated = jpeg(random_image(0, (512, 512)))
    with pytest.raises(BadImageError) as info:
        both_ways(truncated[: len(truncated) // 2], key=0)
    assert info.value.kind == "corrupt"


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_resized_crop_matches_pils_resampling(mode):
    img = random_image(3, (90, 70), mode="RGBA" if mode == "RGBA" else "RGB").convert(mode)
    for box, size in [((0, 0, 70, 90), 32), ((5, 7, 40, 33), 32), ((12, 3, 20, 61), 32), ((2, 4, 30, 20), 64)]:
        expected = TF.pil_to_tensor(TF.resized_crop(img, *box, [size, size], interpolation=InterpolationMode.BICUBIC,
                                                    antialias=True)).int()
        diff = (resized_crop(img, box, size).int() - expected).abs()
        assert diff.max() <= (0 if mode == "RGBA" else 2) and diff.float().mean() < 0.02


def pil_pixels(data: bytes, mode: str) -> tuple[torch.Tensor, list[str]]:
    img, notes, _ = load_image(open_image(data), mode)
    return TF.pil_to_tensor(img), notes


@pytest.mark.parametrize(("file_mode", "mode"), [("RGB", "RGB"), ("L", "L"), ("L", "RGB")])
def test_plain_jpegs_decode_straight_to_pils_pixels(file_mode, mode):
    for data in (jpeg(random_image(4, (83, 61)).convert(file_mode)),
                 jpeg(smooth_image(120, 90, seed=2, mode=file_mode), progressive=True),
                 jpeg(smooth_image(64, 48, seed=3, mode=file_mode), subsampling=0) + b"\0" * 100):
        pixels, notes = decode_plain_jpeg(open_image(data), mode)
        expected, expected_notes = pil_pixels(data, mode)
        assert torch.equal(pixels, expected) and notes == expected_notes


def test_decode_plain_jpeg_leaves_every_other_file_to_pil():
    exif = Image.Exif()
    exif[0x0112] = 6
    png = io.BytesIO()
    smooth_image(40, 30).save(png, "PNG")
    full = jpeg(random_image(5, (64, 48)))
    others = {"an RGB file read as L": (full, "L"), "PNG": (png.getvalue(), "RGB"),
              "EXIF rotation": (jpeg(smooth_image(40, 30), exif=exif.tobytes()), "RGB"),
              "CMYK": (jpeg(Image.new("CMYK", (40, 30), (0, 255, 255, 0))), "RGB"),
              "truncated": (full[: len(full) // 2], "RGB"),
              "refused by libjpeg": (full[:2] + full[2:200].replace(b"\xff\xc0", b"\xff\xc1") * 2 + full[200:], "RGB")}
    for name, (data, mode) in others.items():
        img = open_image(data)
        assert decode_plain_jpeg(img, mode) is None, name
        try:
            load_image(img, mode)  # the image is still PIL's to decode, or to report
        except BadImageError as error:
            assert error.kind == "corrupt", name


def test_a_file_that_cannot_be_read_is_reported_unreadable():
    class FailingFile(io.BytesIO):
        def read(self, *args):
            raise OSError(5, "Input/output error")

    data = jpeg(random_image(6, (40, 30)))
    img = open_image(data)
    img.fp = FailingFile(data)
    with pytest.raises(BadImageError, match="Input/output error") as info:
        jpeg_bytes(img)
    assert info.value.kind == "unreadable"


@pytest.mark.parametrize("channels", [1, 3])
def test_resized_crop_pixels_is_torchvisions_resized_crop_exactly(channels):
    pixels = TF.pil_to_tensor(random_image(7, (90, 70)).convert("RGB" if channels == 3 else "L"))
    for box, size in [((0, 0, 70, 90), 32), ((5, 7, 40, 33), 32), ((12, 3, 20, 61), 32), ((2, 4, 30, 20), 64)]:
        expected = TF.resized_crop(pixels, *box, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(resized_crop_pixels(pixels, box, size), expected)


@pytest.mark.parametrize("reduced", [True, False])
def test_training_crops_are_the_same_whether_libjpeg_or_pil_decodes(monkeypatch, reduced):
    files = [jpeg(smooth_image(300, 200, seed=s)) for s in range(4)] + [jpeg(random_image(8, (50, 40)).convert("L"))]
    transform = PretrainTransform(64, (0.2, 1.0), (3 / 4, 4 / 3), 0.5, reduced)

    def crops():
        return [transform(open_image(data), keyed_generator(key), "RGB") for key, data in enumerate(files * 3)]

    with_libjpeg = crops()
    monkeypatch.setattr(fcmae.transforms, "decode_plain_jpeg", lambda img, mode: None)
    with_pil = crops()
    for (got, got_notes), (want, want_notes) in zip(with_libjpeg, with_pil, strict=True):
        assert torch.equal(got, want) and got_notes == want_notes


def test_reduced_box_lands_on_the_reduced_pixel_grid():
    assert reduced_box((10, 20, 300, 400), 1) == (10, 20, 300, 400)
    assert reduced_box((10, 21, 301, 400), 4) == (2, 5, 76, 100)  # edges 10/4, 21/4, 311/4, 421/4 rounded


def test_device_normalisation_is_the_cpu_float_math_exactly():
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    before = TF.normalize(pixels.float().div(255.0), list(MEAN), list(STD))  # what the workers used to ship
    after = normalize_pixels(pixels, MEAN, STD, torch.channels_last)
    assert after.dtype == torch.float32 and after.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(after, before)
    model = fcmae.create_fcmae("convnextv2_test", decoder_embed_dim=16)
    losses = [model(x, generator=keyed_generator(0)).loss.item() for x in (before, after)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    white = Image.new("RGB", (40, 50), (255, 255, 255))
    torch.testing.assert_close(EvalTransform(32, MEAN, STD)(white),
                               normalize_pixels(torch.full((3, 32, 32), 255, dtype=torch.uint8), MEAN, STD))


def test_training_batches_are_uint8_and_input_follows_the_model_layout(tmp_path):
    cfg = DataConfig(generated_images=8, input_size=32, num_workers=0)
    loader = build_pretrain_loader(cfg, load_image_source(cfg), in_chans=3, batch_size=4, accumulation=1, rank=0,
                                   world_size=1, seed=0)
    batch = next(iter(loader.epoch(0)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.uint8
    items = [{"pixel_values": torch.zeros(3, 8, 8, dtype=torch.uint8), "issues": []}] * 2
    assert collate_examples(items)["pixel_values"].dtype == torch.uint8
    model = fcmae.create_fcmae("convnextv2_test")
    assert input_memory_format(model) == torch.contiguous_format
    assert input_memory_format(model.to(memory_format=torch.channels_last)) == torch.channels_last


def test_channels_last_run_on_reduced_jpegs_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(fcmae.pretraining, "prefers_channels_last", lambda device: True)
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for i in range(8):
        smooth_image(200 + 8 * i, 180, seed=i).save(folder / f"{i}.jpg", quality=90)
    common = [f"data.path={folder}", "train.epochs=2"]
    try:
        straight = run_pretraining(tiny_config(tmp_path / "a", *common))
        reset_accelerate()
        run_pretraining(tiny_config(tmp_path / "b", *common, "train.max_steps=2"))
        reset_accelerate()
        resumed = run_pretraining(tiny_config(tmp_path / "b", *common))
    finally:
        reset_accelerate()
    log = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "resume"] == [2]
    a = load_file(straight / "weights" / "fcmae.safetensors")
    b = load_file(resumed / "weights" / "fcmae.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_input", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_generated_photos_have_realistic_jpeg_sizes():
    bench = _benchmark()
    photo = bench.random_photo(np.random.default_rng(0), 500, 375)
    assert 60_000 < len(jpeg(photo)) < 160_000  # ImageNet's JPEGs average about 110 KB


def test_input_benchmark_passes_its_decoding_settings_to_the_run(tmp_path):
    bench = _benchmark()
    args = bench.parse_args(["--decode-device", "cuda", "--cpu-decode-share", "0.4", "--decoder-sms", "4"])
    data = bench.run_config(args, str(tmp_path)).data
    assert (data.decode_device, data.cpu_decode_share, data.decoder_sms) == ("cuda", 0.4, 4)


def test_input_benchmark_smoke_writes_json(tmp_path):
    bench = _benchmark()
    out = tmp_path / "input.json"
    try:
        results = bench.main(["--smoke", "--data", str(tmp_path / "jpegs"), "--json", str(out)])
    finally:
        reset_accelerate()
    assert len(list((tmp_path / "jpegs").glob("*.jpg"))) == 12
    assert set(results["decode_ms"]) == {"true", "false"} and all(v > 0 for v in results["decode_ms"].values())
    train = results["train"]
    assert results["loader"] > 0 and train["synthetic"] > 0 and train["real"] > 0
    assert train["ratio"] == pytest.approx(train["real"] / train["synthetic"])
    assert len(train["rounds"]["real"]) == len(train["rounds"]["synthetic"]) == 2  # --smoke alternates twice
    assert train["real"] == pytest.approx(float(np.median(train["rounds"]["real"])))
    saved = json.loads(out.read_text())
    assert saved["meta"]["device"] == "cpu" and saved["settings"]["size"] == "test"


def test_input_benchmark_measures_in_fresh_processes(tmp_path, capfd):
    bench = _benchmark()
    out = tmp_path / "apart.json"
    results = bench.main(["--smoke", "--data", str(tmp_path / "jpegs"), "--processes", "2", "--json", str(out)])
    train = results["train"]
    assert len(train["processes"]) == 2 and json.loads(out.read_text())["settings"]["processes"] == 2
    assert results["loader"] > 0 and set(results["decode_ms"]) == {"true", "false"}
    assert [set(p["decode_ms"]) for p in results["per_process"]] == [{"true", "false"}] * 2
    assert results["loader"] == pytest.approx(float(np.median([p["loader"] for p in results["per_process"]])))
    assert all(len(p["rounds"]["ratio"]) == 2 and p["real"] > 0 for p in train["processes"])
    assert train["ratio"] == pytest.approx(float(np.median([p["ratio"] for p in train["processes"]])))
    assert train["real"] == pytest.approx(float(np.median([p["real"] for p in train["processes"]])))
    printed = capfd.readouterr().out
    assert "process 2/2" in printed and printed.count("real / synthetic") == 3  # each process's table, then theirs
    assert "median of the processes'" in printed


def test_a_failed_benchmark_process_stops_the_benchmark(tmp_path, monkeypatch):
    bench = _benchmark()
    monkeypatch.setattr(bench.sys, "executable", "false")  # every process exits with 1 at once
    with pytest.raises(RuntimeError, match="process 1/2 exited with 1"):
        bench.main(["--smoke", "--data", str(tmp_path / "jpegs"), "--processes", "2"])


def test_loader_workers_run_nicer_than_the_training_process():
    cfg = DataConfig(generated_images=8, input_size=32, num_workers=1)
    loader = build_pretrain_loader(cfg, load_image_source(cfg), in_chans=3, batch_size=4, accumulation=1, rank=0,
                                   world_size=1, seed=0)
    next(iter(loader.epoch(0)))  # starts the (persistent) worker
    (worker,) = loader.loader._iterator._workers
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, worker.pid) == min(own + WORKER_NICENESS, 19)


@pytest.mark.parametrize("flag", ["--rounds", "--steps", "--processes"])
def test_input_benchmark_refuses_fewer_than_one(flag, capsys):
    with pytest.raises(SystemExit):
        _benchmark().parse_args([flag, "0"])
    assert "--processes must be >= 1" in capsys.readouterr().err


def test_input_benchmark_against_whole_gpu_alternates_the_partition():
    bench = _benchmark()
    argv = ["--decode-device", "cuda", "--decoder-sms", "4", "--against-whole-gpu", "--processes", "4"]
    lines = [bench.process_argv(argv, index, against_whole_gpu=True) for index in range(4)]
    parsed = [bench.parse_args(line) for line in lines]
    assert [a.decoder_sms for a in parsed] == [4, 0, 4, 0]
    assert all(a.processes == 1 and not a.against_whole_gpu for a in parsed)
    assert bench.parse_args(bench.process_argv(argv, 1, against_whole_gpu=False)).decoder_sms == 4


@pytest.mark.parametrize("argv", [["--decoder-sms", "4", "--against-whole-gpu", "--processes", "1"],
                                  ["--against-whole-gpu", "--processes", "2"],
                                  ["--decoder-sms", "4", "--against-whole", "--processes", "2"]])
def test_input_benchmark_refuses_a_whole_gpu_baseline_it_cannot_measure(argv):
    with pytest.raises(SystemExit):
        _benchmark().parse_args(["--decode-device", "cuda", *argv])


def test_input_benchmark_divides_partitioned_real_by_whole_gpu_synthetic(monkeypatch, capsys):
    bench = _benchmark()
    speeds = {4: iter([(6200.0, 5800.0), (6300.0, 5900.0)]), 0: iter([(6500.0, 5500.0), (6600.0, 5600.0)])}
    loaders = iter([9000.0, 8000.0, 8500.0, 9500.0])

    def fake_process(command, check):
        args = bench.parse_args(command[2:])
        synthetic, real = next(speeds[args.decoder_sms])
        train = {"synthetic": synthetic, "real": real, "ratio": real / synthetic, "decoder_sms": args.decoder_sms,
                 "rounds": {"ratio": [real / synthetic]}, "device_type": "cuda", "precision": "bf16"}
        args.json.write_text(json.dumps({"decode_ms": {"true": 2.0}, "loader": next(loaders), "train": train}))
        return bench.subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_process)
    argv = ["--decode-device", "cuda", "--decoder-sms", "4", "--against-whole-gpu", "--processes", "4"]
    results = bench.measure_in_processes(argv, 4, against_whole_gpu=True)
    assert [p["loader"] for p in results["per_process"]] == [9000.0, 8000.0, 8500.0, 9500.0]  # in run order
    train = results["train"]
    assert [p["decoder_sms"] for p in train["processes"]] == [4, 4]
    assert [p["decoder_sms"] for p in train["whole_gpu"]["processes"]] == [0, 0]
    assert (train["synthetic"], train["real"]) == (6250.0, 5850.0)
    assert (train["whole_gpu"]["synthetic"], train["whole_gpu"]["real"]) == (6550.0, 5550.0)
    assert train["real_over_whole_gpu"] == pytest.approx(5850.0 / 6550.0)
    bench.print_table({"decode_ms": {"true": 2.0}, "loader": 9000.0, "train": train,
                       "settings": {"workers": 14, "decode_device": "cuda", "rounds": 1}})
    out = capsys.readouterr().out
    assert "then of 2 processes" in out and "6550.0 img/s (median of the other 2 processes)" in out
    assert "real / whole-GPU synthetic            0.893" in out
