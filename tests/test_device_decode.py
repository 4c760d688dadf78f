"""Decoding and cropping JPEGs on a device in the training process (``data.decode_device``), run on the CPU."""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import fcmae.device_decode as device_decode
from fcmae.config import ConfigError
from fcmae.data import ImageSource, PretrainImages
from fcmae.device_decode import (
    DeviceCropDecoder,
    EncodedPretrainImages,
    _chunks,
    decode_ahead,
    pack_encoded,
)
from fcmae.loader import build_pretrain_loader, decode_device
from fcmae.pretrain_config import DataConfig
from fcmae.transforms import PretrainTransform

SIZE = 32
CPU = torch.device("cpu")


def photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth random colours with an asymmetric ramp (a flip shows)."""
    rng = np.random.default_rng(seed)
    grid = rng.normal(0.0, 50.0, (3, 5, 7)).astype(np.float32)
    planes = [np.asarray(Image.fromarray(g).resize((width, height), Image.BICUBIC)) for g in grid]
    ramp = np.linspace(-60, 60, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(np.stack(planes, axis=-1) + 128 + ramp, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def encoded(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **kwargs)
    return buffer.getvalue()


def exif_rotated(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(img, exif=exif.tobytes())


def source_of(files: list[bytes]) -> ImageSource:
    return ImageSource(datasets.Dataset.from_dict({"image": files}), "image", [])


def datasets_pair(files: list[bytes], mode: str = "RGB",
                  cpu_decode_share: float = 0.0) -> tuple[EncodedPretrainImages, PretrainImages]:
    """The device path's dataset and the CPU path's (full-size decoding, as the device decodes)."""
    cfg = DataConfig(input_size=SIZE, max_bad_in_a_row=4, decode_device="cuda", cpu_decode_share=cpu_decode_share)
    transform = PretrainTransform(SIZE, cfg.crop_scale, cfg.crop_ratio, 0.5, reduced_decode=False)
    in_chans = {"RGB": 3, "L": 1}[mode]
    return tuple(cls(source_of(files), transform, cfg, in_chans, seed=3)
                 for cls in (EncodedPretrainImages, PretrainImages))


def assert_same_crops(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The same crops and flips, resampled in float and by torch's two-pass uint8 kernel (which rounds in
    between): a level apart at most. (A crop 2 px off differs by about 1.3 levels on average, 6 at most.)"""
    diff = (got.int() - want.int()).abs()
    assert got.shape == want.shape and diff.max() <= 1 and diff.float().mean() < 0.25, (diff.max(), diff.float().mean())
    return True


def collate_keys(images: EncodedPretrainImages, keys: list[tuple[int, int]]) -> dict:
    """What a worker packs and the training process decodes."""
    return DeviceCropDecoder(SIZE, CPU, images)(pack_encoded([images[k] for k in keys]))


def cpu_batch(images: PretrainImages, keys: list[tuple[int, int]]) -> dict:
    items = [images[k] for k in keys]
    return {"pixel_values": torch.stack([i["pixel_values"] for i in items]),
            "issues": [issue for i in items for issue in i["issues"]]}


JPEGS = [encoded(photo(120, 90, 0)), encoded(photo(70, 100, 1)), encoded(photo(24, 40, 2)),  # the last is small
         encoded(photo(96, 96, 3, "L"))]


def test_jpegs_leave_the_worker_undecoded_with_the_cpu_paths_crop_and_flip():
    on_device, on_cpu = datasets_pair(JPEGS)
    keys = [(e, i) for e in range(3) for i in range(len(JPEGS))]
    assert all("encoded" in on_device[k] for k in keys)
    flips = [on_device[k]["encoded"].flip for k in keys]
    assert any(flips) and not all(flips)
    got, want = collate_keys(on_device, keys), cpu_batch(on_cpu, keys)
    assert got["pixel_values"].shape == (len(keys), 3, SIZE, SIZE) and got["pixel_values"].dtype == torch.uint8
    # libjpeg-turbo behind both decoders; the batched float resampling rounds a pixel a level apart at most.
    assert_same_crops(got["pixel_values"], want["pixel_values"])
    assert got["issues"] == want["issues"]
    assert {kind for kind, _, _ in got["issues"]} == {"converted:small", "converted:channels"}


def test_grayscale_runs_decode_grayscale_on_the_device():
    on_device, on_cpu = datasets_pair(JPEGS, mode="L")
    keys = [(0, i) for i in range(len(JPEGS))]
    got, want = collate_keys(on_device, keys), cpu_batch(on_cpu, keys)
    assert got["pixel_values"].shape == (len(keys), 1, SIZE, SIZE) and got["issues"] == want["issues"]
    diff = (got["pixel_values"].int() - want["pixel_values"].int()).abs().amax(dim=(1, 2, 3))
    # libjpeg takes a colour JPEG's luma plane as it is; PIL recomputes luma from the decoded RGB.
    assert diff[:3].max() <= 2 and diff[3] <= 1  # the grayscale JPEG decodes identically, then is resampled


def test_images_nvjpeg_is_not_given_are_decoded_on_the_cpu_and_reported_alike():
    truncated = encoded(photo(120, 90, 4))[:-400]
    files = [encoded(photo(80, 60, 5), "PNG"), exif_rotated(photo(90, 60, 6)),
             encoded(Image.new("CMYK", (64, 48), (0, 200, 200, 0))), truncated, encoded(photo(100, 80, 7))]
    on_device, on_cpu = datasets_pair(files)
    keys = [(0, i) for i in range(len(files))]
    # The truncated file is skipped by PIL and replaced by the next file, a good JPEG.
    assert ["encoded" in on_device[k] for k in keys] == [False, False, False, True, True]
    got, want = collate_keys(on_device, keys), cpu_batch(on_cpu, keys)
    assert_same_crops(got["pixel_values"], want["pixel_values"]) and got["issues"] == want["issues"]
    kinds = [kind for kind, _, _ in got["issues"]]
    assert "converted:exif" in kinds and "converted:color-space" in kinds and "skipped:corrupt" in kinds


def test_progressive_jpegs_and_bytes_after_the_end_marker_stay_on_the_device():
    files = [encoded(photo(120, 90, 8), progressive=True), encoded(photo(100, 70, 9)) + b"\0" * 1000]
    on_device, on_cpu = datasets_pair(files)
    keys = [(0, 0), (0, 1)]
    assert all("encoded" in on_device[k] for k in keys)
    got, want = collate_keys(on_device, keys), cpu_batch(on_cpu, keys)
    assert_same_crops(got["pixel_values"], want["pixel_values"]) and got["issues"] == want["issues"]


def test_a_file_the_device_decoder_refuses_is_redone_on_the_cpu(monkeypatch, caplog):
    refused = JPEGS[1]
    real_decode = device_decode.decode_jpeg
    calls = []

    def picky_decode(data, **kwargs):
        batch = data if isinstance(data, list) else [data]
        calls.append(len(batch))
        if any(bytes(d.numpy()) == refused for d in batch):
            raise RuntimeError("nvjpeg refused it")
        return real_decode(data, **kwargs)

    monkeypatch.setattr(device_decode, "decode_jpeg", picky_decode)
    on_device, on_cpu = datasets_pair(JPEGS)
    keys = [(1, i) for i in range(len(JPEGS))]
    with caplog.at_level(logging.WARNING, logger="fcmae.device_decode"):
        got, want = collate_keys(on_device, keys), cpu_batch(on_cpu, keys)
    assert calls == [4, 1, 1, 1, 1]  # the batch call fails, then one call per file
    assert_same_crops(got["pixel_values"], want["pixel_values"]) and got["issues"] == want["issues"]
    assert [r.getMessage() for r in caplog.records] == [
        "the device decoder refused sample (1, 1) (nvjpeg refused it); it and any later refusals are decoded on "
        "the CPU"]


def refusing(monkeypatch, refused: set[bytes]) -> None:
    """The device decoder refuses ``refused`` files (a batch call holding one fails as a whole)."""
    real_decode = device_decode.decode_jpeg

    def picky_decode(data, **kwargs):
        if any(bytes(d.numpy()) in refused for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpeg refused it")
        return real_decode(data, **kwargs)

    monkeypatch.setattr(device_decode, "decode_jpeg", picky_decode)


PNGS = [encoded(photo(80, 60, 10), "PNG"), encoded(photo(70, 50, 11), "PNG")]


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("pixels_per_call", [1, 3 * 120 * 90, 1 << 26])  # one file, a few, all per call
def test_cpu_decoded_refused_and_device_samples_keep_their_places_in_the_batch(monkeypatch, mode,
                                                                                pixels_per_call):
    files = [PNGS[0], JPEGS[1], JPEGS[0], PNGS[1], JPEGS[2], JPEGS[3], exif_rotated(photo(90, 60, 6))]
    refusing(monkeypatch, {JPEGS[1], JPEGS[2]})
    monkeypatch.setattr(device_decode, "DECODE_PIXELS_PER_CALL", pixels_per_call)
    on_device, on_cpu = datasets_pair(files, mode)
    keys = [(2, i) for i in (3, 1, 0, 5, 2, 6, 4)] + [(3, i) for i in range(len(files))]
    got, want = collate_keys(on_device, keys), cpu_batch(on_cpu, keys)
    assert_same_crops(got["pixel_values"], want["pixel_values"]) and got["issues"] == want["issues"]


@pytest.mark.parametrize("refused", [set(), set(JPEGS)], ids=["none refused", "all refused"])
def test_batches_without_a_device_crop_are_the_cpu_paths(monkeypatch, refused):
    refusing(monkeypatch, refused)
    files = PNGS + ([] if refused else [exif_rotated(photo(90, 60, 6))]) + (JPEGS if refused else [])
    on_device, on_cpu = datasets_pair(files)
    keys = [(0, i) for i in range(len(files))]
    got, want = collate_keys(on_device, keys), cpu_batch(on_cpu, keys)
    assert torch.equal(got["pixel_values"], want["pixel_values"]) and got["issues"] == want["issues"]


@pytest.mark.parametrize("fault", [
    torch.OutOfMemoryError("device fault"), torch.AcceleratorError("device fault"),
    # what torchvision raises when an allocation or a kernel fails inside its nvJPEG call
    RuntimeError("Error while decoding JPEG images: CUDA out of memory. Tried to allocate 20.00 MiB"),
    RuntimeError("Error while decoding JPEG images: CUDA error: an illegal memory access was encountered"),
])
def test_device_faults_stop_the_run_instead_of_falling_back(monkeypatch, fault):
    def failing_decode(data, **kwargs):
        raise fault

    monkeypatch.setattr(device_decode, "decode_jpeg", failing_decode)
    on_device, _ = datasets_pair(JPEGS)
    with pytest.raises(type(fault), match=str(fault)[-20:]):
        collate_keys(on_device, [(0, 0), (0, 1)])


@pytest.mark.parametrize(("share", "on_workers"), [(0.0, 0), (0.3, 2), (0.5, 3), (1.0, 6)])
def test_workers_decode_their_share_of_each_batch_as_the_cpu_path_does(share, on_workers):
    on_device, on_cpu = datasets_pair(JPEGS[:3], cpu_decode_share=share)
    keys = [(1, i) for i in (2, 0, 1, 1, 0, 2)]
    items = on_device.__getitems__(keys)
    assert ["encoded" not in item for item in items] == [True] * on_workers + [False] * (len(keys) - on_workers)
    for item, key in zip(items[:on_workers], keys, strict=False):
        assert torch.equal(item["pixel_values"], on_cpu[key]["pixel_values"])
    got, want = DeviceCropDecoder(SIZE, CPU, on_device)(pack_encoded(items)), cpu_batch(on_cpu, keys)
    assert torch.equal(got["pixel_values"][:on_workers], want["pixel_values"][:on_workers])
    assert_same_crops(got["pixel_values"], want["pixel_values"]) and got["issues"] == want["issues"]


def test_decode_calls_are_bounded_in_pixels_and_give_the_same_batch(monkeypatch):
    on_device, _ = datasets_pair(JPEGS)
    keys = [(0, i) for i in range(len(JPEGS))] * 2
    whole = collate_keys(on_device, keys)
    monkeypatch.setattr(device_decode, "DECODE_PIXELS_PER_CALL", 120 * 90 + 70 * 100)
    assert torch.equal(collate_keys(on_device, keys)["pixel_values"], whole["pixel_values"])
    pixels = [on_device[k]["encoded"].pixels for k in keys]
    assert _chunks(pixels, 120 * 90 + 70 * 100) == [2, 2, 2, 2]
    assert _chunks(pixels, 1) == [1] * len(pixels)  # a larger image still gets a call


@pytest.mark.parametrize(("share", "files_per_call"), [(0.0, 4), (0.5, 2)])
def test_loader_decoding_on_a_device_gives_the_cpu_loaders_batches(share, files_per_call):
    cfg = DataConfig(input_size=SIZE, num_workers=2, reduced_decode=False)
    source = source_of([encoded(photo(60 + 4 * i, 50 + 3 * i, 10 + i)) for i in range(24)])
    common = dict(in_chans=3, batch_size=4, accumulation=1, rank=0, world_size=1, seed=5)
    on_device = build_pretrain_loader(dataclasses.replace(cfg, decode_device="cuda", cpu_decode_share=share), source,
                                      decode_device=CPU, **common)
    on_cpu = build_pretrain_loader(cfg, source, **common)
    calls = []
    decode = on_device.decoder.crop_on_device
    on_device.decoder.crop_on_device = lambda encoded, files: calls.append(len(files)) or decode(encoded, files)
    batches = list(zip(on_device.epoch(1), on_cpu.epoch(1), strict=True))
    assert len(batches) == 6 and calls == [files_per_call] * 6
    for got, want in batches:
        assert_same_crops(got["pixel_values"], want["pixel_values"]) and got["issues"] == want["issues"]


def test_decode_device_is_checked_against_the_run():
    assert decode_device(DataConfig(), CPU) is None
    assert decode_device(DataConfig(decode_device="cuda"), torch.device("cuda", 1)) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="decode_device.*CUDA device"):
        decode_device(DataConfig(decode_device="cuda"), CPU)
    with pytest.raises(ConfigError, match="decode_device"):
        DataConfig(decode_device="gpu").validate()
    with pytest.raises(ConfigError, match="cpu_decode_share.*needs decode_device=cuda"):
        DataConfig(cpu_decode_share=0.5).validate()
    with pytest.raises(ConfigError, match=r"cpu_decode_share.*\[0, 1\], got 1.5"):
        DataConfig(decode_device="cuda", cpu_decode_share=1.5).validate()
    with pytest.raises(ConfigError, match="gpu_decoder.*direct or torchvision, got 'nvjpeg'"):
        DataConfig(decode_device="cuda", gpu_decoder="nvjpeg").validate()


def test_rgba_input_refuses_device_decoding():
    cfg = DataConfig(input_size=SIZE)
    with pytest.raises(ConfigError, match="decode_device.*RGBA of in_chans=4"):
        build_pretrain_loader(cfg, source_of(JPEGS * 2), in_chans=4, batch_size=2, accumulation=1, rank=0,
                              world_size=1, seed=0, decode_device=CPU)


def test_streaming_datasets_refuse_device_decoding():
    cfg = DataConfig(input_size=SIZE, num_samples=8)
    stream = datasets.Dataset.from_dict({"image": JPEGS * 2}).to_iterable_dataset()
    with pytest.raises(ConfigError, match="decode_device.*map-style"):
        build_pretrain_loader(cfg, ImageSource(stream, "image", []), in_chans=3, batch_size=2, accumulation=1,
                              rank=0, world_size=1, seed=0, decode_device=CPU)


class RecordingDecoder:
    """Stands in for :class:`DeviceCropDecoder`: numbers its batches and notes the thread it ran in."""

    device = CPU

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.threads = fail_at, []

    def __call__(self, batch: int) -> dict:
        self.threads.append(threading.current_thread().name)
        if batch == self.fail_at:
            raise ValueError(f"batch {batch} is broken")
        return {"pixel_values": torch.full((1,), batch), "issues": []}


BACKGROUND_THREADS = {"fcmae-device-decode", "fcmae-receive"}


def running_background_threads() -> set[str]:
    return BACKGROUND_THREADS & {t.name for t in threading.enumerate()}


def test_decoding_ahead_gives_every_batch_in_order_from_a_background_thread():
    decoder = RecordingDecoder()
    got = [int(b["pixel_values"]) for b in decode_ahead(iter(range(7)), decoder, depth=2)]
    assert got == list(range(7)) and set(decoder.threads) == {"fcmae-device-decode"}


def test_the_loaders_batches_are_received_by_a_thread_of_their_own():
    pulled_by = []

    def loader():
        for i in range(5):
            pulled_by.append(threading.current_thread().name)
            yield i

    assert [int(b["pixel_values"]) for b in decode_ahead(loader(), RecordingDecoder())] == list(range(5))
    assert set(pulled_by) == {"fcmae-receive"}
    assert not running_background_threads()


def test_an_error_while_decoding_ahead_reaches_the_loop_at_its_batch():
    got = []
    with pytest.raises(ValueError, match="batch 3 is broken"):
        for b in decode_ahead(iter(range(7)), RecordingDecoder(fail_at=3)):
            got.append(int(b["pixel_values"]))
    assert got == [0, 1, 2]
    assert not running_background_threads()


def test_an_error_in_the_loader_reaches_the_loop_at_its_batch():
    def loader():
        yield from range(3)
        raise OSError("worker 2 died")

    got = []
    with pytest.raises(OSError, match="worker 2 died"):
        for b in decode_ahead(loader(), RecordingDecoder()):
            got.append(int(b["pixel_values"]))
    assert got == [0, 1, 2]
    assert not running_background_threads()


def test_leaving_an_epoch_early_while_the_thread_waits_for_the_loader_stops_it():
    def slow():
        for i in range(100):
            time.sleep(0.2)
            yield i

    batches = decode_ahead(slow(), RecordingDecoder(), depth=2)
    assert int(next(batches)["pixel_values"]) == 0
    batches.close()  # the receiving thread is inside next(slow()): it finishes that pull, then stops
    assert not running_background_threads()


def test_leaving_an_epoch_early_stops_both_threads_and_closes_the_loaders_iterator():
    pulled, closed = [], []

    def endless():
        try:
            while True:
                pulled.append(len(pulled))
                yield len(pulled) - 1
        finally:
            closed.append(threading.current_thread().name)

    batches = decode_ahead(endless(), RecordingDecoder(), depth=2)
    assert int(next(batches)["pixel_values"]) == 0
    batches.close()
    assert not running_background_threads()
    assert closed == ["fcmae-receive"]
    # The one consumed; per thread its queue, one in hand and one waiting to be offered.
    assert len(pulled) <= 1 + (2 + 2) + (device_decode.RECEIVE_AHEAD + 2)


def test_each_workers_batch_is_freed_by_the_consumer_that_drops_it():
    """A worker's batch holds shared memory, whose unmapping holds the GIL: it travels with its pixels and is
    freed where the training loop drops them, never in the receiving or decoding thread."""
    import gc
    import weakref

    on_device, _ = datasets_pair(JPEGS[:3], cpu_decode_share=0.5)
    freed_in: list[str] = []
    batches = [pack_encoded(on_device.__getitems__([(epoch, i) for i in range(3)])) for epoch in range(6)]
    for batch in batches:
        weakref.finalize(batch, lambda: freed_in.append(threading.current_thread().name))
    del batch

    def slow_loader():  # the threads wait for the next batch while the loop drops the last (each holds none)
        while batches:
            time.sleep(0.1)
            yield batches.pop(0)  # the pipeline holds the only references

    gc.disable()  # a collection could free a batch in whichever thread it ran
    try:
        # A plain loop: enumerate() would keep the last item alive itself.
        for item in decode_ahead(slow_loader(), DeviceCropDecoder(SIZE, CPU, on_device), depth=2):
            assert isinstance(item["worker_batch"], device_decode.EncodedBatch)
            received = len(freed_in)
            del item
            assert len(freed_in) == received + 1
    finally:
        gc.enable()
    assert freed_in == ["MainThread"] * 6
