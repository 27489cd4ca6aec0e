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
    second.mark_written()
    third.mark_written()
    assert ledger.committable(Lsn(1000)) == {}  # the first is not written: nothing passes it
    first.mark_written()
    assert ledger.committable(Lsn(200)) == {A: 11}  # a commit at the checkpoint is not covered
    assert len(ledger) == 2
    assert ledger.committable(Lsn(301)) == {A: 13}
    assert len(ledger) == 0
    assert ledger.committable(Lsn(301)) == {}  # only where it moves


def test_a_record_of_no_transaction_is_committable_once_written() -> None:
    ledger = OffsetLedger()
    schema = ledger.track(B, 5)
    assert ledger.committable(Lsn(0)) == {}
    schema.mark_written()
    assert ledger.committable(Lsn(0)) == {B: 6}


def test_forgotten_partitions_are_not_committed() -> None:
    ledger = OffsetLedger()
    ledger.track(A, 1, Lsn(1)).mark_written()
    ledger.track(B, 7, Lsn(1)).mark_written()
    ledger.forget([A])
    assert ledger.committable(Lsn(10)) == {B: 8}


def test_a_transactions_consecutive_records_share_one_run() -> None:
    ledger = OffsetLedger()
    entries = [ledger.track(A, offset, Lsn(100)) for offset in range(10, 1010)]
    assert len({id(e) for e in entries}) == 1 and ledger.runs() == 1 and len(ledger) == 1000
    for entry in entries[:999]:
        entry.mark_written()
    assert ledger.committable(Lsn(101)) == {}  # one record of the run is not written
    entries[999].mark_written()
    assert ledger.committable(Lsn(100)) == {}  # the checkpoint has not passed it
    assert ledger.committable(Lsn(101)) == {A: 1010}
    assert len(ledger) == 0 and ledger.runs() == 0


def test_a_run_written_whole_is_closed_and_later_records_start_another() -> None:
    ledger = OffsetLedger()
    first = ledger.track(A, 0, Lsn(5))
    first.mark_written()
    later = ledger.track(A, 1, Lsn(5))  # the same transaction, after a flush
    assert later is not first and ledger.runs() == 2
    assert ledger.committable(Lsn(6)) == {A: 1}  # the written run alone
    gap = ledger.track(A, 5, Lsn(5))  # not the next offset (compacted topic, a skip)
    other = ledger.track(A, 6, Lsn(7))  # another transaction
    assert len({id(later), id(gap), id(other)}) == 3 and len(ledger) == 3
    later.mark_written()
    gap.mark_written()
    assert ledger.committable(Lsn(6)) == {A: 6}
    assert ledger.committable(Lsn(100)) == {}  # the last is not written
    ledger.forget([A])
    assert len(ledger) == 0
