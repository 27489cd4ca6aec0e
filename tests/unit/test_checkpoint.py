"""Checkpoints advance only over transactions complete in the destination, per tier too."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.archive.layout import checkpoint_key, parse_checkpoint_key
from replicator.events import TIER_ORDER, Tier, TransactionRecord
from replicator.position import Lsn
from replicator.sink.checkpoint import CompletenessTracker, SeqSet


def record(commit: int, tiers: dict[Tier, int]) -> TransactionRecord:
    total = sum(tiers.values())
    return TransactionRecord(Lsn(commit), Lsn(commit + 1), 0, 1, {"public.t": total},
                             tier_counts={t.value: n for t, n in tiers.items()})


def test_waits_for_every_change_and_the_record() -> None:
    tracker = CompletenessTracker()
    tracker.changes_durable([(Tier.CRITICAL, Lsn(10), 0)])
    assert tracker.advance() == Lsn(0)  # record not durable yet
    tracker.records_durable([record(10, {Tier.CRITICAL: 1, Tier.LOW: 1})])
    assert tracker.advance() == Lsn(0)  # the low change is not durable yet
    assert tracker.tier_checkpoints[Tier.CRITICAL] == Lsn(11)  # critical part is
    tracker.changes_durable([(Tier.LOW, Lsn(10), 1), (Tier.LOW, Lsn(10), 1)])
    assert tracker.advance() == Lsn(11)
    assert tracker.incomplete == 0


def test_critical_checkpoint_is_not_held_back_by_low_tier() -> None:
    tracker = CompletenessTracker()
    tracker.records_durable([record(10, {Tier.LOW: 1}), record(20, {Tier.CRITICAL: 1})])
    tracker.changes_durable([(Tier.CRITICAL, Lsn(20), 0)])
    assert tracker.advance() == Lsn(0)
    assert tracker.tier_checkpoints[Tier.CRITICAL] == Lsn(21)
    assert tracker.tier_checkpoints[Tier.LOW] == Lsn(0)


def test_duplicates_below_the_checkpoint_are_ignored() -> None:
    tracker = CompletenessTracker(Lsn(100))
    tracker.records_durable([record(50, {Tier.HIGH: 1})])
    tracker.changes_durable([(Tier.HIGH, Lsn(50), 0)])
    assert tracker.advance() == Lsn(100) and tracker.incomplete == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(TIER_ORDER), st.integers(1, 3), min_size=1),
                min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_any_delivery_order_reaches_the_last_transaction(
        shapes: list[dict[Tier, int]], rnd: random.Random) -> None:
    records = [record(10 * (i + 1), shape) for i, shape in enumerate(shapes)]
    changes = [(tier, Lsn(10 * (i + 1)), seq)
               for i, shape in enumerate(shapes)
               for seq, tier in enumerate(t for t, n in shape.items() for _ in range(n))]
    # Changes arrive in any order, with duplicates; boundary records in commit order (the
    # transactions topic has one partition, written in commit order), re-sent ones included.
    shuffled: list[tuple[str, object]] = [("c", c) for c in changes]
    shuffled += rnd.sample(shuffled, len(shuffled) // 3)
    rnd.shuffle(shuffled)
    in_order: list[tuple[str, object]] = [("r", r) for r in records]
    resent = rnd.randrange(len(records))
    in_order += [("r", r) for r in records[resent:]]
    events: list[tuple[str, object]] = []
    while shuffled or in_order:
        source = shuffled if (shuffled and (not in_order or rnd.random() < 0.6)) else in_order
        events.append(source.pop(0))
    tracker = CompletenessTracker()
    durable_records: set[int] = set()
    durable_changes: set[tuple[int, int]] = set()
    last = Lsn(0)
    for kind, item in events:
        if kind == "r":
            assert isinstance(item, TransactionRecord)
            tracker.records_durable([item])
            durable_records.add(item.commit_lsn)
        else:
            tier, lsn, seq = item  # type: ignore[misc]
            tracker.changes_durable([(tier, lsn, seq)])
            durable_changes.add((lsn, seq))
        checkpoint = tracker.advance()
        assert checkpoint >= last  # monotonic
        last = checkpoint
        # Never past a transaction with anything missing.
        for r in records:
            if r.end_lsn <= checkpoint:
                assert r.commit_lsn in durable_records
                assert all((r.commit_lsn, s) in durable_changes for s in range(r.total))
    assert last == records[-1].end_lsn


def test_keys_sort_by_lsn() -> None:
    keys = [checkpoint_key("s3", Lsn(n)) for n in (2**32 + 5, 9, 2**40)]
    assert sorted(keys) == [keys[1], keys[0], keys[2]]
    assert parse_checkpoint_key(keys[2]) == Lsn(2**40)
    assert checkpoint_key("s3", Lsn(1), Tier.CRITICAL).startswith("checkpoints/s3/critical/")


def test_snapshot_records_of_one_lsn_add_up_and_never_reach_their_lsn() -> None:
    tracker = CompletenessTracker()
    weddings = TransactionRecord(Lsn(100), Lsn(99), 0, 0, {"public.weddings": 2},
                                 tier_counts={"critical": 2})
    guests = TransactionRecord(Lsn(100), Lsn(99), 0, 0, {"public.guests": 1},
                               tier_counts={"low": 1})
    tracker.records_durable([weddings, guests, weddings])  # the last one is a duplicate
    tracker.changes_durable([(Tier.CRITICAL, Lsn(100), 0), (Tier.CRITICAL, Lsn(100), 1)])
    assert tracker.advance() == Lsn(0)  # guests' row is not durable yet
    tracker.changes_durable([(Tier.LOW, Lsn(100), 2)])
    assert tracker.advance() == Lsn(99)
    tracker.records_durable([record(150, {Tier.HIGH: 1})])
    tracker.changes_durable([(Tier.HIGH, Lsn(150), 0)])
    assert tracker.advance() == Lsn(151)


def test_an_empty_table_completing_first_does_not_lose_another_tables_rows() -> None:
    # Two tables snapshotted at LSN 100: the empty one's boundary record is complete at once
    # and passed; the other's rows are durable before its own record arrives, in a later
    # flush. They must still count, or the checkpoint would wait for them forever.
    tracker = CompletenessTracker()
    empty = TransactionRecord(Lsn(100), Lsn(99), 0, 0, {"public.weddings": 0})
    tracker.records_durable([empty])
    tracker.changes_durable([(Tier.LOW, Lsn(100), s) for s in range(3)])
    assert tracker.advance() == Lsn(99)
    documents = TransactionRecord(Lsn(100), Lsn(99), 0, 0, {"public.documents": 3},
                                  tier_counts={"low": 3})
    tracker.records_durable([documents])
    assert tracker.advance() == Lsn(99)
    tracker.records_durable([record(150, {Tier.LOW: 1})])
    tracker.changes_durable([(Tier.LOW, Lsn(150), 0)])
    assert tracker.advance() == Lsn(151)
    assert tracker.tier_checkpoints[Tier.LOW] == Lsn(151)
    # Had a row been missing, the checkpoint would have stayed below the snapshot.
    tracker = CompletenessTracker()
    tracker.records_durable([empty])
    tracker.changes_durable([(Tier.LOW, Lsn(100), s) for s in range(2)])
    tracker.advance()
    tracker.records_durable([documents, record(150, {Tier.LOW: 1})])
    tracker.changes_durable([(Tier.LOW, Lsn(150), 0)])
    assert tracker.advance() == Lsn(99)


def test_records_without_tier_counts_count_all_tiers_together() -> None:
    tracker = CompletenessTracker()
    tracker.records_durable([TransactionRecord(Lsn(10), Lsn(11), 0, 1, {"public.t": 2})])
    tracker.changes_durable([(Tier.CRITICAL, Lsn(10), 0)])
    assert tracker.advance() == Lsn(0)
    tracker.changes_durable([(Tier.LOW, Lsn(10), 1)])
    assert tracker.advance() == Lsn(11)


def test_a_commit_at_the_checkpoint_is_a_new_transaction() -> None:
    """Back-to-back commits: the next commit record starts at the previous end LSN."""
    tracker = CompletenessTracker()
    first = TransactionRecord(Lsn(50), Lsn(100), 0, 1, {"t": 1}, tier_counts={"high": 1})
    second = TransactionRecord(Lsn(100), Lsn(170), 0, 2, {"t": 1}, tier_counts={"low": 1})
    tracker.records_durable([first])
    tracker.changes_durable([(Tier.HIGH, Lsn(50), 0)])
    assert tracker.advance() == Lsn(100)
    tracker.records_durable([second])  # commits exactly at the checkpoint
    tracker.changes_durable([(Tier.HIGH, Lsn(200), 0)])
    assert tracker.advance() == Lsn(100)  # its low change is not durable yet
    tracker.changes_durable([(Tier.LOW, Lsn(100), 0)])
    assert tracker.advance() == Lsn(170)


def test_oldest_pending_and_passed_times_per_tier() -> None:
    """What `wedsync_rpo_seconds` reads: per tier, the commit time of the oldest transaction
    its checkpoint has not passed, and of the last one it passed."""
    tracker = CompletenessTracker()
    low, critical = record(10, {Tier.LOW: 1}), record(20, {Tier.CRITICAL: 1})
    low.commit_ts_us, critical.commit_ts_us = 1_000, 2_000
    tracker.records_durable([low, critical])
    assert tracker.oldest_pending(Tier.LOW) == 1_000
    assert tracker.oldest_pending(Tier.CRITICAL) == 2_000  # the low change passes for it
    tracker.advance()
    assert tracker.passed_ts_us[Tier.CRITICAL] == 1_000  # no critical change at 10
    tracker.changes_durable([(Tier.CRITICAL, Lsn(20), 0)])
    tracker.advance()
    assert tracker.oldest_pending(Tier.CRITICAL) is None
    assert tracker.passed_ts_us[Tier.CRITICAL] == 2_000
    assert tracker.oldest_pending(Tier.LOW) == 1_000 and Tier.LOW not in tracker.passed_ts_us
    tracker.changes_durable([(Tier.LOW, Lsn(10), 0)])
    tracker.advance()
    assert tracker.oldest_pending(Tier.LOW) is None and tracker.passed_ts_us[Tier.LOW] == 2_000


def test_seq_set_counts_each_number_once_and_keeps_hostile_numbers_out_of_the_bitmap() -> None:
    seen = SeqSet()
    for seq in (0, 7, 8, 5_000_000, 7, 0):
        seen.add(seq)
    assert len(seen) == 4
    assert 5_000_000 in seen and 8 in seen and 9 not in seen and -1 not in seen
    assert len(seen._bits) <= 2 * (5_000_000 // 8 + 1)  # one bit a number, doubling
    for seq in (-3, SeqSet.LIMIT, 1 << 62, -3):  # a junk record's numbers: a set, no bitmap
        seen.add(seq)
    assert len(seen) == 7 and (1 << 62) in seen and -3 in seen
    assert len(seen._bits) <= 2 * (5_000_000 // 8 + 1)


def test_a_five_million_row_snapshot_is_tracked_in_a_bitmap() -> None:
    tracker = CompletenessTracker()
    lsn = Lsn(1000)
    tracker.changes_durable((Tier.LOW, lsn, seq) for seq in range(5_000_000))
    tracker.changes_durable((Tier.LOW, lsn, seq) for seq in range(0, 5_000_000, 1000))  # again
    tx = tracker._txs[lsn]
    assert len(tx.seen[Tier.LOW]) == 5_000_000
    assert len(tx.seen[Tier.LOW]._bits) < 1_300_000


def test_a_snapshots_tables_adding_up_leave_other_transactions_counts_alone() -> None:
    """Transactions with the same tier counts share one dict of them; a snapshot's second
    table at the same LSN adds to its own count, never to that shared one."""
    tracker = CompletenessTracker()
    tracker.records_durable([record(50, {Tier.CRITICAL: 2})])  # the shared {critical: 2}
    tracker.records_durable([
        TransactionRecord(Lsn(100), Lsn(99), 0, 0, {"public.weddings": 2},
                          tier_counts={"critical": 2}),
        TransactionRecord(Lsn(100), Lsn(99), 0, 0, {"public.vendors": 2},
                          tier_counts={"critical": 2})])
    tracker.records_durable([record(200, {Tier.CRITICAL: 2})])
    tracker.changes_durable([(Tier.CRITICAL, Lsn(50), 0), (Tier.CRITICAL, Lsn(50), 1)])
    assert tracker.advance() == Lsn(51)  # still two changes expected at 50, not four
    tracker.changes_durable([(Tier.CRITICAL, Lsn(100), s) for s in range(3)])
    tracker.changes_durable([(Tier.CRITICAL, Lsn(200), 0), (Tier.CRITICAL, Lsn(200), 1)])
    assert tracker.advance() == Lsn(51)  # the snapshot waits for its fourth row
    tracker.changes_durable([(Tier.CRITICAL, Lsn(100), 3)])
    assert tracker.advance() == Lsn(201)
