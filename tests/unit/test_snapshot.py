"""Compaction snapshot parts: written by wedding buckets, read back frame by frame, checked."""

from __future__ import annotations

import json
import struct
from collections import Counter

import pytest

from replicator.archive.part import PartCorrupt
from replicator.archive.snapshot import (
    SnapshotPart,
    SnapshotWriter,
    bucket_of,
    manifest,
    read_snapshot_header,
)
from replicator.position import Lsn

TABLE = "public.guests"


def rows_of(n: int, weddings: int) -> tuple[list[str], list[str], list[str]]:
    rows = [f"{i}\t{i % weddings}\tguest {i}\\twith a tab\t\\N" for i in range(n)]
    keys = [str(i) for i in range(n)]
    wedding = [str(i % weddings) if i % 17 else "\\N" for i in range(n)]
    return rows, keys, wedding


def write(n: int, weddings: int, parts: int) -> list[tuple[int, bytes]]:
    rows, keys, wedding = rows_of(n, weddings)
    with SnapshotWriter(table=TABLE, lsn=Lsn(0x1234), columns=("id", "wedding_id", "name", "x"),
                        key=("id",), key_kinds=("long",), parts=parts) as writer:
        for start in range(0, n, 997):  # batches of any size
            writer.add(rows[start:start + 997], keys[start:start + 997],
                       wedding[start:start + 997])
        assert writer.rows == n
        return [(number, data) for number, data, _ in writer.parts()]


def test_every_row_once_and_each_wedding_in_one_part() -> None:
    n, weddings = 30_000, 300
    written = write(n, weddings, parts=7)
    assert [number for number, _ in written] == list(range(7))
    rows, keys, wedding = rows_of(n, weddings)
    seen: Counter[str] = Counter()
    homes: dict[str, set[int]] = {}
    for number, data in written:
        part = SnapshotPart(data)
        header = part.header
        assert (header.table, header.lsn, header.part, header.parts) == (TABLE, Lsn(0x1234),
                                                                          number, 7)
        got_rows, got_keys, got_weddings = (part.row_lines(), part.key_lines(),
                                            part.wedding_lines())
        assert len(got_rows) == len(got_keys) == len(got_weddings) == header.rows
        # The three frames line up, and the raw chunks are the rows frame.
        assert b"".join(part.row_chunks()).decode().split("\n")[:-1] == got_rows
        assert part.row_bytes() == [r.encode() for r in got_rows]
        for row, key, w in zip(got_rows, got_keys, got_weddings, strict=True):
            assert rows[int(key)] == row and wedding[int(key)] == w
            assert bucket_of(w, 7) == number
            homes.setdefault(w, set()).add(number)
        assert set(header.wedding_ids or ()) == set(got_weddings) - {"\\N"}
        seen.update(got_keys)
    assert seen == Counter(keys)
    assert all(len(parts) == 1 for parts in homes.values())


def test_many_weddings_are_a_bloom_filter() -> None:
    [(_, data)] = write(3_000, 1_500, parts=1)
    header = SnapshotPart(data).header
    assert header.wedding_ids is None and header.wedding_bloom
    assert header.may_hold_wedding("7") and not header.may_hold_wedding("no such wedding")


def test_damage_is_named() -> None:
    [(_, data)] = write(1_000, 10, parts=1)
    header, start = read_snapshot_header(data)
    # A header that says more rows than the frames hold.
    doc = json.loads(data[8:start])
    doc["rows"] += 1
    raw = json.dumps(doc).encode()
    forged = data[:4] + struct.pack(">I", len(raw)) + raw + data[start:]
    with pytest.raises(PartCorrupt, match="holds 1000 rows, its header says 1001"):
        list(SnapshotPart(forged).row_chunks())
    with pytest.raises(PartCorrupt, match="keys frame holds 1000 lines"):
        SnapshotPart(forged).key_lines()
    # A frame cut short, and bytes that are no snapshot part.
    with pytest.raises(PartCorrupt, match="ends inside its frames"):
        SnapshotPart(data[:start + header.rows_frame // 2])
    cut = data[:start + header.rows_frame + header.keys_frame + 3]
    with pytest.raises(PartCorrupt, match="weddings frame"):
        SnapshotPart(cut).wedding_lines()
    with pytest.raises(PartCorrupt, match="no WSS1 magic"):
        SnapshotPart(b"WSP1" + data[4:])
    # Weddings the header does not list.
    doc = json.loads(data[8:start])
    doc["wedding_ids"] = ["1"]
    raw = json.dumps(doc).encode()
    forged = data[:4] + struct.pack(">I", len(raw)) + raw + data[start:]
    with pytest.raises(PartCorrupt, match="weddings do not match its header"):
        SnapshotPart(forged).wedding_lines()


def test_the_manifest_counts_parts_and_rows() -> None:
    written = write(5_000, 50, parts=3)
    headers = [SnapshotPart(data).header for _, data in written]
    doc = json.loads(manifest(table=TABLE, lsn=Lsn(0x1234), headers=headers,
                              created_at="2026-11-28T12:00:00+00:00", folded_objects=4,
                              folded_bytes=1000))
    assert doc["parts"] == 3 and doc["rows"] == 5_000 == sum(doc["part_rows"])
    assert doc["columns"] == ["id", "wedding_id", "name", "x"]
