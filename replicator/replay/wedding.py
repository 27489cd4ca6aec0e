"""A wedding restore: every row of one wedding in a table, reading only the objects whose
header says the wedding may be inside."""


from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from replicator.archive.part import PartCorrupt, PartHeader, pg_key_text
from replicator.archive.reader import Archive
from replicator.archive.render import copy_escape
from replicator.archive.segment import SegmentHeader
from replicator.archive.snapshot import SnapshotHeader, SnapshotPart
from replicator.events import ChangeEvent, Op
from replicator.keys import canonical_key
from replicator.replay.table import (
    Emit,
    EmitCopy,
    ObjectKind,
    Output,
    TableJob,
    TableStats,
    apply_key_changes,
    emit_states,
    job_objects,
    line_event,
    line_key,
    mark_seen,
    record_event,
)
from replicator.transport.avro import to_python

__all__ = ["restore_wedding"]


async def restore_wedding(archive: Archive, job: TableJob, emit: Emit,
                           progress: Callable[[int], None] | None,
                           emit_copy: EmitCopy | None = None) -> TableStats:
    """The rows of one wedding. Only segments whose header says the wedding may be inside
    (or a truncate) are read, and their records of that wedding kept; then the segments kept
    only for deletes of unknown wedding are read if their filter of deleted keys may hold a
    key of the wedding, and those deletes applied. Memory: the wedding's rows. A row that
    moved to another wedding is seen only if the move is in a segment read (the update names
    the new wedding only).

    A compaction snapshot's rows of the wedding(s) are held as their COPY text until every
    change is read: the rows whose key no change touched go out as they are (`Output.lines`,
    as COPY text when the target takes it), and only the others become row versions for the
    merge. (Turning every row into a version cost 80 to 180 us a row.)"""
    stats = TableStats(job.table)
    assert job.wedding is not None
    base, target = job.first_change, int(job.target)
    owners = job.weddings if job.weddings is not None else frozenset((job.wedding,))
    headers = job.headers or {}
    merger = job.new_merger()
    seen: dict[int, bytearray] = {}
    wanted: set[str] = set()  # key texts of the wedding's rows
    unknown_deletes: list[dict[str, Any]] = []
    key_changes: list[Mapping[str, Any]] = []
    for_deletes: list[tuple[str, SegmentHeader]] = []
    touched: set[str] = set()  # canonical keys some change after the base names
    held: list[tuple[SnapshotHeader, list[_Held]]] = []  # compaction snapshot rows
    truncated = False

    def take(record: Mapping[str, Any], deletes_only: bool) -> None:
        source = record["source"]
        lsn = source["lsn"]
        if lsn < base or lsn > target or not mark_seen(seen, lsn, source["seq"]):
            return
        nonlocal truncated
        op, owner = record["op"], record["wedding_id"]
        if op == "t" and not deletes_only:
            truncated = True
            merger.add(record_event(record))
        elif owner is None and op == "d":
            unknown_deletes.append(dict(record))
        elif not deletes_only and owner in owners:
            event = record_event(record)
            key = canonical_key(event.key)
            wanted.add(key)
            touched.add(key)
            before = record["before"]
            if op == "u" and before is not None:
                old = {name: before.get(name) for name in record["key"]}
                if pg_key_text(old) != pg_key_text(record["key"]):
                    key_changes.append(dict(record))
                    old_key = canonical_key(to_python(old))
                    wanted.add(old_key)
                    touched.add(old_key)
                    return
            merger.add(event)

    for obj in job_objects(job):
        known = headers.get(obj.key)
        if obj.kind is ObjectKind.SEGMENT:
            assert not isinstance(known, PartHeader | SnapshotHeader)
            if (known is not None and not job.may_hold(known)
                    and not known.ops.get(Op.TRUNCATE.value, 0)):
                for_deletes.append((obj.key, known))
                continue
        elif known is not None and not job.may_hold(known):
            stats.segments_skipped += 1
            continue
        stats.segments += 1
        if obj.kind is ObjectKind.SNAPSHOT:
            snapshot = await archive.snapshot(obj.key)
            try:
                rows = _snapshot_wedding(job, snapshot)
            except PartCorrupt as exc:
                raise archive.snapshot_failed(obj.key, exc) from None
            wanted.update(row.key for row in rows)
            held.append((snapshot.header, rows))
        elif obj.kind is ObjectKind.SEGMENT:
            _, records = await archive.segment(obj.key)
            for record in records:
                take(record, False)
            archive.check_memory(job.table, len(wanted))
            await asyncio.sleep(0)
        else:  # a capture snapshot's part, at the base or later
            part, batches = await archive.part(obj.key)
            for event in _part_wedding(job, part, batches, seen):
                wanted.add(canonical_key(event.key))
                merger.add(event)
    for key, header in for_deletes:
        if not any(header.may_delete_key(k) for k in wanted):
            stats.segments_skipped += 1
            continue
        _, records = await archive.segment(key)
        stats.segments += 1
        for record in records:
            take(record, True)
    for record in unknown_deletes:
        key = canonical_key(to_python(record["key"]))
        if key in wanted:
            merger.add(record_event(record))
            touched.add(key)
            stats.changes += 1
    out = Output(job, stats, emit, emit_copy, None, progress)
    for base_header, rows in held:
        plain: list[str] = []
        for row in rows:
            if truncated or row.key in touched:
                merger.add(line_event(job, base_header, row.seq, row.wedding, row.key_field,
                                      row.line))
            else:
                plain.append(row.line)
        await out.lines(plain, base_header.columns, [], [], base_header.lsn)
    apply_key_changes(merger, key_changes)
    stats.changed_keys = len(wanted)
    await emit_states(merger, job, out, archive.timeline)
    return stats


def _mine(job: TableJob) -> frozenset[str]:
    """The restore's wedding ids as COPY-escaped fields."""
    if job.weddings is not None:
        return frozenset(copy_escape(w) for w in job.weddings)
    assert job.wedding is not None
    return frozenset((copy_escape(job.wedding),))


def _part_wedding(job: TableJob, part: PartHeader, batches: Iterable[list[str]],
                  seen: dict[int, bytearray]) -> Iterator[ChangeEvent]:
    """The rows of the wedding(s) in a capture snapshot part, as versions at their
    position."""
    mine = _mine(job)
    for lines in batches:
        for line in lines:
            seq_text, owner, key_field, row = line.split("\t", 3)
            if owner not in mine or not mark_seen(seen, int(part.lsn), int(seq_text)):
                continue
            yield line_event(job, part, int(seq_text), owner, key_field, row)


@dataclass(slots=True)
class _Held:
    """A compaction snapshot's row of the wedding(s), as its COPY text."""

    seq: int
    wedding: str
    key_field: str
    line: str
    key: str  # canonical


def _snapshot_wedding(job: TableJob, snapshot: SnapshotPart) -> list[_Held]:
    """The rows of the wedding(s) in a compaction snapshot part, held as they are."""
    mine = _mine(job)
    weddings = snapshot.wedding_lines()
    picked = [n for n, field_ in enumerate(weddings) if field_ in mine]
    if not picked:
        return []
    rows, keys = snapshot.row_lines(), snapshot.key_lines()
    header = snapshot.header
    return [_Held(n, weddings[n], keys[n], rows[n], line_key(header, keys[n]))
            for n in picked]
