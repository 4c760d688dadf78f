"""The SM partition's arithmetic, config checks and inductor hook, on the CPU (the GPU side is in test_gpu.py)."""

from __future__ import annotations

import pytest
from torch._inductor import cudagraph_trees

from fcmae.config import ConfigError
from fcmae.pretrain_config import DataConfig
from fcmae.sm_partition import SmPartitionError, graphs_recorded_on, sm_group, training_sms


@pytest.mark.parametrize(("total", "decoder", "group", "left"), [
    (132, 4, 8, 128),  # an H100 or H200 SXM
    (132, 1, 8, 128),
    (132, 5, 8, 120),  # rounded down: the decoder gets at least what it asked for
    (132, 124, 8, 8),
    (108, 4, 2, 104),  # an A100
])
def test_training_keeps_whole_groups_of_what_the_decoder_leaves(total, decoder, group, left):
    assert training_sms(total, decoder, group) == left


@pytest.mark.parametrize(("decoder", "match"), [(0, "must be >= 1"), (-3, "must be >= 1"),
                                                (125, "fewer than 8")])
def test_partitions_that_leave_the_training_nothing_are_refused_as_config_errors(decoder, match):
    with pytest.raises(ConfigError, match=match) as refused:
        training_sms(132, decoder, 8)
    assert isinstance(refused.value, SmPartitionError) and refused.value.key == "data.decoder_sms"


def test_sm_groups_follow_the_compute_capability():
    assert [sm_group(major) for major in (7, 8, 9, 10)] == [2, 2, 8, 8]


def test_decoder_sms_needs_the_gpu_decoder_and_a_count():
    DataConfig(decode_device="cuda", decoder_sms=4).validate()
    with pytest.raises(ConfigError, match="decoder_sms.*needs decode_device=cuda"):
        DataConfig(decoder_sms=4).validate()
    with pytest.raises(ConfigError, match="decoder_sms.*>= 0, got -1"):
        DataConfig(decode_device="cuda", decoder_sms=-1).validate()


class _Stream:
    def __init__(self, name: str):
        self.name, self.waited_on = name, []

    def wait_stream(self, other: _Stream) -> None:
        self.waited_on.append(other)


def test_graph_managers_made_inside_the_context_record_on_its_stream(monkeypatch):
    """A manager's own stream is replaced (after the partition's waits for it) only while the context is open;
    the class gets its ``__init__`` back on leaving, also after an error."""
    def made_on_own_stream(manager, device_index):
        manager.device_index, manager.stream = device_index, _Stream("inductor's")

    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "__init__", made_on_own_stream)
    partition = _Stream("partition")
    with graphs_recorded_on(partition):
        inside = cudagraph_trees.CUDAGraphTreeManager(0)
    outside = cudagraph_trees.CUDAGraphTreeManager(1)
    assert inside.stream is partition and inside.device_index == 0
    assert [s.name for s in partition.waited_on] == ["inductor's"]
    assert outside.stream.name == "inductor's"
    with pytest.raises(ValueError), graphs_recorded_on(partition):
        raise ValueError
    assert cudagraph_trees.CUDAGraphTreeManager.__init__ is made_on_own_stream
