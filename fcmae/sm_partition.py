"""Train on part of the GPU's SMs, so that the JPEG decoder beside the loop finds some of them free.

With ``data.decode_device=cuda``, nvJPEG decodes in the primary CUDA context, and its hardware path waits on
the host for GPU work of its own, image by image: beside a training step that fills every SM, a batch's
decode takes two to three times as long as on an idle GPU (docs/input_pipeline_measurements.md, calls 45-54).
A CUDA green context confines the work of its streams to a set of SMs. With ``data.decoder_sms=N`` the loop
runs on a stream of a green context that holds all but about N of the SMs; the decoder stays on the primary
context, which may use every SM, and so has N of them to itself.

CUDA graphs keep to the SMs of the stream they were recorded on, wherever they are replayed (call 53), and
torch.compile's ``reduce-overhead`` mode records them on a stream that inductor makes itself. So while a
partition runs, the graph tree managers inductor creates record on the partition's stream instead: this
sets ``stream``, an attribute of the private ``torch._inductor.cudagraph_trees.CUDAGraphTreeManager``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fcmae.config import ConfigError


class SmPartitionError(ConfigError):
    """``data.decoder_sms`` asks for a partition this GPU, its driver or this torch cannot make (printed by the
    command line as a config error)."""

    def __init__(self, message: str):
        super().__init__("data.decoder_sms", message)


def sm_group(capability_major: int) -> int:
    """SMs per group in a green context's SM split: 8 from compute capability 9 (Hopper) on, 2 before."""
    return 8 if capability_major >= 9 else 2


def training_sms(total: int, decoder_sms: int, group: int) -> int:
    """The SMs left to the training: ``total - decoder_sms`` rounded down to whole groups of ``group``.

    Raises:
        SmPartitionError: ``decoder_sms`` is not positive, or less than one group would be left.
    """
    if decoder_sms < 1:
        raise SmPartitionError(f"must be >= 1, got {decoder_sms}")
    left = (total - decoder_sms) // group * group
    if left < group:
        raise SmPartitionError(f"leaving {decoder_sms} of this GPU's {total} SMs to the decoder leaves fewer than "
                               f"{group} (one group) to the training")
    return left


class SmPartition:
    """The training's share of one GPU's SMs: a green context, and a stream on it for the loop.

    Attributes:
        sms: SMs the training may use.
        stream: the green context's stream; the loop's CUDA work goes there inside :meth:`running`.
    """

    def __init__(self, device: torch.device, decoder_sms: int):
        props = torch.cuda.get_device_properties(device)
        self.sms = training_sms(props.multi_processor_count, decoder_sms, sm_group(props.major))
        index = device.index if device.index is not None else torch.cuda.current_device()
        self._context = _green_context(self.sms, index)  # the context lives as long as this reference
        self.stream = _as_cuda_stream(self._context.Stream())

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Queue this thread's CUDA work on :attr:`stream` and record inductor's CUDA graphs there.

        The stream first waits for the work queued so far; on leaving, the stream that was current waits for
        the partition's, so what the loop wrote (weights, optimizer state) is read in order afterwards.
        """
        outer = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(outer)
        try:
            with torch.cuda.stream(self.stream), graphs_recorded_on(self.stream):
                yield
        finally:
            outer.wait_stream(self.stream)


@contextlib.contextmanager
def graphs_recorded_on(stream: torch.cuda.Stream) -> Iterator[None]:
    """Inductor graph tree managers created inside this context record their CUDA graphs on ``stream``.

    A manager is created per device and thread at the first call of a function compiled with
    ``reduce-overhead``, and keeps its stream after the context ends.
    """
    from torch._inductor import cudagraph_trees

    manager_class = cudagraph_trees.CUDAGraphTreeManager
    original = manager_class.__init__

    def record_on_stream(manager, device_index: int) -> None:
        original(manager, device_index)
        stream.wait_stream(manager.stream)
        manager.stream = stream

    manager_class.__init__ = record_on_stream
    try:
        yield
    finally:
        manager_class.__init__ = original


def _green_context(num_sms: int, device_index: int):
    try:
        from torch.cuda.green_contexts import GreenContext

        return GreenContext.create(num_sms=num_sms, device_id=device_index)
    except (ImportError, RuntimeError) as err:
        raise SmPartitionError(f"needs a CUDA green context, which this torch or driver could not create ({err}); "
                               f"newer torch releases create them through the cuda-bindings package") from err


def _as_cuda_stream(stream: torch.Stream) -> torch.cuda.Stream:
    """``torch.cuda.Stream`` over ``stream`` (some torch releases hand a green context's stream out as a plain
    ``torch.Stream``, which ``torch.cuda.stream`` does not take)."""
    if isinstance(stream, torch.cuda.Stream):
        return stream
    return torch.cuda.Stream(stream_id=stream.stream_id, device_index=stream.device_index,
                             device_type=stream.device_type)
