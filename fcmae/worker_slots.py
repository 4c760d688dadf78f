"""Shared-memory slots that loader workers reuse to hand their batches' buffers to the training process.

A tensor that a DataLoader worker returns travels in a new shared-memory file each time: the training
process maps it, faults its pages in and, when the batch goes, unmaps and frees them with the GIL held
(about 4.3 ms of its time for 16 MB on a development CPU, against 0.7 ms for a batch in a slot). The
device decoder's batches carry about 14 MB of JPEG bytes and 8 MB of CPU-decoded pixels, and on real
input the training process's host work sets the loop's pace. So each worker keeps a few buffers in
shared memory (:class:`WorkerSlots`) and sends each buffer to the training process once; a batch placed
in one then names its slot and where its tensors lie in it (:class:`SlotPlacement`). Unpickling a
placement in the training process does that process's part, whether or not the batch is then read: it
keeps a new buffer mapped for the slot's later batches, and it frees the slot when the placement is
dropped with its batch, in the training loop or wherever a batch is discarded unread (an epoch left early,
the loader's prefetched batches dropped when the next epoch starts). What the training process keeps
goes when the loader's :class:`WorkerSlots` does. A worker whose slots are all still held, and the collate
of a loader without workers, use fresh tensors as before.

Only uint8 tensors are placed; a slot holds one batch at a time.
"""

from __future__ import annotations

import math
import secrets
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

# A new buffer has room for this many times the batch it is made for, as batches differ in size.
HEADROOM = 1.25
_ALIGN = 64  # bytes; each tensor starts on a cache line
# What this process has received from each worker, by (the slots' token, worker id): its slots' buffers and
# held flags. A worker sends them only once, and later placements find them here when they are unpickled.
_received: dict[tuple[str, int], _WorkerBuffers] = {}


@dataclass
class _WorkerBuffers:
    buffers: dict[int, Tensor]
    held: np.ndarray


@dataclass
class SlotPlacement:
    """Where a worker put one batch's tensors.

    Unpickled (in the training process), it registers a new buffer and frees its slot when it is itself
    freed.

    Attributes:
        token: which :class:`WorkerSlots` placed it (one per loader).
        worker: the loader worker's id.
        slot: the slot's index among that worker's.
        layout: per tensor, its byte offset in the slot's buffer and its shape.
        buffer: (capacity,) uint8, the slot's shared buffer; only the first batch a buffer carries sends it.
        held: (slots,) int32 shared flags of the worker's slots, 1 from a batch's placement until the training
            process drops it; sent with each new buffer.
    """

    token: str
    worker: int
    slot: int
    layout: list[tuple[int, tuple[int, ...]]]
    buffer: Tensor | None
    held: Tensor | None

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        key = (self.token, self.worker)
        if self.buffer is not None:  # a new buffer; a restarted worker's first ones replace the old worker's
            worker = _received.setdefault(key, _WorkerBuffers({}, self.held.numpy()))
            worker.buffers[self.slot], worker.held = self.buffer, self.held.numpy()
        weakref.finalize(self, _release, _received[key].held, self.slot)

    def tensors(self) -> list[Tensor]:
        """The placed uint8 tensors, in the training process (valid while this placement is)."""
        return views(_received[self.token, self.worker].buffers[self.slot], self.layout)


def byte_layout(shapes: list[tuple[int, ...]]) -> tuple[list[tuple[int, tuple[int, ...]]], int]:
    """(offset, shape) of uint8 tensors of ``shapes`` laid out back to back on cache lines, and the bytes
    they span."""
    layout, end = [], 0
    for shape in shapes:
        offset = -(-end // _ALIGN) * _ALIGN
        layout.append((offset, tuple(shape)))
        end = offset + math.prod(shape)
    return layout, end


def fresh_tensors(shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """New uint8 tensors of ``shapes``, for a batch outside the slots."""
    return [torch.empty(shape, dtype=torch.uint8) for shape in shapes]


def views(buffer: Tensor, layout: list[tuple[int, tuple[int, ...]]]) -> list[Tensor]:
    """The uint8 tensors ``layout`` places in ``buffer`` ((capacity,) uint8)."""
    return [buffer[offset:offset + math.prod(shape)].view(shape) for offset, shape in layout]


class WorkerSlots:
    """A loader worker's side: :meth:`reserve` gives tensors to fill, in a free slot when there is one.

    Made in the training process and handed to the workers with the collate function; each worker then
    allocates its own ``count`` buffers as it first uses them. When the training process's object goes, so
    does what that process received from its workers.
    """

    def __init__(self, count: int):
        self.count, self.token = count, secrets.token_hex(8)
        weakref.finalize(self, _forget, self.token)
        self._buffers: list[Tensor | None] = [None] * count
        self._held: Tensor | None = None
        self._next = 0

    def reserve(self, shapes: list[tuple[int, ...]]) -> tuple[list[Tensor], SlotPlacement | None]:
        """uint8 tensors of ``shapes`` to fill, and their placement (None: fresh tensors, outside a worker or
        with every slot held)."""
        info = get_worker_info()
        slot = None if info is None else self._free_slot()
        if slot is None:
            return fresh_tensors(shapes), None
        layout, nbytes = byte_layout(shapes)
        buffer = self._buffers[slot]
        new = buffer is None or buffer.numel() < nbytes
        if new:
            buffer = torch.empty(max(1, math.ceil(nbytes * HEADROOM)), dtype=torch.uint8).share_memory_()
            self._buffers[slot] = buffer
        self._held.numpy()[slot] = 1
        sent = (buffer, self._held) if new else (None, None)
        return views(buffer, layout), SlotPlacement(self.token, info.id, slot, layout, *sent)

    def _free_slot(self) -> int | None:
        if self._held is None:
            self._held = torch.zeros(self.count, dtype=torch.int32).share_memory_()
        held = self._held.numpy()
        for step in range(self.count):
            slot = (self._next + step) % self.count
            if not held[slot]:
                self._next = (slot + 1) % self.count
                return slot
        return None


def _release(held: np.ndarray, slot: int) -> None:
    held[slot] = 0


def _forget(token: str) -> None:
    for key in [key for key in _received if key[0] == token]:
        del _received[key]
