"""Dead letter names round-trip and sort by position; a parked record of an unknown
transaction holds every checkpoint where it is."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.archive import layout
from replicator.events import TIER_ORDER, Tier, TransactionRecord
from replicator.position import Lsn
from replicator.sink.checkpoint import CompletenessTracker

topics = st.text(min_size=1, max_size=40).filter(lambda t: t not in (".", ".."))


@given(topics, st.integers(0, 2**31 - 1), st.integers(0, 2**63 - 1))
def test_dead_letter_names_round_trip(topic: str, partition: int, offset: int) -> None:
    key = layout.dead_letter_key(topic, partition, offset)
    assert key.startswith(layout.DEAD_LETTERS) and key.count("/") == 2
    assert layout.parse_dead_letter_key(key) == (topic, partition, offset)


def test_dead_letter_names_sort_by_offset_and_refuse_other_spellings() -> None:
    keys = [layout.dead_letter_key("t.critical", 0, n) for n in (10, 9, 100)]
    assert sorted(keys) == [keys[1], keys[0], keys[2]]
    for bad in ("deadletters/t.critical/0-10.json", "deadletters/t/0000000000-1.json",
                "deadletters/t/0000000000-00000000000000000001.bin", "gaps/x.json"):
        with pytest.raises(ValueError, match="dead letter"):
            layout.parse_dead_letter_key(bad)


def test_hold_keeps_every_checkpoint() -> None:
    tracker = CompletenessTracker()
    first = TransactionRecord(Lsn(10), Lsn(11), 0, 1, {"public.t": 1},
                              tier_counts={Tier.CRITICAL.value: 1})
    tracker.records_durable([first])
    tracker.changes_durable([(Tier.CRITICAL, Lsn(10), 0)])
    assert tracker.advance() == Lsn(11)
    tracker.hold()  # a transaction record was parked: its transaction is unknown
    later = TransactionRecord(Lsn(30), Lsn(31), 0, 2, {}, tier_counts={})
    tracker.records_durable([later])
    assert tracker.advance() == Lsn(11)
    assert all(tracker.tier_checkpoints[t] == Lsn(11) for t in TIER_ORDER)
