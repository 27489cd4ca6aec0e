"""The capture's partitioner chooses the partition the Java client (and aiokafka's default
partitioner) would, so consumers in any language agree on where a row's changes are."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.transport.kafka import KeyPartitioner, murmur2


@settings(max_examples=2000)
@given(st.binary(max_size=400))
def test_murmur2_equals_the_reference(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)


@given(st.binary(max_size=80), st.integers(min_value=1, max_value=64))
def test_partition_equals_the_default_partitioner(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert KeyPartitioner()(key, partitions, partitions) == \
        DefaultPartitioner()(key, partitions, partitions)


def test_known_values_of_the_java_client() -> None:
    # org.apache.kafka.common.utils.Utils.murmur2 on these inputs (its test vectors), as
    # unsigned 32-bit integers.
    vectors = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    for data, signed in vectors.items():
        assert murmur2(data) == signed & 0xFFFFFFFF, data


def test_a_row_keeps_its_partition() -> None:
    key = b"public.guests\x00[42]"
    assert {KeyPartitioner()(key, [0, 1, 2], [0]) for _ in range(5)} == \
        {KeyPartitioner()(key, [0, 1, 2], [0, 1, 2])}
