"""Object names: every kind round-trips through `archive.layout`, for any table name, and a
name that is not the canonical spelling of what it parses to is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.archive import layout
from replicator.events import Tier
from replicator.position import Lsn

ODD_TABLES = ["public.guests", 'public.we"ird', "public.v1.2", "crm.with space",
              "Sales.Upper", "public.café", "public.a/b", "public.%41", "x.y%2Fz"]
tables = st.text(min_size=1, max_size=30).filter(lambda t: t not in (".", ".."))
lsns = st.integers(0, (1 << 64) - 1).map(Lsn)


@pytest.mark.parametrize("table", ODD_TABLES)
def test_every_table_name_is_one_path_segment_and_parses_back(table: str) -> None:
    lsn, last = Lsn(0x16B374D848), Lsn(0x16B374D900)
    seg = layout.segment_key(table, lsn, last, "ab12")
    assert seg.count("/") == 2
    assert layout.parse_segment_key(seg) == layout.SegmentKey(
        layout.SegmentKind.CHANGES, table, lsn, last, "ab12")
    assert layout.table_of(seg) == table
    part = layout.part_key(table, lsn, 3, 9, "0f")
    assert layout.is_part_key(part)
    assert layout.parse_part_key(part) == layout.PartKey(table, lsn, 3, 9, "0f")
    snap = layout.snapshot_key(table, lsn, 7)
    assert layout.is_snapshot_key(snap) and not layout.is_manifest_key(snap)
    assert layout.parse_snapshot_key(snap) == layout.SnapshotName(table, lsn, 7)
    manifest = layout.manifest_key(table, lsn, 8)
    assert layout.is_manifest_key(manifest)
    assert layout.parse_manifest_key(manifest) == layout.SnapshotName(table, lsn, 8)
    assert snap.startswith(layout.snapshot_prefix(table, lsn))
    assert layout.parse_schema_key(layout.schema_key(table, lsn)) == lsn
    assert layout.schema_key(table, lsn).startswith(layout.schemas_prefix(table))


@given(tables, lsns, lsns)
def test_segment_names_round_trip_and_sort_by_position(table: str, a: Lsn, b: Lsn) -> None:
    first, last = min(a, b), max(a, b)
    key = layout.segment_key(table, first, last)
    assert layout.parse_segment_key(key).table == table
    later = layout.segment_key(table, Lsn(min(last + 1, (1 << 64) - 1)), Lsn((1 << 64) - 1))
    assert (key <= later) == (first <= min(last + 1, (1 << 64) - 1))


@pytest.mark.parametrize("bad", [
    "segments/public.guests/0000000016B374D8-0000000016B37500.sag",
    "segments/public.guests/16B374D8-0000000016B37500.seg",  # not zero-padded
    "segments/public%2Eguests/0000000016B374D8-0000000016B37500.seg",  # not canonical
    "segments/public.guests/0000000016B37500-0000000016B374D8.seg",  # ends before it starts
    "segments/public.guests/0000000016B374D8-0000000016B37500-XY.seg",
])
def test_a_non_canonical_segment_name_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        layout.parse_segment_key(bad)


def test_non_canonical_snapshot_and_part_names_are_refused() -> None:
    with pytest.raises(ValueError, match="not the canonical"):
        layout.parse_snapshot_key("snapshots/public%2Eguests/0000000000000001/part-0.snap")
    with pytest.raises(ValueError, match="not a snapshot part name"):
        layout.parse_snapshot_key("snapshots/public.guests/0000000000000001/part-01.snap")
    with pytest.raises(ValueError, match="not the canonical"):
        layout.parse_part_key("snapshots/public%2Eguests/0000000000000001/"
                              "rows-0000000001-0000000002-ab.part")
    with pytest.raises(ValueError, match="invalid snapshot part count"):
        layout.manifest_key("public.guests", Lsn(1), 0)
    with pytest.raises(ValueError, match="invalid table name"):
        layout.segment_key("..", Lsn(1), Lsn(2))


def test_checkpoint_names_per_destination_and_tier() -> None:
    overall = layout.checkpoint_key("local", Lsn(0x100))
    critical = layout.checkpoint_key("local", Lsn(0x200), Tier.CRITICAL)
    assert overall == "checkpoints/local/0000000000000100"
    assert critical == "checkpoints/local/critical/0000000000000200"
    assert layout.parse_checkpoint_key(critical) == Lsn(0x200)
    assert layout.is_checkpoint_key(overall, "local")
    assert not layout.is_checkpoint_key(critical, "local")  # a tier's, under the same prefix
    assert layout.is_checkpoint_key(critical, "local", Tier.CRITICAL)
    assert not layout.is_checkpoint_key(overall, "s3")
    assert layout.destination_of(critical) == "local"
    with pytest.raises(ValueError, match="not a checkpoint name"):
        layout.parse_checkpoint_key("checkpoints/local/FFFF")


def test_gap_names_round_trip_and_refuse_others() -> None:
    key = layout.gap_key(Lsn(0x10), Lsn(0x20))
    assert key == "gaps/0000000000000010-0000000000000020.json"
    assert layout.parse_gap_key(key) == (Lsn(0x10), Lsn(0x20))
    for bad in ("gaps/10-20.json", "gaps/0000000000000010-0000000000000020.txt", "gap/x"):
        with pytest.raises(ValueError, match="not a gap record name"):
            layout.parse_gap_key(bad)
