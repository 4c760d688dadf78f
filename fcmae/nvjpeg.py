"""nvJPEG's hardware decoder called through its C API (ctypes), for a batch of JPEGs on one CUDA device.

torchvision's ``decode_jpeg`` on a CUDA device decodes baseline JPEGs with nvJPEG's hardware backend (the
GPU's JPEG engines, on an A100, H100 or H200), through a handle made with nvJPEG's default flags, on a
stream of torchvision's own. With those flags the hardware path waits on the host for GPU work of its own,
image by image: beside a load that fills every SM, a call for 77 files took 33-41 ms against 4-5 ms on an
idle GPU, and 11-19 ms with ``NVJPEG_FLAGS_HW_DECODE_NO_PIPELINE`` (docs/input_pipeline_measurements.md,
calls 45-47). :class:`HardwareJpegDecoder` makes a handle with that flag on the libnvjpeg that torchvision
ships and decodes on the caller's current stream, into tensors laid out as torchvision's: the same library,
engines and output format, so the same pixels.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import weakref
from pathlib import Path

import torch
import torchvision
from torch import Tensor

_BACKEND_HARDWARE = 3
# The hardware path buffers no images ahead of its engines: it then waits less for GPU work of its own.
_FLAGS_HW_DECODE_NO_PIPELINE = 1
_OUTPUT_Y, _OUTPUT_RGB = 2, 3  # luma only; planar RGB
_OUTPUT_FORMATS = {3: _OUTPUT_RGB, 1: _OUTPUT_Y}  # by output channels
_STATUS_NAMES = ("success", "not initialized", "invalid parameter", "bad jpeg", "jpeg not supported",
                 "allocator failure", "execution failed", "arch mismatch", "internal error",
                 "implementation not supported", "incomplete bitstream")
_ALLOCATOR_FAILURE, _ARCH_MISMATCH = 5, 7
_MAX_COMPONENTS = 4
# Each image starts on this boundary in the batch's buffer, as the caching allocator aligns blocks.
_IMAGE_ALIGNMENT = 512


class NvjpegError(RuntimeError):
    """An nvJPEG call returned an error status (for a batch, most likely one of its files is damaged)."""

    def __init__(self, call: str, status: int):
        name = _STATUS_NAMES[status] if 0 <= status < len(_STATUS_NAMES) else "unknown status"
        super().__init__(f"{call} failed: {name} ({status})")
        self.status = status


class HardwareDecoderUnavailable(RuntimeError):
    """No libnvjpeg could be loaded, or this GPU has no hardware JPEG decoder."""


class _Image(ctypes.Structure):
    """nvjpegImage_t: a plane pointer and a row pitch (bytes) per component."""

    _fields_ = [("channel", ctypes.c_void_p * _MAX_COMPONENTS), ("pitch", ctypes.c_size_t * _MAX_COMPONENTS)]


def library_candidates() -> list[Path]:
    """Where libnvjpeg may be, first choice first: torchvision's own copy (its CUDA wheels bundle it), then
    the CUDA toolkit's pip packages beside it, then the system's."""
    site = Path(torchvision.__file__).resolve().parents[1]
    found = sorted((site / "torchvision.libs").glob("libnvjpeg*.so*"))
    found += sorted(site.glob("nvidia/*/lib/libnvjpeg.so*"))
    system = ctypes.util.find_library("nvjpeg")
    return found + ([Path(system)] if system else [])


@functools.cache
def load_library() -> ctypes.CDLL:
    """libnvjpeg, loaded once per process.

    Raises:
        HardwareDecoderUnavailable: none of :func:`library_candidates` loads.
    """
    errors = []
    for path in library_candidates():
        try:
            return ctypes.CDLL(str(path))
        except OSError as err:
            errors.append(f"{path}: {err}")
    raise HardwareDecoderUnavailable("no libnvjpeg could be loaded" + (f" ({'; '.join(errors)})" if errors else
                                                                        " (none found beside torchvision)"))


class HardwareJpegDecoder:
    """A batch of JPEG files -> their pixels on ``device``, from nvJPEG's hardware decoder.

    Not thread-safe: one decoding thread makes and uses it, in ``device``'s primary CUDA context (not on a
    thread that runs in a green context: entering ``torch.cuda.device`` makes the primary context current).

    Raises:
        HardwareDecoderUnavailable: no libnvjpeg, or no hardware decoder on this GPU.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._lib = load_library()
        self._handle, self._state, self._stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.device(device):
            status = self._lib.nvjpegCreateEx(_BACKEND_HARDWARE, None, None, _FLAGS_HW_DECODE_NO_PIPELINE,
                                              ctypes.byref(self._handle))
            if status == _ARCH_MISMATCH:
                raise HardwareDecoderUnavailable(f"{torch.cuda.get_device_name(device)} has no hardware JPEG "
                                                 "decoder")
            try:
                self._check("nvjpegCreateEx", status)
                # Not at exit: a daemon decoding thread may still be inside a call there (torchvision's decoder
                # is never destroyed either).
                weakref.finalize(self, _destroy, self._lib, self._handle, self._state, self._stream).atexit = False
                self._check("nvjpegJpegStateCreate",
                            self._lib.nvjpegJpegStateCreate(self._handle, ctypes.byref(self._state)))
                self._check("nvjpegJpegStreamCreate",
                            self._lib.nvjpegJpegStreamCreate(self._handle, ctypes.byref(self._stream)))
            except NvjpegError as err:
                raise HardwareDecoderUnavailable(str(err)) from err

    def decode(self, files: list[Tensor], channels: int) -> list[Tensor | None]:
        """Decode ``files`` on the current CUDA stream of :attr:`device`.

        nvJPEG resets its batch state at each call: call again only once the last call's work is done (its
        stream synchronised).

        Args:
            files: (N_i,) uint8 CPU tensors, each a whole JPEG file.
            channels: 3 (RGB) or 1 (luma), as torchvision's ``ImageReadMode.RGB`` and ``GRAY``.

        Returns:
            Per file, (channels, H, W) uint8 on the device, or None for a file the hardware decoder does not
            take (progressive, some chroma subsamplings, a header nvJPEG cannot parse): decode those another
            way.

        Raises:
            NvjpegError: the batch failed (likely a damaged file among them).
            torch.OutOfMemoryError: nvJPEG could not allocate its buffers.
        """
        files = [f.contiguous() for f in files]
        taken, shapes = [], []
        for i, data in enumerate(files):
            shape = self._hardware_shape(data, channels)
            if shape is not None:
                taken.append(i)
                shapes.append(shape)
        out: list[Tensor | None] = [None] * len(files)
        if not taken:
            return out
        with torch.cuda.device(self.device):
            images = self._allocate(shapes)
            self._decode_batch([files[i] for i in taken], images, channels)
        for i, image in zip(taken, images, strict=True):
            out[i] = image
        return out

    def _hardware_shape(self, data: Tensor, channels: int) -> tuple[int, int, int] | None:
        """(channels, H, W) of a file the hardware decoder takes, else None."""
        if self._lib.nvjpegJpegStreamParseHeader(self._handle, ctypes.c_void_p(data.data_ptr()),
                                                 ctypes.c_size_t(data.numel()), self._stream) != 0:
            return None
        unsupported = ctypes.c_int(-1)
        status = self._lib.nvjpegDecodeBatchedSupported(self._handle, self._stream, ctypes.byref(unsupported))
        if status != 0 or unsupported.value != 0:
            return None
        width, height = ctypes.c_uint(), ctypes.c_uint()
        self._check("nvjpegJpegStreamGetFrameDimensions", self._lib.nvjpegJpegStreamGetFrameDimensions(
            self._stream, ctypes.byref(width), ctypes.byref(height)))
        return channels, height.value, width.value

    def _allocate(self, shapes: list[tuple[int, int, int]]) -> list[Tensor]:
        """One buffer on the current stream, cut into a contiguous (C, H, W) view per image."""
        sizes = [c * h * w for c, h, w in shapes]
        starts = [0]
        for size in sizes[:-1]:
            starts.append(starts[-1] + -(-size // _IMAGE_ALIGNMENT) * _IMAGE_ALIGNMENT)
        buffer = torch.empty(starts[-1] + sizes[-1], dtype=torch.uint8, device=self.device)
        return [buffer[start:start + size].view(shape)
                for start, size, shape in zip(starts, sizes, shapes, strict=True)]

    def _decode_batch(self, files: list[Tensor], images: list[Tensor], channels: int) -> None:
        """One batched call: ``files[i]`` into ``images[i]`` ((channels, H, W), planes of pitch W)."""
        count = len(files)
        data = (ctypes.c_void_p * count)(*[f.data_ptr() for f in files])
        lengths = (ctypes.c_size_t * count)(*[f.numel() for f in files])
        destinations = (_Image * count)()
        for destination, image in zip(destinations, images, strict=True):
            _, height, width = image.shape
            for c in range(channels):
                destination.channel[c] = image.data_ptr() + c * height * width
                destination.pitch[c] = width
        stream = ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        fmt = _OUTPUT_FORMATS[channels]
        self._check("nvjpegDecodeBatchedInitialize",
                    self._lib.nvjpegDecodeBatchedInitialize(self._handle, self._state, count, 1, fmt))
        self._check("nvjpegDecodeBatched", self._lib.nvjpegDecodeBatched(
            self._handle, self._state, data, lengths, destinations, stream))

    @staticmethod
    def _check(call: str, status: int) -> None:
        """Raise for an nvJPEG call's error status."""
        if status == _ALLOCATOR_FAILURE:
            raise torch.OutOfMemoryError(f"{call}: nvJPEG could not allocate its buffers (out of memory)")
        if status != 0:
            raise NvjpegError(call, status)


def _destroy(lib: ctypes.CDLL, handle: ctypes.c_void_p, state: ctypes.c_void_p, stream: ctypes.c_void_p) -> None:
    """Free what a :class:`HardwareJpegDecoder` made, the handle last (null ones were never made)."""
    if stream.value:
        lib.nvjpegJpegStreamDestroy(stream)
    if state.value:
        lib.nvjpegJpegStateDestroy(state)
    lib.nvjpegDestroy(handle)
