"""The replay plan: a pure function of the listing, the checkpoint, the gaps and the headers."""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime, timedelta, timezone
from functools import partial

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from connectors.base import ObjectInfo
from replicator.archive.layout import (
    SegmentKind,
    checkpoint_key,
    gap_key,
    parse_gap_key,
    parse_segment_key,
    segment_key,
    transactions_key,
)
from replicator.archive.segment import SegmentHeader
from replicator.events import TransactionRecord
from replicator.position import ChangePosition, Lsn
from replicator.replay.plan import (
    LATEST,
    ReplayPlan,
    ReplayRefused,
    manifest_key,
    parse_at,
    parse_manifest_key,
    parse_snapshot_key,
    plan,
    resolve_time,
    snapshot_key,
    transaction_segments_for,
)

GUESTS, VENDORS, TASKS = "public.guests", "public.vendors", "crm.tasks"
T0 = datetime(2025, 6, 14, 12, 0, tzinfo=UTC)
T0_US = (T0 - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def seg(table: str, first: int, last: int, digest: str = "") -> str:
    return segment_key(table, Lsn(first), Lsn(last), digest)


def snap(table: str, lsn: int, part: int) -> str:
    return snapshot_key(table, Lsn(lsn), part)


def done(table: str, lsn: int, parts: int) -> str:
    """The manifest that completes a compaction snapshot of *parts* parts."""
    return manifest_key(table, Lsn(lsn), parts)


def header(name: str, *, ops: dict[str, int] | None = None,
           weddings: tuple[str, ...] | None = ("w1",), table: str = "",
           min_ts: int = 0, max_ts: int = 0) -> SegmentHeader:
    """A header matching the object *name* (a change segment, snapshot part or transaction
    segment)."""
    if name.startswith("snapshots/"):
        key = parse_snapshot_key(name)
        kind, tbl, first, last = SegmentKind.CHANGES, key.table, key.lsn, key.lsn
    else:
        parsed = parse_segment_key(name)
        kind, tbl, first, last = parsed.kind, parsed.table, parsed.first, parsed.last
    return SegmentHeader(
        kind=kind, table=table or tbl, first=ChangePosition(first, 0),
        last=ChangePosition(last, 0), min_commit_ts_us=min_ts, max_commit_ts_us=max_ts,
        rows=1, ops=ops if ops is not None else {"u": 1},
        wedding_ids=weddings if kind is SegmentKind.CHANGES else (), schema_fingerprint="00",
        codec="deflate")


def tx(commit: int, ts_us: int, end: int | None = None, xid: int = 7) -> TransactionRecord:
    return TransactionRecord(Lsn(commit), Lsn(commit + 8 if end is None else end), ts_us, xid,
                             {GUESTS: 1})


LISTING = [
    seg(GUESTS, 0x100, 0x100),  # the initial snapshot
    seg(GUESTS, 0x110, 0x150),
    seg(GUESTS, 0x150, 0x150, "ab"),  # same range as nothing else; digest-suffixed
    seg(GUESTS, 0x160, 0x200),
    seg(VENDORS, 0x100, 0x100),
    seg(VENDORS, 0x180, 0x190),
    transactions_key(Lsn(0x100), Lsn(0x200)),
    checkpoint_key("local", Lsn(0x209)),
    "checkpoints/local/critical/0000000000000209",
]


# --- which segments --------------------------------------------------------------------------


def test_every_table_with_segments_up_to_the_target_in_position_order() -> None:
    result = plan(list(reversed(LISTING)), at=Lsn(0x150), checkpoint=Lsn(0x209))
    assert result.target == Lsn(0x150) and result.requested == "0/150"
    assert result.objects == {
        GUESTS: (seg(GUESTS, 0x100, 0x100), seg(GUESTS, 0x110, 0x150),
                 seg(GUESTS, 0x150, 0x150, "ab")),
        VENDORS: (seg(VENDORS, 0x100, 0x100),),
    }
    assert result.count == 4
    assert result.oldest == Lsn(0x100) and result.latest == Lsn(0x208)
    assert all(t.base_kind == "archive-start" and t.apply_after is None for t in result.tables)


def test_a_segment_straddling_the_cut_is_included() -> None:
    result = plan(LISTING, at=Lsn(0x170), checkpoint=Lsn(0x209), tables=[GUESTS])
    assert result.objects[GUESTS][-1] == seg(GUESTS, 0x160, 0x200)
    assert [t.table for t in result.tables] == [GUESTS]


def test_latest_is_below_the_checkpoint() -> None:
    # The checkpoint is an end LSN: a transaction whose commit record starts exactly there is
    # not covered by it, so its segment is not part of the latest point.
    listing = [*LISTING, seg(GUESTS, 0x209, 0x209)]
    result = plan(listing, at=LATEST, checkpoint=Lsn(0x209))
    assert result.target == Lsn(0x208) and result.requested == "latest"
    assert seg(GUESTS, 0x209, 0x209) not in result.objects[GUESTS]
    assert seg(GUESTS, 0x160, 0x200) in result.objects[GUESTS]


def test_tables_subset_and_unqualified_names() -> None:
    listing = [*LISTING, seg(TASKS, 0x100, 0x120)]
    assert [t.table for t in plan(listing, at=Lsn(0x120), checkpoint=Lsn(0x209),
                                  tables=["tasks", GUESTS, "guests"]).tables] == [TASKS, GUESTS]


def test_an_unknown_table_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ReplayRefused, match=r"no table public\.nope; its tables are: "
                                            r"public\.guests, public\.vendors"):
        plan(LISTING, at=Lsn(0x150), checkpoint=Lsn(0x209), tables=["public.nope"])
    listing = [*LISTING, seg("crm.guests", 0x100, 0x100)]
    with pytest.raises(ReplayRefused, match=r"guests is ambiguous \(crm\.guests, public\.guests\)"):
        plan(listing, at=Lsn(0x150), checkpoint=Lsn(0x209), tables=["guests"])
    with pytest.raises(ReplayRefused, match="no tables were selected"):
        plan(LISTING, at=Lsn(0x150), checkpoint=Lsn(0x209), tables=[])
    with pytest.raises(ReplayRefused, match="holds no table data"):
        plan([transactions_key(Lsn(1), Lsn(2))], at=LATEST, checkpoint=Lsn(0x209))


def test_quoted_table_names() -> None:
    odd = 'public.a/"b"'
    result = plan([seg(odd, 5, 9)], at=Lsn(9), checkpoint=Lsn(10), tables=[odd])
    assert result.objects == {odd: ("segments/public.a%2F%22b%22/" + "0" * 15 + "5-"
                                    + "0" * 15 + "9.seg",)}


def test_names_that_are_not_segments_are_refused() -> None:
    for bad in ("segments/public.guests/10-20.seg", "segments/public.guests/x.tmp",
                "snapshots/public.guests/0000000000000010/part-01.seg"):
        with pytest.raises(ReplayRefused, match=f"object {bad} is not a valid"):
            plan([*LISTING, bad], at=Lsn(0x150), checkpoint=Lsn(0x209))
    # Objects outside segments/ and snapshots/ are not table data.
    assert plan([*LISTING, "README", "keys/x"], at=Lsn(0x150), checkpoint=Lsn(0x209)).count == 4


def test_at_must_be_an_lsn_a_time_or_latest() -> None:
    with pytest.raises(ValueError, match="parse_at"):
        plan(LISTING, at="0/150", checkpoint=Lsn(0x209))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        plan(LISTING, at=1.5, checkpoint=Lsn(0x209))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ends before it starts"):
        plan(LISTING, at=Lsn(0x150), checkpoint=Lsn(0x209), gaps=[(5, 5)])


# --- refusals --------------------------------------------------------------------------------


def test_past_the_checkpoint_is_refused_naming_the_latest_recoverable_point() -> None:
    with pytest.raises(ReplayRefused) as caught:
        plan(LISTING, at=Lsn(0x209), checkpoint=Lsn(0x209))
    assert str(caught.value) == ("LSN 0/209 is past the destination's durable checkpoint (it "
                                 "covers commits below 0/209); the latest recoverable point "
                                 "is 0/208")
    assert caught.value.nearest == Lsn(0x208)
    assert plan(LISTING, at=Lsn(0x208), checkpoint=Lsn(0x209)).target == Lsn(0x208)


def test_nothing_recoverable_before_a_first_checkpoint() -> None:
    with pytest.raises(ReplayRefused, match=r"nothing is recoverable yet.* checkpoint is 0/0"):
        plan(LISTING, at=LATEST, checkpoint=Lsn(0))
    with pytest.raises(ReplayRefused, match=r"covers nothing yet\); no earlier point") as caught:
        plan(LISTING, at=Lsn(0x100), checkpoint=Lsn(0))
    assert caught.value.nearest is None
    # The checkpoint has not passed the initial snapshot (its boundary record ends below it).
    with pytest.raises(ReplayRefused, match=r"0/100 .*; no later point is restorable either"):
        plan(LISTING, at=Lsn(0xF0), checkpoint=Lsn(0xFF))


def test_a_point_inside_a_gap_is_refused_naming_the_gap_start() -> None:
    gaps = [(Lsn(0x150), Lsn(0x180))]
    with pytest.raises(ReplayRefused) as caught:
        plan(LISTING, at=Lsn(0x170), checkpoint=Lsn(0x209), gaps=gaps)
    assert str(caught.value) == ("LSN 0/170 is inside the recorded gap 0/150-0/180: changes "
                                 "there may be missing; the nearest restorable earlier point "
                                 "is 0/150")
    assert caught.value.nearest == Lsn(0x150)
    for edge in (0x150, 0x180):  # the gap's own ends are restorable
        assert plan(LISTING, at=Lsn(edge), checkpoint=Lsn(0x209), gaps=gaps).target == edge


def test_overlapping_gaps_suggest_a_point_outside_all_of_them() -> None:
    gaps = [(Lsn(0x150), Lsn(0x180)), (Lsn(0x170), Lsn(0x190)), (Lsn(0x120), Lsn(0x160))]
    with pytest.raises(ReplayRefused) as caught:
        plan(LISTING, at=Lsn(0x185), checkpoint=Lsn(0x209), gaps=gaps)
    assert caught.value.nearest == Lsn(0x120)
    with pytest.raises(ReplayRefused, match="no earlier point is restorable") as caught:
        plan(LISTING, at=Lsn(0x185), checkpoint=Lsn(0x209), gaps=[(Lsn(0x50), Lsn(0x190))])
    assert caught.value.nearest is None


def test_past_the_checkpoint_when_the_latest_point_is_inside_a_gap() -> None:
    # After an accepted gap, the re-snapshot's boundary records end one below its LSN.
    with pytest.raises(ReplayRefused, match=r"^the latest point \(LSN 0/17F\) is inside the "
                                            r"recorded gap 0/150-0/180.* is 0/150$") as caught:
        plan(LISTING, at=LATEST, checkpoint=Lsn(0x180), gaps=[(Lsn(0x150), Lsn(0x180))])
    assert caught.value.nearest == Lsn(0x150)
    with pytest.raises(ReplayRefused) as caught:
        plan(LISTING, at=Lsn(0x300), checkpoint=Lsn(0x180), gaps=[(Lsn(0x150), Lsn(0x180))])
    assert caught.value.nearest == Lsn(0x150)


def test_before_the_oldest_snapshot_is_refused() -> None:
    with pytest.raises(ReplayRefused) as caught:
        plan(LISTING, at=Lsn(0x90), checkpoint=Lsn(0x209))
    assert str(caught.value) == (
        "LSN 0/90 is before the oldest restorable point 0/100 of public.guests, public.vendors "
        "(where its archive starts with a snapshot); restore at 0/100 or later")
    assert caught.value.nearest == Lsn(0x100)


def test_a_table_archived_later_is_named_and_can_be_left_out() -> None:
    listing = [*LISTING, seg(TASKS, 0x170, 0x170)]
    with pytest.raises(ReplayRefused, match=r"oldest restorable point 0/170 of crm\.tasks .*"
                                            r"or leave crm\.tasks out with --tables"):
        plan(listing, at=Lsn(0x150), checkpoint=Lsn(0x209))
    assert plan(listing, at=Lsn(0x150), checkpoint=Lsn(0x209),
                tables=[GUESTS, VENDORS]).count == 4


def test_headers_show_where_the_snapshot_starts() -> None:
    # Retention trimmed the initial snapshot: the first segment left holds no `r` rows.
    listing = [seg(GUESTS, 0x110, 0x150), seg(GUESTS, 0x160, 0x200), seg(GUESTS, 0x300, 0x300)]
    headers = {listing[0]: header(listing[0], ops={"u": 3}),
               listing[1]: header(listing[1], ops={"r": 10, "u": 2})}
    result = plan(listing, at=Lsn(0x160), checkpoint=Lsn(0x400), headers=headers)
    assert result.oldest == Lsn(0x160)
    with pytest.raises(ReplayRefused, match="oldest restorable point 0/160"):
        plan(listing, at=Lsn(0x150), checkpoint=Lsn(0x400), headers=headers)
    all_known = {**headers, listing[1]: header(listing[1], ops={"u": 1}),
                 listing[2]: header(listing[2], ops={"d": 1})}
    with pytest.raises(ReplayRefused, match=r"no restorable state of public\.guests"):
        plan(listing, at=Lsn(0x300), checkpoint=Lsn(0x400), headers=all_known)


def test_a_header_that_does_not_match_its_name_is_refused() -> None:
    name = seg(GUESTS, 0x110, 0x150)
    with pytest.raises(ReplayRefused, match="does not match its name"):
        plan(LISTING, at=Lsn(0x150), checkpoint=Lsn(0x209),
             headers={name: header(seg(GUESTS, 0x110, 0x151))})
    with pytest.raises(ReplayRefused, match="does not match its name"):
        plan(LISTING, at=Lsn(0x150), checkpoint=Lsn(0x209),
             headers={name: header(name, table=VENDORS)})


# --- weddings --------------------------------------------------------------------------------


def test_a_wedding_restore_skips_only_what_headers_rule_out() -> None:
    names = [seg(GUESTS, 0x100, 0x100), seg(GUESTS, 0x110, 0x120), seg(GUESTS, 0x130, 0x140),
             seg(GUESTS, 0x150, 0x160), seg(GUESTS, 0x170, 0x180), seg(GUESTS, 0x190, 0x190),
             seg(GUESTS, 0x1A0, 0x1A0)]
    headers = {
        names[0]: header(names[0], ops={"r": 5}, weddings=("w1", "w2")),  # holds w2
        names[1]: header(names[1], weddings=("w1",)),  # proves: no w2
        names[2]: header(names[2], weddings=None),  # "many": must be read
        names[3]: header(names[3], ops={"t": 1}, weddings=()),  # a truncate concerns all
        names[4]: header(names[4], ops={"d": 1, "u": 1}, weddings=("w1",)),  # key-only delete?
        names[5]: header(names[5], ops={"c": 2}, weddings=("w3",)),  # proves: no w2
        # names[6]: no header fetched: kept
    }
    result = plan(names, at=Lsn(0x1A0), checkpoint=Lsn(0x200), wedding="w2", headers=headers)
    table = result.table(GUESTS)
    assert table.segments == (names[0], names[2], names[3], names[4], names[6])
    assert table.skipped_for_wedding == 2 and result.wedding == "w2"
    whole = plan(names, at=Lsn(0x1A0), checkpoint=Lsn(0x200), headers=headers)
    assert whole.table(GUESTS).segments == tuple(names)


# --- snapshots -------------------------------------------------------------------------------


def test_snapshot_names_round_trip() -> None:
    name = snapshot_key('public.a/"b"', Lsn(0x1234), 12)
    assert name == "snapshots/public.a%2F%22b%22/0000000000001234/part-12.snap"
    assert parse_snapshot_key(name) == ('public.a/"b"', Lsn(0x1234), 12)
    manifest = manifest_key('public.a/"b"', Lsn(0x1234), 3)
    assert manifest == "snapshots/public.a%2F%22b%22/0000000000001234/manifest-3.json"
    assert parse_manifest_key(manifest) == ('public.a/"b"', Lsn(0x1234), 3)
    for bad in ("snapshots/public.guests/0000000000001234/part-012.snap",
                "snapshots/public.guests/000000000000123a/part-1.snap",
                "snapshots/public%2Eguests/0000000000001234/part-1.snap",
                "snapshots/public.guests/0000000000001234/part-1.avro"):
        with pytest.raises(ValueError):
            parse_snapshot_key(bad)
    for bad in ("snapshots/public.guests/0000000000001234/manifest-0.json",
                "snapshots/public.guests/0000000000001234/manifest-03.json"):
        with pytest.raises(ValueError):
            parse_manifest_key(bad)
    with pytest.raises(ValueError):
        manifest_key(GUESTS, Lsn(1), 0)
    with pytest.raises(ValueError):
        snapshot_key("", Lsn(1), 0)
    with pytest.raises(ValueError):
        snapshot_key(GUESTS, Lsn(1), -1)


def test_the_newest_snapshot_at_or_below_the_target_is_the_start() -> None:
    listing = [*LISTING,
               *(snap(GUESTS, 0x150, n) for n in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)),
               snap(GUESTS, 0x120, 0), snap(GUESTS, 0x1F0, 0), done(GUESTS, 0x150, 11),
               done(GUESTS, 0x120, 1), done(GUESTS, 0x1F0, 1)]
    result = plan(listing, at=Lsn(0x170), checkpoint=Lsn(0x209))
    guests = result.table(GUESTS)
    assert guests.base_kind == "snapshot" and guests.base == Lsn(0x150)
    assert guests.apply_after == Lsn(0x150)
    assert guests.parts == tuple(snap(GUESTS, 0x150, n) for n in range(11))
    # Only segments with changes after the snapshot: not 0x110-0x150, nor 0x150-0x150.
    assert guests.segments == (seg(GUESTS, 0x160, 0x200),)
    assert guests.objects == guests.parts + guests.segments
    assert result.table(VENDORS).base_kind == "archive-start"
    # Exactly at the snapshot: nothing after it is needed.
    at_snapshot = plan(listing, at=Lsn(0x150), checkpoint=Lsn(0x209)).table(GUESTS)
    assert at_snapshot.segments == () and len(at_snapshot.parts) == 11


def test_a_snapshot_without_its_manifest_is_passed_over() -> None:
    # A compaction cut short (parts written, manifest not): the older state is the start.
    listing = [*LISTING, snap(GUESTS, 0x150, 0), snap(GUESTS, 0x150, 1)]
    guests = plan(listing, at=Lsn(0x170), checkpoint=Lsn(0x209)).table(GUESTS)
    assert guests.base_kind == "archive-start" and guests.parts == ()
    done_listing = [*listing, done(GUESTS, 0x150, 2)]
    guests = plan(done_listing, at=Lsn(0x170), checkpoint=Lsn(0x209)).table(GUESTS)
    assert guests.base_kind == "snapshot" and len(guests.parts) == 2


def test_a_snapshot_straddled_by_a_segment_keeps_that_segment() -> None:
    listing = [seg(GUESTS, 0x100, 0x100), seg(GUESTS, 0x110, 0x200), snap(GUESTS, 0x150, 0),
               done(GUESTS, 0x150, 1)]
    guests = plan(listing, at=Lsn(0x170), checkpoint=Lsn(0x300)).table(GUESTS)
    assert guests.segments == (seg(GUESTS, 0x110, 0x200),) and guests.apply_after == 0x150


def test_the_oldest_snapshot_counts_when_segments_were_trimmed() -> None:
    listing = [snap(GUESTS, 0x150, 0), done(GUESTS, 0x150, 1), seg(GUESTS, 0x160, 0x200)]
    assert plan(listing, at=Lsn(0x150), checkpoint=Lsn(0x300)).oldest == Lsn(0x150)
    with pytest.raises(ReplayRefused, match="before the oldest restorable point 0/150"):
        plan(listing, at=Lsn(0x14F), checkpoint=Lsn(0x300))


def test_a_snapshot_with_a_missing_part_is_refused_naming_it() -> None:
    listing = [*LISTING, snap(GUESTS, 0x150, 0), snap(GUESTS, 0x150, 2), done(GUESTS, 0x150, 3)]
    with pytest.raises(ReplayRefused, match=r"missing its part snapshots/public\.guests/"
                                            r"0000000000000150/part-1\.snap \(its manifest "
                                            r".*manifest-3\.json names 3 parts\)"):
        plan(listing, at=Lsn(0x170), checkpoint=Lsn(0x209))


def test_a_wedding_restore_filters_snapshot_parts_too() -> None:
    parts = [snap(GUESTS, 0x150, n) for n in range(3)]
    parts_done = [*parts, done(GUESTS, 0x150, 3)]
    headers = {parts[0]: header(parts[0], ops={"r": 9}, weddings=("w1",)),
               parts[1]: header(parts[1], ops={"r": 9}, weddings=("w2",))}
    guests = plan([*LISTING, *parts_done], at=Lsn(0x150), checkpoint=Lsn(0x209), wedding="w2",
                  headers=headers).table(GUESTS)
    assert guests.parts == (parts[1], parts[2]) and guests.skipped_for_wedding == 1


def test_a_gap_end_is_a_resnapshot() -> None:
    # Past a gap every table restarts from the snapshot taken at its end: rows deleted during
    # the gap must not come back from the segments before it.
    gaps = [(Lsn(0x150), Lsn(0x180))]
    listing = [*LISTING, seg(GUESTS, 0x180, 0x180)]
    result = plan(listing, at=Lsn(0x190), checkpoint=Lsn(0x209), gaps=gaps)
    guests = result.table(GUESTS)
    assert guests.base_kind == "resnapshot" and guests.base == Lsn(0x180)
    assert guests.apply_after == Lsn(0x17F)
    assert guests.segments == (seg(GUESTS, 0x160, 0x200), seg(GUESTS, 0x180, 0x180))
    assert result.table(VENDORS).segments == (seg(VENDORS, 0x180, 0x190),)
    # A compaction snapshot after the gap's end is newer: it wins.
    later = plan([*listing, snap(GUESTS, 0x185, 0), done(GUESTS, 0x185, 1)], at=Lsn(0x190),
                 checkpoint=Lsn(0x209), gaps=gaps).table(GUESTS)
    assert later.base_kind == "snapshot" and later.base == Lsn(0x185)
    # Before the gap, nothing changes.
    before = plan(listing, at=Lsn(0x150), checkpoint=Lsn(0x209), gaps=gaps).table(GUESTS)
    assert before.base_kind == "archive-start"


# --- the document ----------------------------------------------------------------------------


def test_the_json_document_is_stable() -> None:
    listing = [ObjectInfo(name, 100 + i, {}, None) for i, name in enumerate(LISTING)]
    result = plan(listing, at=Lsn(0x150), checkpoint=Lsn(0x209), tables=[VENDORS],
                  wedding="w1", gaps=[(0x180, 0x190)])
    assert result.bytes == 104
    assert json.loads(result.to_json()) == {
        "format": 1, "at": "0/150", "target": "0/150", "checkpoint": "0/209",
        "latest": "0/208", "oldest": "0/100", "wedding": "w1", "objects": 1, "bytes": 104,
        "gaps": [["0/180", "0/190"]],
        "tables": {VENDORS: {
            "base": {"kind": "archive-start", "lsn": None}, "apply_after": None,
            "objects": [seg(VENDORS, 0x100, 0x100)], "parts": 0, "segments": 1,
            "skipped_for_wedding": 0}},
    }
    assert result.to_json() == plan(list(reversed(listing)), at=Lsn(0x150),
                                    checkpoint=Lsn(0x209), tables=[VENDORS],
                                    wedding="w1", gaps=[(0x180, 0x190)]).to_json()
    assert result.to_json(indent=None).startswith('{"at": "0/150", "bytes": 104, ')
    # Names alone carry no sizes.
    assert plan(LISTING, at=Lsn(0x150), checkpoint=Lsn(0x209)).bytes is None


def test_the_plan_is_a_frozen_value() -> None:
    result = plan(LISTING, at=Lsn(0x150), checkpoint=Lsn(0x209))
    assert isinstance(result, ReplayPlan)
    with pytest.raises(AttributeError):
        result.target = Lsn(1)  # type: ignore[misc]
    assert result == plan(iter(LISTING), at=Lsn(0x150), checkpoint=Lsn(0x209))
    with pytest.raises(KeyError):
        result.table("public.nope")


# --- time cuts -------------------------------------------------------------------------------


RECORDS = [tx(0x100, T0_US, end=0xFF, xid=0),  # a snapshot boundary record: end below commit
           tx(0x120, T0_US + 1_000_000, end=0x128),
           tx(0x128, T0_US + 1_000_000, end=0x130),  # commits back to back, same microsecond
           tx(0x140, T0_US + 2_000_000)]


def test_a_moment_exactly_at_a_commit_time_includes_that_commit() -> None:
    assert resolve_time(RECORDS, T0) == Lsn(0x100)
    assert resolve_time(RECORDS, T0 + timedelta(seconds=1)) == Lsn(0x128)
    assert resolve_time(RECORDS, T0 + timedelta(seconds=2)) == Lsn(0x140)


def test_a_moment_between_commits_cuts_after_the_earlier_one() -> None:
    assert resolve_time(RECORDS, T0 + timedelta(microseconds=999_999)) == Lsn(0x100)
    # Not the end LSN: the next transaction's commit record starts there.
    assert resolve_time(RECORDS[:3], T0 + timedelta(seconds=1, microseconds=-1)) == 0x100
    assert resolve_time(RECORDS, T0 + timedelta(seconds=1)) != Lsn(0x130)


def test_a_moment_after_the_last_commit_is_the_last_commit() -> None:
    assert resolve_time(RECORDS, T0 + timedelta(days=3)) == Lsn(0x140)


def test_a_moment_before_the_first_commit_is_refused() -> None:
    with pytest.raises(ReplayRefused) as caught:
        resolve_time(RECORDS, T0 - timedelta(microseconds=1))
    assert str(caught.value) == ("no archived transaction committed at or before "
                                 "2025-06-14T11:59:59.999999+00:00; the earliest is at "
                                 "2025-06-14T12:00:00+00:00 (LSN 0/100)")
    with pytest.raises(ReplayRefused, match=r"at or before .*\+00:00$"):
        resolve_time([], T0)


def test_time_zones_and_order_do_not_matter() -> None:
    paris = timezone(timedelta(hours=2))
    shuffled = [RECORDS[3], RECORDS[1], RECORDS[0], RECORDS[2], RECORDS[1]]
    assert resolve_time(shuffled, datetime(2025, 6, 14, 14, 0, 1, tzinfo=paris)) == 0x128
    with pytest.raises(ValueError, match="no time zone"):
        resolve_time(RECORDS, datetime(2025, 6, 14, 12, 0))


def test_clock_steps_back() -> None:
    # Commit timestamps can be out of commit order by a little: the last transaction in
    # commit order at or before the moment is the cut.
    records = [tx(0x100, T0_US + 5), tx(0x110, T0_US + 3), tx(0x120, T0_US + 9)]
    assert resolve_time(records, T0 + timedelta(microseconds=4)) == Lsn(0x110)
    assert resolve_time(records, T0 + timedelta(microseconds=3)) == Lsn(0x110)


def test_plan_by_time() -> None:
    resolver = partial(resolve_time, RECORDS)
    result = plan(LISTING, at=T0 + timedelta(seconds=1), checkpoint=Lsn(0x209),
                  resolver=resolver)
    assert result.target == Lsn(0x128) and result.requested == "2025-06-14T12:00:01+00:00"
    with pytest.raises(ReplayRefused, match=r"^2025-06-14T12:00:02\+00:00 \(LSN 0/140\) is "
                                            r"past the destination's durable checkpoint"):
        plan(LISTING, at=T0 + timedelta(seconds=2), checkpoint=Lsn(0x130), resolver=resolver)
    with pytest.raises(ReplayRefused, match="no archived transaction"):
        plan(LISTING, at=T0 - timedelta(seconds=1), checkpoint=Lsn(0x209), resolver=resolver)
    with pytest.raises(ValueError, match="needs a resolver"):
        plan(LISTING, at=T0, checkpoint=Lsn(0x209))
    with pytest.raises(ValueError, match="no time zone"):
        plan(LISTING, at=datetime(2025, 6, 14), checkpoint=Lsn(0x209),
             resolver=resolver)


def test_parse_at() -> None:
    assert parse_at("latest") == parse_at(" LATEST ") == LATEST
    assert parse_at("16/b374d848") == Lsn(0x16B374D848)
    assert parse_at("2025-06-14T12:00:00Z") == T0
    assert parse_at("2025-06-14T14:00:00.5+02:00") == T0 + timedelta(microseconds=500_000)
    with pytest.raises(ValueError, match="no time zone"):
        parse_at("2025-06-14T12:00:00")
    with pytest.raises(ValueError, match="is not 'latest', an LSN"):
        parse_at("yesterday")


def test_transaction_segments_for_a_moment() -> None:
    a = transactions_key(Lsn(0x100), Lsn(0x140))
    b = transactions_key(Lsn(0x150), Lsn(0x190))
    c = transactions_key(Lsn(0x1A0), Lsn(0x1F0))
    listing = [c, a, seg(GUESTS, 0x100, 0x100), b, checkpoint_key("local", Lsn(0x200))]
    assert transaction_segments_for(listing, T0) == (a, b, c)  # no headers: every one
    headers = {a: header(a, min_ts=T0_US - 10, max_ts=T0_US - 5),
               b: header(b, min_ts=T0_US - 4, max_ts=T0_US + 5),
               c: header(c, min_ts=T0_US + 6, max_ts=T0_US + 9)}
    assert transaction_segments_for(listing, T0, headers) == (b,)
    assert transaction_segments_for(listing, T0 + timedelta(microseconds=5), headers) == (b,)
    assert transaction_segments_for(listing, T0 + timedelta(microseconds=6), headers) == (c,)
    assert transaction_segments_for(listing, T0 + timedelta(seconds=1), headers) == (c,)
    assert transaction_segments_for(listing, T0 - timedelta(seconds=1), headers) == ()
    with pytest.raises(ReplayRefused, match="does not match its name"):
        transaction_segments_for(listing, T0, {a: header(b)})


# --- properties ------------------------------------------------------------------------------

TABLES = (GUESTS, VENDORS, TASKS)


@st.composite
def archives(draw: st.DrawFn) -> tuple[list[str], dict[str, SegmentHeader]]:
    names: set[str] = set()
    headers: dict[str, SegmentHeader] = {}
    for table in draw(st.lists(st.sampled_from(TABLES), min_size=1, max_size=3, unique=True)):
        for _ in range(draw(st.integers(1, 8))):
            first = draw(st.integers(1, 200))
            last = first + draw(st.integers(0, 40))
            digest = draw(st.sampled_from(["", "a", "b7"]))
            name = seg(table, first, last, digest)
            names.add(name)
            if draw(st.booleans()):
                weddings = draw(st.one_of(st.none(), st.lists(
                    st.sampled_from(["w1", "w2", "w3"]), unique=True).map(tuple)))
                ops = draw(st.dictionaries(st.sampled_from("rcudt"), st.integers(1, 3),
                                           min_size=1))
                headers[name] = header(name, ops=ops, weddings=weddings)
        for lsn in draw(st.lists(st.integers(1, 240), max_size=2, unique=True)):
            count = draw(st.integers(1, 3))
            names.update(snap(table, lsn, n) for n in range(count))
            if draw(st.integers(0, 3)):  # else a compaction cut short: no manifest
                names.add(done(table, lsn, count))
    return sorted(names), headers


def _records_in(listing: list[str], table: str) -> list[tuple[str, Lsn, Lsn]]:
    return [(n, (k := parse_segment_key(n)).first, k.last) for n in listing
            if n.startswith("segments/") and parse_segment_key(n).table == table]


@settings(max_examples=300, deadline=None)
@given(archives(), st.integers(0, 260), st.integers(-3, 80),
       st.lists(st.tuples(st.integers(0, 250), st.integers(1, 30)), max_size=2),
       st.booleans(), st.randoms(use_true_random=False))
def test_plan_properties(archive: tuple[list[str], dict[str, SegmentHeader]], target: int,
                         ahead: int, raw_gaps: list[tuple[int, int]], use_headers: bool,
                         rnd: random.Random) -> None:
    listing, all_headers = archive
    checkpoint = max(1, target + ahead)
    headers = all_headers if use_headers else None
    gaps = [(Lsn(a), Lsn(a + n)) for a, n in raw_gaps]
    try:
        result = plan(listing, at=Lsn(target), checkpoint=Lsn(checkpoint), gaps=gaps,
                      headers=headers)
    except ReplayRefused as refused:
        # Refused exactly when the point is past the checkpoint, before the oldest point, or
        # inside a gap (no table lacks a start: every first segment may hold snapshot rows,
        # or the headers are not used).
        oldest = _oldest_expected(listing, headers)
        assert (target >= checkpoint or oldest is None or target < oldest
                or any(a < target < b for a, b in gaps)), refused
        if refused.nearest is not None:
            # The suggestion is a restorable point: it is planned without a refusal.
            assert oldest is not None and oldest <= refused.nearest < checkpoint
            assert not any(a < refused.nearest < b for a, b in gaps)
            plan(listing, at=refused.nearest, checkpoint=Lsn(checkpoint), gaps=gaps,
                 headers=headers)
        return
    assert target < checkpoint and not any(a < target < b for a, b in gaps)
    assert result.oldest <= target == result.target
    for table in result.tables:
        included = set(table.segments)
        for name, first, last in _records_in(listing, table.table):
            if name in included:
                # Every included segment starts at or before the target and has a change
                # the base does not hold.
                assert first <= target
                assert table.apply_after is None or last > table.apply_after
            elif first <= target:
                # A segment with a change at or below the target is left out only when the
                # base (a snapshot) holds every change of it up to the target.
                assert table.apply_after is not None
                assert min(last, target) <= table.apply_after
        if table.base_kind == "snapshot":
            assert table.base is not None and table.base <= target
            assert all(parse_snapshot_key(p).lsn == table.base for p in table.parts)
            assert not any(table.base < (k := parse_manifest_key(n)).lsn <= target
                           and k.table == table.table
                           for n in listing if "/manifest-" in n)
        assert list(table.segments) == sorted(table.segments)
    # Deterministic, and independent of the listing's order and repetitions.
    shuffled = listing + rnd.sample(listing, k=len(listing) // 2)
    rnd.shuffle(shuffled)
    again = plan(shuffled, at=Lsn(target), checkpoint=Lsn(checkpoint), gaps=list(reversed(gaps)),
                 headers=headers)
    assert again == result and again.to_json() == result.to_json()
    # A wedding restore reads a subset, and leaves out only what headers rule out.
    for wedding in ("w1", "w2"):
        narrowed = plan(listing, at=Lsn(target), checkpoint=Lsn(checkpoint), gaps=gaps,
                        headers=headers, wedding=wedding)
        for whole, part in zip(result.tables, narrowed.tables, strict=True):
            left_out = set(whole.objects) - set(part.objects)
            assert set(part.objects) <= set(whole.objects)
            assert len(left_out) == part.skipped_for_wedding
            for name in left_out:
                assert headers is not None and name in headers
                found = headers[name]
                assert not found.may_hold_wedding(wedding)
                assert not {"d", "t"} & found.ops.keys()


def _oldest_expected(listing: list[str], headers: dict[str, SegmentHeader] | None
                     ) -> Lsn | None:
    per_table: dict[str, list[Lsn]] = {}
    for name in listing:
        if "/manifest-" in name:
            key = parse_manifest_key(name)
            per_table.setdefault(key.table, []).append(key.lsn)
    for table in {*per_table, *(t for t in TABLES if _records_in(listing, t))}:
        for name, first, _ in sorted(_records_in(listing, table)):
            h = (headers or {}).get(name)
            if h is None or h.ops.get("r", 0):
                per_table.setdefault(table, []).append(first)
                break
    if not all(per_table.get(t) for t in {*per_table, *(t for t in TABLES
                                                        if _records_in(listing, t))}):
        return None
    return max(min(v) for v in per_table.values())


transactions = st.lists(
    st.tuples(st.integers(1, 60), st.integers(0, 40)).map(
        lambda v: tx(v[0] * 16, T0_US + v[1], end=v[0] * 16 + 16)),
    max_size=30)


@settings(max_examples=300, deadline=None)
@given(transactions, st.integers(-5, 45), st.randoms(use_true_random=False))
def test_resolve_time_properties(records: list[TransactionRecord], offset: int,
                                 rnd: random.Random) -> None:
    moment = T0 + timedelta(microseconds=offset)
    limit = T0_US + offset
    if not any(r.commit_ts_us <= limit for r in records):
        with pytest.raises(ReplayRefused):
            resolve_time(records, moment)
        return
    cut = resolve_time(records, moment)
    # A transaction at the cut committed at or before the moment; none after the cut did.
    assert any(r.commit_lsn == cut and r.commit_ts_us <= limit for r in records)
    assert not any(r.commit_lsn > cut and r.commit_ts_us <= limit for r in records)
    shuffled = records + records[: len(records) // 2]
    rnd.shuffle(shuffled)
    assert resolve_time(shuffled, moment) == cut


@settings(max_examples=300, deadline=None)
@given(st.lists(transactions.filter(bool), min_size=1, max_size=5), st.integers(-5, 45),
       st.lists(st.booleans(), min_size=5, max_size=5))
def test_transaction_segments_for_reads_enough(batches: list[list[TransactionRecord]],
                                               offset: int, known: list[bool]) -> None:
    # Segments as a sink writes them: records in commit order, possibly overlapping others.
    segments: dict[str, list[TransactionRecord]] = {}
    headers: dict[str, SegmentHeader] = {}
    for i, batch in enumerate(batches):
        batch = sorted(batch, key=lambda r: r.commit_lsn)
        name = transactions_key(batch[0].commit_lsn, batch[-1].commit_lsn, f"{i:x}")
        segments[name] = batch
        if known[i]:
            headers[name] = header(name, min_ts=min(r.commit_ts_us for r in batch),
                                   max_ts=max(r.commit_ts_us for r in batch))
    moment = T0 + timedelta(microseconds=offset)
    chosen = transaction_segments_for(list(segments), moment, headers)
    assume(any(r.commit_ts_us <= T0_US + offset for b in batches for r in b))
    everything = [r for batch in segments.values() for r in batch]
    assert resolve_time([r for n in chosen for r in segments[n]], moment) == resolve_time(
        everything, moment)


def test_gap_record_names_round_trip_and_bad_ones_are_named() -> None:
    key = gap_key(Lsn(0x16B374D848), Lsn(0x16B3750000))
    assert key == "gaps/00000016B374D848-00000016B3750000.json"
    assert parse_gap_key(key) == (Lsn(0x16B374D848), Lsn(0x16B3750000))
    for bad in ("gaps/16B374D848-16B3750000.json", "gaps/00000016B374D848.json",
                "gaps/00000016B374D848-00000016B3750000.txt", "other/x"):
        with pytest.raises(ValueError, match=re.escape(bad)):
            parse_gap_key(bad)


# --- a point past the newest archived commit; foreign-key order ----------------------------


def test_a_time_past_the_newest_commit_by_more_than_the_heartbeat_is_refused() -> None:
    from replicator.replay.plan import check_fresh

    base = datetime(2026, 6, 13, 12, 0, tzinfo=UTC)
    us = int(base.timestamp() * 1_000_000)
    records = [tx(100, us), tx(200, us + 5_000_000), tx(300, us + 9_000_000)]
    # The record at 300 is not below the checkpoint: the newest archived commit is 200's.
    check_fresh(records, base + timedelta(seconds=15), Lsn(250), 10.0)
    with pytest.raises(ReplayRefused, match=r"newest archived commit .* LSN 0/C8\).*"
                                            r"--allow-stale") as info:
        check_fresh(records, base + timedelta(seconds=15, microseconds=1), Lsn(250), 10.0)
    assert info.value.nearest == Lsn(200)
    check_fresh([], base, Lsn(250), 10.0)  # nothing archived: the plan refuses it


def test_foreign_key_order_parents_first_and_refusals() -> None:
    from replicator.replay.swap import Relation, fk_order

    rels = [Relation("g_w", "public.guests", "public.weddings", "a"),
            Relation("s_g", "public.seats", "public.guests", "c"),
            Relation("self", "public.guests", "public.guests", "a")]
    assert fk_order(["public.seats", "public.guests", "public.weddings"], rels) == [
        "public.weddings", "public.guests", "public.seats"]
    with pytest.raises(ReplayRefused, match=r"s_g of public.seats references public.guests "
                                            r"ON DELETE CASCADE"):
        fk_order(["public.guests", "public.weddings"], rels)
    with pytest.raises(ReplayRefused, match="cycle"):
        fk_order(["a.x", "a.y"], [Relation("1", "a.x", "a.y", "a"),
                                  Relation("2", "a.y", "a.x", "a")])
