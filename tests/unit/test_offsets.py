"""The sink's offset ledger: a partition's offset is committed only past records that are
written and below the checkpoint."""

from __future__ import annotations

from aiokafka import TopicPartition

from replicator.position import Lsn
from replicator.sink.offsets import OffsetLedger

A, B = TopicPartition("t.critical", 0), TopicPartition("t.transactions", 0)


def test_only_a_written_prefix_below_the_checkpoint_is_committable() -> None:
    ledger = OffsetLedger()
    first = ledger.track(A, 10, Lsn(100))
    second = ledger.track(A, 11, Lsn(200))
    third = ledger.track(A, 12, Lsn(300))
    assert ledger.committable(Lsn(1000)) == {}  # nothing written yet
    second.written = third.written = True
    assert ledger.committable(Lsn(1000)) == {}  # the first is not written: nothing passes it
    first.written = True
    assert ledger.committable(Lsn(200)) == {A: 11}  # a commit at the checkpoint is not covered
    assert len(ledger) == 2
    assert ledger.committable(Lsn(301)) == {A: 13}
    assert len(ledger) == 0
    assert ledger.committable(Lsn(301)) == {}  # only where it moves


def test_a_record_of_no_transaction_is_committable_once_written() -> None:
    ledger = OffsetLedger()
    schema = ledger.track(B, 5)
    assert ledger.committable(Lsn(0)) == {}
    schema.written = True
    assert ledger.committable(Lsn(0)) == {B: 6}


def test_forgotten_partitions_are_not_committed() -> None:
    ledger = OffsetLedger()
    ledger.track(A, 1, Lsn(1)).written = True
    ledger.track(B, 7, Lsn(1)).written = True
    ledger.forget([A])
    assert ledger.committable(Lsn(10)) == {B: 8}
