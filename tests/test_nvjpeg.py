"""The direct hardware decoder's place in the device decoding path, run on the CPU with a stand-in for it.

The decoder itself needs a GPU with JPEG engines: tests/test_gpu.py checks its pixels against torchvision's.
"""

from __future__ import annotations

import logging

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
