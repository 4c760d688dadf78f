"""The direct hardware decoder's place in the device decoding path, run on the CPU with a stand-in for it.

The decoder itself needs a GPU with JPEG engines: tests/test_gpu.py checks its pixels against torchvision's.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import types

import pytest
import torch
from torchvision.io import ImageReadMode, decode_jpeg

import fcmae.device_decode as device_decode
import fcmae.nvjpeg as nvjpeg
from fcmae.device_decode import DeviceCropDecoder, hardware_decoder, pack_encoded
from fcmae.nvjpeg import HardwareDecoderUnavailable, NvjpegError
from tests.test_device_decode import CPU, JPEGS, SIZE, assert_same_crops, cpu_batch, datasets_pair, encoded, photo

PROGRESSIVE = encoded(photo(80, 60, 12), progressive=True)


class StandIn:
    """Takes the files nvJPEG's hardware decoder would (baseline JPEGs, decoded here by libjpeg-turbo) and
    leaves progressive ones; a batch holding one of ``failing`` fails as a whole, as nvJPEG's does."""

    def __init__(self, failing: frozenset[bytes] = frozenset(), fault: Exception | None = None):
        self.failing, self.fault, self.calls = failing, fault, []

    def decode(self, files: list[torch.Tensor], channels: int) -> list[torch.Tensor | None]:
        self.calls.append(len(files))
        if self.fault is not None:
            raise self.fault
        if any(bytes(f.numpy()) in self.failing for f in files):
            raise NvjpegError("nvjpegDecodeBatched", 3)
        mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        return [None if bytes(f.numpy()) == PROGRESSIVE else decode_jpeg(f, mode=mode) for f in files]


def with_stand_in(monkeypatch, stand_in: StandIn, refused: frozenset[bytes] = frozenset()) -> list[int]:
    """Route the direct decoder to ``stand_in``; torchvision's decoder refuses ``refused`` files. Returns the
    file counts of torchvision's calls, as they happen."""
    real_decode, calls = device_decode.decode_jpeg, []

    def torchvision_decode(data, **kwargs):
        batch = data if isinstance(data, list) else [data]
        calls.append(len(batch))
        if any(bytes(d.numpy()) in refused for d in batch):
            raise RuntimeError("nvjpeg refused it")
        return real_decode(data, **kwargs)

    monkeypatch.setattr(device_decode, "decode_jpeg", torchvision_decode)
    monkeypatch.setattr(device_decode, "hardware_decoder", lambda device, choice: stand_in)
    return calls


def batch_of(files: list[bytes], mode: str = "RGB"):
    on_device, on_cpu = datasets_pair(files, mode)
    keys = [(0, i) for i in range(len(files))]
    return on_device, on_cpu, keys, pack_encoded([on_device[k] for k in keys])


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_the_direct_decoder_takes_what_it_can_and_torchvision_the_rest(monkeypatch, mode):
    files = [JPEGS[0], PROGRESSIVE, *JPEGS[1:]]
    on_device, _, _, batch = batch_of(files, mode)
    want = DeviceCropDecoder(SIZE, CPU, on_device, "torchvision")(batch)
    stand_in = StandIn()
    torchvision_calls = with_stand_in(monkeypatch, stand_in)
    got = DeviceCropDecoder(SIZE, CPU, on_device, "direct")(batch)
    assert stand_in.calls == [len(files)] and torchvision_calls == [1]  # the progressive file alone
    assert torch.equal(got["pixel_values"], want["pixel_values"]) and got["issues"] == want["issues"]


def test_a_batch_the_direct_decoder_fails_is_decoded_file_by_file(monkeypatch, caplog):
    damaged = JPEGS[1]
    on_device, on_cpu, keys, batch = batch_of(JPEGS)
    stand_in = StandIn(failing=frozenset({damaged}))
    torchvision_calls = with_stand_in(monkeypatch, stand_in, refused=frozenset({damaged}))
    with caplog.at_level(logging.WARNING, logger="fcmae.device_decode"):
        got = DeviceCropDecoder(SIZE, CPU, on_device, "direct")(batch)
    want = cpu_batch(on_cpu, keys)
    assert stand_in.calls == [len(JPEGS)] and torchvision_calls == [1] * len(JPEGS)
    assert_same_crops(got["pixel_values"], want["pixel_values"]) and got["issues"] == want["issues"]
    assert "refused sample (0, 1)" in caplog.text


def test_after_three_failed_batches_in_a_row_torchvisions_decoder_takes_over(monkeypatch, caplog):
    on_device, _, _, batch = batch_of(JPEGS[:2])
    want = DeviceCropDecoder(SIZE, CPU, on_device, "torchvision")(batch)["pixel_values"]
    stand_in = StandIn(failing=frozenset(JPEGS[:2]))
    with_stand_in(monkeypatch, stand_in)
    decoder = DeviceCropDecoder(SIZE, CPU, on_device, "direct")
    with caplog.at_level(logging.WARNING, logger="fcmae.device_decode"):
        outcomes = []
        for fails in (True, True, False, True, True, True, True):  # a batch decoded in between resets the count
            stand_in.failing = frozenset(JPEGS[:2]) if fails else frozenset()
            outcomes.append(torch.equal(decoder(batch)["pixel_values"], want))
    assert all(outcomes) and stand_in.calls == [2] * 6  # the seventh batch no longer reaches it
    assert [r.getMessage() for r in caplog.records] == [
        "the direct decoder failed a batch (nvjpegDecodeBatched failed: bad jpeg (3)); its files are decoded one "
        "by one",
        "the direct decoder failed 3 batches in a row (nvjpegDecodeBatched failed: bad jpeg (3)); torchvision's "
        "decoder decodes from now on"]


def test_an_unknown_gpu_decoder_is_refused():
    on_device, _ = datasets_pair(JPEGS)
    with pytest.raises(ValueError, match="gpu_decoder must be one of.*got 'nvjpeg'"):
        DeviceCropDecoder(SIZE, CPU, on_device, "nvjpeg")


def test_out_of_memory_in_the_direct_decoder_stops_the_run(monkeypatch):
    on_device, _, _, batch = batch_of(JPEGS)
    torchvision_calls = with_stand_in(monkeypatch, StandIn(fault=torch.OutOfMemoryError("nvJPEG: out of memory")))
    with pytest.raises(torch.OutOfMemoryError, match="nvJPEG: out of memory"):
        DeviceCropDecoder(SIZE, CPU, on_device, "direct")(batch)
    assert torchvision_calls == []


def test_the_direct_decoder_is_made_only_where_it_can_serve(monkeypatch, caplog):
    class Unavailable:
        def __init__(self, device):
            raise HardwareDecoderUnavailable("this GPU has no hardware JPEG decoder")

    monkeypatch.setattr(device_decode, "HardwareJpegDecoder", Unavailable)
    assert hardware_decoder(torch.device("cuda"), "torchvision") is None and hardware_decoder(CPU, "direct") is None
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="fcmae.device_decode"):
        assert hardware_decoder(torch.device("cuda"), "direct") is None
    assert [r.getMessage() for r in caplog.records] == [
        "data.gpu_decoder=direct: this GPU has no hardware JPEG decoder; torchvision's decoder decodes instead"]


def test_without_a_libnvjpeg_the_direct_decoder_is_unavailable(monkeypatch, tmp_path):
    not_a_library = tmp_path / "libnvjpeg.so.13"
    not_a_library.write_bytes(b"not a shared object")
    monkeypatch.setattr(nvjpeg, "library_candidates", lambda: [not_a_library])
    nvjpeg.load_library.cache_clear()
    try:
        with pytest.raises(HardwareDecoderUnavailable, match="no libnvjpeg could be loaded.*libnvjpeg.so.13"):
            nvjpeg.load_library()
        monkeypatch.setattr(nvjpeg, "library_candidates", lambda: [])
        with pytest.raises(HardwareDecoderUnavailable, match="none found beside torchvision"):
            nvjpeg.load_library()
    finally:
        nvjpeg.load_library.cache_clear()


def test_nvjpeg_errors_name_the_call_and_the_status():
    assert str(NvjpegError("nvjpegDecodeBatched", 3)) == "nvjpegDecodeBatched failed: bad jpeg (3)"
    assert str(NvjpegError("nvjpegCreateEx", 42)) == "nvjpegCreateEx failed: unknown status (42)"


class FakeLibrary:
    """Stands in for libnvjpeg behind :class:`HardwareJpegDecoder` (its methods keep the C names). Files are
    known by address, with their size; nvjpegDecodeBatched fills plane c of each image with
    ``10 * value + c`` through the plane pointers and pitches it is given."""

    def __init__(self, create_status: int = 0, decode_status: int = 0):
        self.create_status, self.decode_status = create_status, decode_status
        self.files: dict[int, tuple[int, int, bool, int]] = {}
        self.created, self.initialized, self.destroyed = [], [], []
        self._parsed = None

    def add(self, data: torch.Tensor, width: int, height: int, value: int = 0, supported: bool = True) -> None:
        self.files[data.data_ptr()] = (width, height, supported, value)

    def nvjpegCreateEx(self, backend, dev_allocator, pinned_allocator, flags, handle):
        self.created.append((backend, flags))
        handle._obj.value = 1
        return self.create_status

    def nvjpegJpegStateCreate(self, handle, state):
        state._obj.value = 2
        return 0

    def nvjpegJpegStreamCreate(self, handle, stream):
        stream._obj.value = 3
        return 0

    def nvjpegJpegStreamParseHeader(self, handle, data, length, stream):
        self._parsed = self.files.get(data.value)
        return 0 if self._parsed else 3

    def nvjpegDecodeBatchedSupported(self, handle, stream, unsupported):
        unsupported._obj.value = 0 if self._parsed[2] else 1
        return 0

    def nvjpegJpegStreamGetFrameDimensions(self, stream, width, height):
        width._obj.value, height._obj.value = self._parsed[:2]
        return 0

    def nvjpegDecodeBatchedInitialize(self, handle, state, count, threads, fmt):
        self.initialized.append((count, fmt))
        return 0

    def nvjpegDecodeBatched(self, handle, state, data, lengths, destinations, stream):
        if self.decode_status:
            return self.decode_status
        for i in range(self.initialized[-1][0]):
            width, height, _, value = self.files[data[i]]
            for c, plane in enumerate(destinations[i].channel):
                for row in range(height if plane else 0):
                    ctypes.memset(plane + row * destinations[i].pitch[c], 10 * value + c, width)
        return 0

    def nvjpegJpegStreamDestroy(self, stream):
        self.destroyed.append(("stream", stream.value))

    def nvjpegJpegStateDestroy(self, state):
        self.destroyed.append(("state", state.value))

    def nvjpegDestroy(self, handle):
        self.destroyed.append(("handle", handle.value))


@pytest.fixture
def fake_library(monkeypatch):
    """A :class:`FakeLibrary` behind :class:`HardwareJpegDecoder`, whose CUDA calls become no-ops (on the CPU)."""
    library = FakeLibrary()
    monkeypatch.setattr(nvjpeg, "load_library", lambda: library)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "this GPU")
    return library


@pytest.mark.parametrize(("channels", "output_format"), [(3, 3), (1, 2)])
def test_the_hardware_decoder_lays_out_each_image_as_torchvision_does(fake_library, channels, output_format):
    files = [torch.zeros(n, dtype=torch.uint8) for n in (10, 11, 12, 13)]
    fake_library.add(files[0], width=5, height=3, value=1)
    fake_library.add(files[1], width=4, height=2, supported=False)  # e.g. progressive
    fake_library.add(files[3], width=7, height=2, value=2)  # files[2]: a header nvJPEG cannot parse
    images = nvjpeg.HardwareJpegDecoder(CPU).decode(files, channels)
    assert images[1] is None and images[2] is None
    for image, (height, width, value) in ((images[0], (3, 5, 1)), (images[3], (2, 7, 2))):
        planes = torch.arange(channels, dtype=torch.uint8)[:, None, None] + 10 * value
        assert torch.equal(image, planes.expand(channels, height, width))
    assert fake_library.created == [(3, 1)]  # the hardware backend, no pipeline
    assert fake_library.initialized == [(2, output_format)]
    gap = images[3].data_ptr() - images[0].data_ptr()
    assert gap % 512 == 0 and gap >= images[0].numel()


@pytest.mark.parametrize(("create", "decode", "error", "message"), [
    (7, 0, HardwareDecoderUnavailable, "this GPU has no hardware JPEG decoder"),
    (6, 0, HardwareDecoderUnavailable, r"nvjpegCreateEx failed: execution failed \(6\)"),
    (0, 3, NvjpegError, r"nvjpegDecodeBatched failed: bad jpeg \(3\)"),
    (0, 5, torch.OutOfMemoryError, "nvjpegDecodeBatched: nvJPEG could not allocate its buffers"),
])
def test_the_hardware_decoders_failures_say_what_failed(fake_library, create, decode, error, message):
    fake_library.create_status, fake_library.decode_status = create, decode
    data = torch.zeros(10, dtype=torch.uint8)
    fake_library.add(data, width=4, height=4)
    with pytest.raises(error, match=message):
        nvjpeg.HardwareJpegDecoder(CPU).decode([data], 3)


def test_a_dropped_hardware_decoder_frees_its_stream_state_and_handle(fake_library):
    decoder = nvjpeg.HardwareJpegDecoder(CPU)
    assert fake_library.destroyed == []
    del decoder
    gc.collect()
    assert fake_library.destroyed == [("stream", 3), ("state", 2), ("handle", 1)]
