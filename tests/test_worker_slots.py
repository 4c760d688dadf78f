"""Loader workers' reused shared-memory slots (fcmae.worker_slots) and the device decoder's batches in them."""

from __future__ import annotations

import dataclasses
import gc
import pickle
from types import SimpleNamespace

import pytest
import torch

import fcmae.worker_slots as worker_slots
from fcmae.device_decode import EncodedBatch
from fcmae.device_decode import worker_slots as slots_for_workers
from fcmae.loader import build_pretrain_loader
from fcmae.pretrain_config import DataConfig
from fcmae.worker_slots import SlotReceiver, WorkerSlots, byte_layout
from tests.test_device_decode import CPU, SIZE, assert_same_crops, encoded, photo, source_of


class Holder:
    """Stands for the batch object that holds a slot."""


@pytest.fixture
def in_worker(monkeypatch):
    """Code here runs as loader worker 3."""
    monkeypatch.setattr(worker_slots, "get_worker_info", lambda: SimpleNamespace(id=3))


def test_tensors_lie_back_to_back_on_cache_lines():
    layout, nbytes = byte_layout([(100,), (2, 3, 5), (0,), (7,)])
    assert layout == [(0, (100,)), (128, (2, 3, 5)), (192, (0,)), (192, (7,))]
    assert nbytes == 199


def test_outside_a_worker_the_tensors_are_fresh():
    (a, b), placement = WorkerSlots(2).reserve([(10,), (2, 4)])
    assert placement is None and a.shape == (10,) and b.shape == (2, 4) and a.dtype == b.dtype == torch.uint8
    assert not a.is_shared()


def test_a_slot_is_reused_once_its_batch_is_dropped(in_worker):
    slots, receiver = WorkerSlots(2), SlotReceiver()
    (first,), placed = slots.reserve([(1000,)])
    first.fill_(7)
    assert placed.worker == 3 and placed.slot == 0 and placed.buffer.is_shared()
    assert placed.buffer.numel() == 1250  # room for larger batches
    holder = Holder()
    (seen,) = receiver.open(placed, holder)
    assert torch.equal(seen, torch.full((1000,), 7, dtype=torch.uint8))

    (_,), second = slots.reserve([(1000,)])
    assert second.slot == 1
    receiver.open(second, Holder())  # dropped at once: slot 1 is free again
    (_,), held_both = slots.reserve([(10,)])
    assert held_both.slot == 1 and held_both.buffer is None  # slot 0 is held; slot 1's buffer was sent before
    (fresh,), none_free = slots.reserve([(10,)])
    assert none_free is None and not fresh.is_shared()

    del holder
    gc.collect()
    (again,), reused = slots.reserve([(900,)])
    again.fill_(9)
    assert reused.slot == 0 and reused.buffer is None  # the training process has the buffer already
    (view,) = receiver.open(reused, Holder())
    assert view.shape == (900,) and int(view.sum()) == 9 * 900


def test_a_batch_larger_than_its_slot_gets_a_new_buffer(in_worker):
    slots, receiver = WorkerSlots(1), SlotReceiver()
    (_,), small = slots.reserve([(100,)])
    receiver.open(small, Holder())
    (a, b), large = slots.reserve([(100,), (3, 50)])
    a.fill_(1), b.fill_(2)
    assert large.slot == 0 and large.buffer is not small.buffer and large.buffer.numel() >= 64 + 100 + 150
    got_a, got_b = receiver.open(large, Holder())
    assert int(got_a.sum()) == 100 and int(got_b.sum()) == 300 and got_b.shape == (3, 50)


def test_a_placed_batch_travels_without_its_tensors(in_worker):
    (files, decoded), placement = WorkerSlots(1).reserve([(5,), (0,)])
    batch = EncodedBatch(files, [5], [None], decoded, [[]], placement)
    plain = EncodedBatch(files.clone(), [5], [None], decoded.clone(), [[]])
    assert pickle.loads(pickle.dumps(batch)).files is None
    assert torch.equal(pickle.loads(pickle.dumps(plain)).files, plain.files)


def test_each_worker_has_slots_for_its_batches_in_flight():
    assert slots_for_workers(14, 2).count == 1 + 2 + 1  # ten held by the training process, spread over 14
    assert slots_for_workers(2, 2).count == 1 + 2 + 5


def test_loader_batches_from_reused_and_fresh_memory_match_the_cpu_loaders():
    """Two epochs of 20 batches: the first epoch's are all kept (the workers run out of their 16 slots and send
    fresh memory), the second's dropped one by one (slots come back and are refilled)."""
    cfg = DataConfig(input_size=SIZE, num_workers=2, reduced_decode=False)
    source = source_of([encoded(photo(60 + 4 * i, 50 + 3 * i, 10 + i)) for i in range(40)])
    common = dict(in_chans=3, batch_size=2, accumulation=1, rank=0, world_size=1, seed=5)
    on_device = build_pretrain_loader(dataclasses.replace(cfg, decode_device="cuda", cpu_decode_share=0.5), source,
                                      decode_device=CPU, **common)
    on_cpu = build_pretrain_loader(cfg, source, **common)
    kept = list(zip(on_device.epoch(0), on_cpu.epoch(0), strict=True))
    placements = [got["worker_batch"].placement for got, _ in kept]
    assert None in placements and any(p is not None for p in placements)
    for got, want in kept:
        assert_same_crops(got["pixel_values"], want["pixel_values"])
    del kept
    gc.collect()
    reused = 0
    for got, want in zip(on_device.epoch(1), on_cpu.epoch(1), strict=True):
        assert_same_crops(got["pixel_values"], want["pixel_values"])
        placement = got["worker_batch"].placement
        reused += placement is not None and placement.buffer is None
        del got
    assert reused > 0
