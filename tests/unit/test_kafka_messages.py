"""The producer's shortcuts build exactly what the general forms build: the message key of a
change, and the transaction record's JSON headers."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from replicator.config import KafkaConfig
from replicator.events import ChangeEvent, Op
from replicator.keys import message_key
from replicator.position import ChangePosition, Lsn
from replicator.transport.avro import EventCodec
from replicator.transport.kafka import EventProducer, _compact_json

KEY_VALUES = st.one_of(st.integers(), st.booleans(), st.text(max_size=6), st.none(),
                       st.floats(allow_nan=False))


@given(st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8),
       st.dictionaries(st.text(min_size=1, max_size=6), KEY_VALUES, min_size=1, max_size=2),
       st.integers())
def test_message_keys_are_the_general_ones(schema: str, table: str, key: dict[str, Any],
                                           other: int) -> None:
    producer = EventProducer(KafkaConfig(bootstrap_servers="localhost:1", topic_prefix="p"),
                             EventCodec())
    for row in (key, {name: other for name in key}):  # the second reuses a cached prefix
        change = ChangeEvent(Op.UPDATE, schema, table, ChangePosition(Lsn(1), 0), 0, 1, row)
        assert producer._key(change, change.qualified_table) == message_key(change)


@given(st.dictionaries(st.text(max_size=10), st.integers() | st.booleans(), max_size=3))
def test_counts_headers_are_the_json_of_the_counts(counts: dict[str, int]) -> None:
    assert _compact_json(counts) == json.dumps(counts, separators=(",", ":"),
                                               sort_keys=True).encode()
