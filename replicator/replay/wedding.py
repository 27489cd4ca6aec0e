"""A wedding restore: every row of one wedding in a table, reading only the objects whose
header says the wedding may be inside."""


from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from replicator.archive.layout import (
    is_part_key,
    is_snapshot_key,
    parse_part_key,
    parse_segment_key,
)
from replicator.archive.merge import Merger
from replicator.archive.part import PartCorrupt, PartHeader
from replicator.archive.part import key_text as part_key_text
from replicator.archive.reader import Archive
from replicator.archive.render import copy_escape
from replicator.archive.segment import SegmentHeader
from replicator.archive.snapshot import SnapshotHeader, SnapshotPart
from replicator.events import ChangeEvent, Op
from replicator.replay.engine import apply_key_changes, emit_states
from replicator.replay.table import (
    Emit,
    Output,
    TableJob,
    TableStats,
    line_event,
    mark_seen,
    record_event,
)
from replicator.transport.avro import to_python
from replicator.transport.kafka import key_text

__all__ = ["restore_wedding"]


async def restore_wedding(archive: Archive, job: TableJob, emit: Emit,
                           progress: Callable[[int], None] | None) -> TableStats:
    """The rows of one wedding. Only segments whose header says the wedding may be inside
    (or a truncate) are read, and their records of that wedding kept; then the segments kept
    only for deletes of unknown wedding are read if their filter of deleted keys may hold a
    key of the wedding, and those deletes applied. Memory: the wedding's rows. A row that
    moved to another wedding is seen only if the move is in a segment read (the update names
    the new wedding only)."""
    stats = TableStats(job.table)
    base, target, wedding = job.first_change, int(job.target), job.wedding
    headers = job.headers or {}
    merger = Merger()
    seen: dict[int, bytearray] = {}
    wanted: set[str] = set()  # key texts of the wedding's rows
    unknown_deletes: list[dict[str, Any]] = []
    key_changes: list[dict[str, Any]] = []
    for_deletes: list[tuple[str, SegmentHeader]] = []

    def take(record: Mapping[str, Any], deletes_only: bool) -> None:
        source = record["source"]
        lsn = source["lsn"]
        if lsn < base or lsn > target or not mark_seen(seen, lsn, source["seq"]):
            return
        op, owner = record["op"], record["wedding_id"]
        if op == "t" and not deletes_only:
            merger.add(record_event(record))
        elif owner is None and op == "d":
            unknown_deletes.append(dict(record))
        elif owner == wedding and not deletes_only:
            event = record_event(record)
            wanted.add(key_text(event.key))
            before = record["before"]
            if op == "u" and before is not None:
                old = {name: before.get(name) for name in record["key"]}
                if part_key_text(old) != part_key_text(record["key"]):
                    key_changes.append(dict(record))
                    wanted.add(key_text(to_python(old)))
                    return
            merger.add(event)

    for key in job.segments:
        if is_snapshot_key(key):
            known = headers.get(key)
            if known is not None and not known.may_hold_wedding(wedding or ""):
                stats.segments_skipped += 1
                continue
            snapshot = await archive.snapshot(key)
            stats.segments += 1
            try:
                for _, event in _snapshot_wedding(job, snapshot, wedding or ""):
                    wanted.add(key_text(event.key))
                    merger.add(event)
            except PartCorrupt as exc:
                raise archive.snapshot_failed(key, exc) from None
            continue
        if is_part_key(key):
            lsn = int(parse_part_key(key).lsn)
            known = headers.get(key)
            if lsn < base or lsn > target:
                continue
            if known is not None and not known.may_hold_wedding(wedding or ""):
                stats.segments_skipped += 1
                continue
            part, batches = await archive.part(key)
            stats.segments += 1
            mine = copy_escape(wedding or "")
            for lines in batches:
                for line in lines:
                    seq_text, owner, key_field, row = line.split("\t", 3)
                    if owner != mine or not mark_seen(seen, lsn, int(seq_text)):
                        continue
                    event = line_event(job, part, int(seq_text), owner, key_field, row)
                    wanted.add(key_text(event.key))
                    merger.add(event)
            continue
        parsed = parse_segment_key(key)
        if parsed.last < base or parsed.first > target:
            continue
        header = headers.get(key)
        assert not isinstance(header, PartHeader | SnapshotHeader)
        if (header is not None and not header.may_hold_wedding(wedding or "")
                and not header.ops.get(Op.TRUNCATE.value, 0)):
            for_deletes.append((key, header))
            continue
        _, records = await archive.segment(key)
        stats.segments += 1
        for record in records:
            take(record, False)
        archive.check_memory(job.table, len(wanted))
        await asyncio.sleep(0)
    for key, header in for_deletes:
        if not any(header.may_delete_key(k) for k in wanted):
            stats.segments_skipped += 1
            continue
        _, records = await archive.segment(key)
        stats.segments += 1
        for record in records:
            take(record, True)
    for record in unknown_deletes:
        if key_text(to_python(record["key"])) in wanted:
            merger.add(record_event(record))
            stats.changes += 1
    apply_key_changes(merger, key_changes)
    stats.changed_keys = len(wanted)
    await emit_states(merger, job, Output(job, stats, emit, None, None, progress),
                       archive.timeline)
    return stats


def _snapshot_wedding(job: TableJob, snapshot: SnapshotPart, wedding: str
                      ) -> Iterator[tuple[int, ChangeEvent]]:
    """The rows of *wedding* in a compaction snapshot part, as versions at the base."""
    mine = copy_escape(wedding)
    weddings = snapshot.wedding_lines()
    picked = [n for n, field_ in enumerate(weddings) if field_ == mine]
    if not picked:
        return
    rows, keys = snapshot.row_lines(), snapshot.key_lines()
    for n in picked:
        yield n, line_event(job, snapshot.header, n, mine, keys[n], rows[n])
