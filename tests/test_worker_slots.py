"""Loader workers' reused shared-memory slots (fcmae.worker_slots) and the device decoder's batches in them."""

from __future__ import annotations

import dataclasses
import gc
import pickle
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

import pytest
import torch

import fcmae.worker_slots as worker_slots
from fcmae.device_decode import EncodedBatch
from fcmae.device_decode import worker_slots as slots_for_workers
from fcmae.loader import build_pretrain_loader
from fcmae.pretrain_config import DataConfig
from fcmae.worker_slots import SlotPlacement, WorkerSlots, byte_layout
from tests.test_device_decode import CPU, SIZE, assert_same_crops, encoded, photo, source_of


def transported(placement: SlotPlacement) -> SlotPlacement:
    """The placement as the training process unpickles it (shared tensors by file descriptor, as from a
    worker)."""
    return pickle.loads(ForkingPickler.dumps(placement))


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


def test_a_slot_is_reused_once_its_placement_is_dropped(in_worker):
    slots = WorkerSlots(2)
    (first,), placed = slots.reserve([(1000,)])
    first.fill_(7)
    assert placed.worker == 3 and placed.slot == 0 and placed.buffer.is_shared()
    assert placed.buffer.numel() == 1250  # room for larger batches
    held = transported(placed)
    (seen,) = held.tensors()
    assert torch.equal(seen, torch.full((1000,), 7, dtype=torch.uint8))

    (_,), second = slots.reserve([(1000,)])
    assert second.slot == 1
    transported(second)  # dropped at once: slot 1 is free again
    (_,), held_both = slots.reserve([(10,)])
    assert held_both.slot == 1 and held_both.buffer is None  # slot 0 is held; slot 1's buffer was sent before
    held_both = transported(held_both)
    (fresh,), none_free = slots.reserve([(10,)])
    assert none_free is None and not fresh.is_shared()

    del held, seen
    gc.collect()
    (again,), reused = slots.reserve([(900,)])
    again.fill_(9)
    assert reused.slot == 0 and reused.buffer is None  # the training process has the buffer already
    reused = transported(reused)
    (view,) = reused.tensors()
    assert view.shape == (900,) and int(view.sum()) == 9 * 900


def test_a_placement_dropped_unread_frees_its_slot(in_worker):
    """As when an epoch is left early, or the loader drops its prefetched batches at the next epoch."""
    slots = WorkerSlots(1)
    transported(slots.reserve([(10,)])[1])
    (again,), placement = slots.reserve([(10,)])
    again.fill_(4)
    assert placement is not None and placement.buffer is None
    assert int(transported(placement).tensors()[0].sum()) == 40  # the buffer sent with the dropped batch


def test_what_the_training_process_received_goes_with_the_loaders_slots(in_worker):
    slots = WorkerSlots(1)
    placement = transported(slots.reserve([(10,)])[1])
    key = (slots.token, 3)
    assert worker_slots._received[key].buffers[0].numel() == 13
    del slots
    gc.collect()
    assert key not in worker_slots._received and placement.slot == 0


def test_a_batch_larger_than_its_slot_gets_a_new_buffer(in_worker):
    slots = WorkerSlots(1)
    (_,), small = slots.reserve([(100,)])
    transported(small)
    (a, b), large = slots.reserve([(100,), (3, 50)])
    a.fill_(1), b.fill_(2)
    assert large.slot == 0 and large.buffer is not small.buffer and large.buffer.numel() >= 64 + 100 + 150
    large = transported(large)
    got_a, got_b = large.tensors()
    assert int(got_a.sum()) == 100 and int(got_b.sum()) == 300 and got_b.shape == (3, 50)


def test_a_placed_batch_travels_without_its_tensors(in_worker):
    (files, decoded), placement = WorkerSlots(1).reserve([(5,), (0,)])
    batch = EncodedBatch(files, [5], [None], decoded, [[]], placement)
    plain = EncodedBatch(files.clone(), [5], [None], decoded.clone(), [[]])
    got = pickle.loads(ForkingPickler.dumps(batch))
    assert got.files is None and got.decoded is None and got.placement.slot == placement.slot
    got = pickle.loads(pickle.dumps(plain))
    assert torch.equal(got.files, plain.files) and torch.equal(got.decoded, plain.decoded)


def test_each_worker_has_slots_for_its_batches_in_flight():
    assert slots_for_workers(14, 2).count == 2 + 1 + 1  # nine held by the training process, spread over 14
    assert slots_for_workers(2, 2).count == 2 + 5 + 1


def test_loader_batches_from_reused_and_fresh_memory_match_the_cpu_loaders():
    """Epoch 0's 20 batches are all kept (the workers run out of their 16 slots and send fresh memory), epoch 1
    is left after two batches, epoch 2's are dropped one by one (slots come back and are refilled)."""
    cfg = DataConfig(input_size=SIZE, num_workers=2, reduced_decode=False)
    source = source_of([encoded(photo(60 + 4 * i, 50 + 3 * i, 10 + i)) for i in range(40)])
    common = dict(in_chans=3, batch_size=2, accumulation=1, rank=0, world_size=1, seed=5)
    on_device = build_pretrain_loader(dataclasses.replace(cfg, decode_device="cuda", cpu_decode_share=0.5), source,
                                      decode_device=CPU, **common)
    on_cpu = build_pretrain_loader(cfg, source, **common)
    kept = [(got["worker_batch"], got["pixel_values"], want["pixel_values"])
            for got, want in zip(on_device.epoch(0), on_cpu.epoch(0), strict=True)]
    assert {batch.placement is None for batch, _, _ in kept} == {True, False}
    for batch, got, want in kept:
        assert_same_crops(got, want)
        # Each file's bytes as the worker read them: no slot was refilled while its batch was held.
        files = batch.files.split(batch.sizes)
        keys = [crop.key for crop in batch.crops if crop is not None]
        assert all(torch.equal(data, on_device.dataset[key]["encoded"].data)
                   for data, key in zip(files, keys, strict=True))
    del kept, batch, files
    left = on_device.epoch(1)
    next(left), next(left)
    left.close()
    reused = 0
    for got, want in zip(on_device.epoch(2), on_cpu.epoch(2), strict=True):
        assert_same_crops(got["pixel_values"], want["pixel_values"])
        placement = got["worker_batch"].placement
        reused += placement is not None and placement.buffer is None
    del got, placement
    gc.collect()
    assert reused > 0
    token = on_device.loader.collate_fn.keywords["slots"].token
    flags = [worker.held for (owner, _), worker in worker_slots._received.items() if owner == token]
    assert len(flags) == 2 and not any(held.any() for held in flags)  # none left held by the epoch left early
