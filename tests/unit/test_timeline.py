"""The compact timeline: the same answers as the transaction records it is built from."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.archive.timeline import Timeline, TimelineBuilder
from replicator.events import TransactionRecord
from replicator.position import Lsn
from replicator.replay.plan import resolve_time
from replicator.transport.avro import digest_text

T0 = 1_750_000_000_000_000


def txn(lsn: int, ts: int, counts: dict[str, int], xid: int = 7,
        digests: dict[str, str] | None = None) -> TransactionRecord:
    return TransactionRecord(Lsn(lsn), Lsn(lsn + 8), ts, xid, dict(counts),
                             digests=dict(digests or {}))


def reference(records: list[TransactionRecord]
              ) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, str]], dict[int, int]]:
    """What the timeline must answer, computed the plain way (dicts): per table the largest
    count and the first digest at each LSN, and the first time of each LSN."""
    counts: dict[str, dict[int, int]] = {}
    digests: dict[str, dict[int, str]] = {}
    times: dict[int, int] = {}
    for record in records:
        lsn = int(record.commit_lsn)
        times.setdefault(lsn, record.commit_ts_us)
        for table, n in record.counts.items():
            per = counts.setdefault(table, {})
            per[lsn] = max(per.get(lsn, 0), n)
        for table, digest in record.digests.items():
            digests.setdefault(table, {}).setdefault(lsn, digest)
    return counts, digests, times


records_strategy = st.lists(
    st.builds(lambda lsn, dt, tables, xid, kind, value: txn(
        lsn, T0 + dt, {t: n for t, n in tables}, xid,
        {t: (digest_text(value + n) if kind == 0 else
             digest_text(value + n, content=False) if kind == 1 else f"odd-{value}")
         for t, n in tables}),
        st.integers(1, 400), st.integers(0, 10_000),
        st.lists(st.tuples(st.sampled_from(["public.a", "public.b", "x.\"odd name\""]),
                           st.integers(0, 9)), max_size=3, unique_by=lambda p: p[0]),
        st.sampled_from([0, 5, 9]), st.integers(0, 2), st.integers(0, 2**130)),
    max_size=60)


@settings(max_examples=300, deadline=None)
@given(records_strategy, st.randoms(use_true_random=False))
def test_timeline_answers_as_the_records_do_in_any_order_and_with_repeats(
        records: list[TransactionRecord], rnd: random.Random) -> None:
    # Segments overlap after a redelivery: a record may come twice, out of order.
    delivered = records + rnd.sample(records, k=len(records) // 2)
    counts, digests, times = reference(delivered)
    builder = TimelineBuilder()
    for start in range(0, len(delivered), 7):  # one segment at a time
        builder.add(delivered[start:start + 7])
    timeline = builder.build()
    assert {t: dict(c.items()) for t, c in timeline.counts.items()} == counts
    assert {t: dict(d.items()) for t, d in timeline.digests.items()} == digests
    for column in [*timeline.counts.values(), *timeline.digests.values()]:
        assert list(column) == sorted(set(column))
    assert dict(timeline.times.items()) == times
    # A snapshot's boundary record (xid 0) is a restorable point when it names a table.
    assert list(timeline.commits) == sorted({int(r.commit_lsn) for r in delivered
                                             if r.xid != 0 or r.counts})
    assert [p.commit_lsn for p in timeline.points] == sorted(times)


def test_between_is_inclusive_and_ordered_and_membership_is_exact() -> None:
    timeline = Timeline.of([txn(lsn, T0 + lsn, {"public.a": lsn % 3},
                                digests={"public.a": digest_text(lsn)})
                            for lsn in (50, 10, 40, 20, 30)])
    counts = timeline.counts["public.a"]
    assert list(counts.between(20, 40)) == [(20, 2), (30, 0), (40, 1)]
    assert list(counts.between(41, 49)) == []
    assert 30 in counts and 31 not in counts and "30" not in counts
    assert counts.get(31) is None
    digests = timeline.digests["public.a"]
    assert list(digests.between(0, 15)) == [(10, digest_text(10))]
    assert digests[50] == digest_text(50)


def test_snapshot_boundaries_are_commits_and_keep_the_largest_count() -> None:
    timeline = Timeline.of([txn(100, T0, {"public.a": 4}, xid=0),
                            txn(100, T0, {"public.a": 6}, xid=0),
                            txn(100, T0, {"public.b": 2}, xid=0),
                            txn(120, T0 + 5, {"public.a": 1})])
    assert timeline.snapshots == {"public.a": [100], "public.b": [100]}
    assert timeline.counts["public.a"][100] == 6
    assert list(timeline.commits) == [100, 120]
    assert timeline.before(120) == Lsn(100) and timeline.before(100) is None


def test_time_cut_over_points_equals_the_cut_over_records() -> None:
    records = [txn(lsn, T0 + (lsn // 16) * 1_000_000, {"public.a": 1})
               for lsn in range(16, 800, 16)]
    timeline = Timeline.of(reversed(records))
    moment = datetime.fromtimestamp(T0 / 1e6, UTC) + timedelta(seconds=20, microseconds=3)
    assert resolve_time(timeline.points, moment) == resolve_time(records, moment)
