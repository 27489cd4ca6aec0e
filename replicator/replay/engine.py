"""Rebuilding one table's rows as of a point, from its planned segments.

**The base.** A table's rows start from its *base snapshot*: the op `r` rows at the LSN of the
table's snapshot boundary record (a transaction record with xid 0 whose counts name the
table; the capture writes one only once every row of that snapshot is in Kafka, so a snapshot
cut short by a crash, whose rows may be archived too, is never taken for the base). Changes
below the base LSN are ignored: the snapshot holds their effect. Op `r` rows at other LSNs
(an on-demand snapshot) are versions like any change.

**Memory bounded by the changed keys.** Two passes over the table's segments:
1. Every segment except those holding only base rows is decoded; its changes (and any `r`
   rows in it) go to a `Merger` (the sinks' conflict rules: per-key maximum by position,
   deletes and truncates as versions, unchanged TOAST columns filled from the nearest older
   version of the same origin). The set of changed keys is remembered.
2. The base-only segments are decoded; a base row whose key changed joins the merger (it is
   the older version unchanged columns are filled from), every other base row is written out
   at once. Then the merger's live rows are written.
So only changed keys are held, never the whole table; the base segments are fetched twice and
decoded once. Pass 1 runs in a thread.

**From a compaction snapshot** (`archive.snapshot`, base kind "snapshot"): the snapshot holds
every change at or below its LSN, so pass 1 reads only what is above it (whole OCF blocks
below it are passed over). With a target that can remove rows it was given (`Remover`: the
Postgres target), the snapshot's rows are loaded, untouched, while pass 1 runs; then the rows
of the changed keys are removed (their older versions join the merger) or, after a truncate,
all of them. Otherwise the keys frame of each part is matched against the changed keys, and
the other rows go out as they are.

**Completeness.** Records are de-duplicated by position (segments overlap after a
redelivery). For a full-table restore, the changes seen at each commit are counted against the
transaction records: fewer than announced means an object is missing; changes at a commit that
has no transaction record mean the transaction records have a gap. Both stop the replay. A
wedding restore reads only the segments that can hold the wedding, so it cannot count.

**Keys.** A full-table restore keys rows by the Postgres text of their key columns, as part
lines hold it (`archive.part.pg_key_text`), so changes and snapshot-part lines meet without parsing
(a numeric key archived as both `1.5` and `1.50` would not match, and the primary key added
after loading refuses the duplicate rather than keep it silently); a wedding restore keys by
the canonical JSON the sinks use, which the segment headers' filters of deleted keys hold. An
update that changes the primary key (its before image holds the old key) also deletes the old
key.
"""


from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastavro import schemaless_writer

from replicator.archive.layout import (
    TRANSACTIONS,
    segments_prefix,
)
from replicator.archive.merge import Merger
from replicator.archive.part import PartCorrupt, pg_key_text, unescape
from replicator.archive.reader import Archive, ReplayFailed, Timeline, nearest_hint
from replicator.archive.render import copy_escape
from replicator.archive.segment import SegmentHeader
from replicator.archive.snapshot import SnapshotPart
from replicator.archive.timeline import LsnColumn
from replicator.events import ChangeEvent, Op
from replicator.position import Lsn
from replicator.replay.table import (
    RAW_BATCH,
    Emit,
    EmitCopy,
    EmitLines,
    JobObject,
    ObjectKind,
    Output,
    Remover,
    TableJob,
    TableStats,
    apply_key_changes,
    base_row_event,
    emit_states,
    job_objects,
    line_event,
    mark_seen,
    record_event,
)
from replicator.transport.avro import CONTENT_DIGEST, EventCodec, digest_text

__all__ = ["restore_table"]


async def restore_table(archive: Archive, job: TableJob, emit: Emit,
                        progress: Callable[[int], None] | None = None,
                        emit_copy: EmitCopy | None = None,
                        emit_lines: EmitLines | None = None,
                        remover: Remover | None = None) -> TableStats:
    """Write the rows of *job*'s table as of `job.target` through *emit*, in batches of
    value lists ordered as `job.schema.columns` (module docstring). With *emit_copy*, rows of
    snapshot parts whose columns are the schema's go through it as COPY text, unparsed. With
    *emit_lines*, every row goes through it instead, with its key text and wedding
    (compaction). With *remover*, a compaction snapshot is loaded while the changes are
    read, and the rows of changed keys removed after. A wedding restore is
    `replay.wedding.restore_wedding`."""
    if job.wedding is not None:
        raise ValueError("restore_table restores whole tables: a wedding restore is "
                         "replay.wedding.restore_wedding")
    stats = TableStats(job.table)
    objects = list(job_objects(job))
    parts = [o.key for o in objects if o.kind is ObjectKind.BASE_PART]
    snapshots = [o.key for o in objects if o.kind is ObjectKind.SNAPSHOT]
    out = Output(job, stats, emit, emit_copy, emit_lines, progress)
    # With a target that can take the base first and drop the rows of changed keys after
    # (`remover`), a compaction snapshot's rows are loaded while pass 1 runs: the target
    # database works while this process decodes the changes.
    early = bool(snapshots) and remover is not None and emit_lines is None
    changes = await _gather_changes(archive, job, objects, stats,
                                    _load_snapshots(archive, job, snapshots, out) if early
                                    else None)
    stats.changed_keys = len(changes.changed)
    if early:
        assert remover is not None
        await _remove_changed(job, changes, remover, stats)
    await _write_deferred(archive, job, changes, out)
    for key in parts:
        await _write_part(archive, job, key, changes, out)
    for key in snapshots if not early else ():
        stats.segments += 1
        snapshot = await archive.snapshot(key)
        if changes.truncated is not None:  # a truncate after the base empties the table
            continue
        try:
            await _snapshot_rows(archive, job, snapshot, changes.changed, changes.merger, out)
        except PartCorrupt as exc:
            raise archive.snapshot_failed(key, exc) from None

    if job.check_counts:  # before any conclusion is drawn from the versions found
        _check_counts(archive.timeline, job, changes.seen, changes.commits)
    if job.check_digests:
        stats.digests_checked = _check_digests(archive.timeline, job, changes)
    apply_key_changes(changes.merger, changes.key_changes, job.table)
    await emit_states(changes.merger, job, out, archive.timeline)
    return stats


async def _gather_changes(archive: Archive, job: TableJob, objects: Sequence[JobObject],
                          stats: TableStats, alongside: Coroutine[Any, Any, None] | None
                          ) -> _Changes:
    """Pass 1 in a thread, with *alongside* (the early load of a compaction snapshot) on
    this loop meanwhile; either one's failure cancels the other."""
    loop = asyncio.get_running_loop()

    def fetch(key: str) -> bytes:  # from the pass's thread, through this loop
        return asyncio.run_coroutine_threadsafe(archive.stored(key), loop).result()

    pending = asyncio.create_task(alongside) if alongside is not None else None
    try:
        changes = await asyncio.to_thread(_pass1, archive, job, objects, fetch, stats)
    except BaseException:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        raise
    if pending is not None:
        await pending
    return changes


async def _remove_changed(job: TableJob, changes: _Changes, remover: Remover,
                          stats: TableStats) -> None:
    """After an early load: drop the loaded rows that the changes replace (all of them after
    a truncate); the removed rows join the merger as the older versions."""
    if changes.truncated is not None:  # a truncate after the base empties the table
        await remover.remove_all()
        stats.rows -= stats.base_rows
        stats.base_rows = 0
    elif changes.changed:
        removed = await remover.remove_keys(sorted(changes.changed))
        stats.rows -= len(removed)
        stats.base_rows -= len(removed)
        for texts in removed:
            event, text_key = base_row_event(job, texts)
            changes.merger.add(event, (job.table, text_key))


async def _write_deferred(archive: Archive, job: TableJob, changes: _Changes, out: Output
                          ) -> None:
    """Pass 2 over the segments that hold only base rows: each row goes out, or joins the
    merger when its key changed."""
    base, seen, changed = int(job.base), changes.seen, changes.changed
    for key in changes.deferred:
        _, records = await archive.segment(key)
        for record in records:
            seq = record["source"]["seq"]
            if not mark_seen(seen, base, seq):
                out.stats.duplicates += 1
                continue
            if changes.truncated is not None and (base, seq) < changes.truncated:
                continue
            if changed:
                text_key = pg_key_text(record["key"])
                if copy_escape(text_key) in changed:
                    changes.merger.add(record_event(record, python_key=False),
                                       (job.table, text_key))
                    continue
            await out.record(record)
    await out.flush()


async def _write_part(archive: Archive, job: TableJob, key: str, changes: _Changes,
                      out: Output) -> None:
    """Pass 2 over a base snapshot part: its lines go out as COPY text, less those whose key
    changed (they join the merger)."""
    base, seen, changed = int(job.base), changes.seen, changes.changed
    out.stats.segments += 1
    part, batches = await archive.part(key)
    for lines in batches:
        rows: list[str] = []
        keys: list[str] = []
        weddings: list[str] = []
        for line in lines:
            seq_text, wedding_text, key_field, row = line.split("\t", 3)
            seq = int(seq_text)
            if not mark_seen(seen, base, seq):
                out.stats.duplicates += 1
                continue
            if changes.truncated is not None and (base, seq) < changes.truncated:
                continue
            if key_field in changed:
                changes.merger.add(line_event(job, part, seq, wedding_text, key_field, row),
                                   (job.table, unescape(key_field)))
                continue
            rows.append(row)
            if out.emit_lines is not None:
                keys.append(key_field)
                weddings.append(wedding_text)
        archive.check_memory(job.table, len(changed))
        await out.lines(rows, part.columns, keys, weddings, int(part.lsn))


@dataclass(slots=True)
class _Changes:
    """What pass 1 found: every change after the base, merged; the changed keys."""

    merger: Merger = field(default_factory=Merger)
    # The changed keys, as part lines hold them (`archive.part.pg_key_text`, COPY-escaped).
    changed: set[str] = field(default_factory=set)
    seen: dict[int, bytearray] = field(default_factory=dict)
    commits: set[int] = field(default_factory=set)  # commit LSNs with changes
    truncated: tuple[int, int] | None = None
    # check_digests: commit LSN -> sum of the changes' content digests read; and the commits
    # with a change in a segment of another envelope schema (not re-encodable: not checked)
    digests: dict[int, int] = field(default_factory=dict)
    unchecked: set[int] = field(default_factory=set)
    deferred: list[str] = field(default_factory=list)  # segments of base rows only
    key_changes: list[Mapping[str, Any]] = field(default_factory=list)


def _pass1(archive: Archive, job: TableJob, objects: Sequence[JobObject],
           fetch: Callable[[str], bytes], stats: TableStats) -> _Changes:
    """Pass 1 (module docstring), in a thread: *fetch* gets an object's stored bytes."""
    found = _Changes(job.new_merger())
    low = job.first_change
    for obj in objects:
        if obj.kind is ObjectKind.PART:  # an on-demand snapshot: versions like changes
            stats.segments += 1
            for event, text_key in _part_events(archive, obj.key, fetch(obj.key), job,
                                                found.seen):
                found.merger.add(event, (job.table, text_key))
                found.changed.add(copy_escape(text_key))
        elif obj.kind is ObjectKind.SEGMENT:
            header, records = archive.open_segment(obj.key, fetch(obj.key),
                                                   low - 1 if obj.first < low else None)
            stats.segments += 1
            if (not job.holds_base and header.first.commit_lsn == header.last.commit_lsn
                    == int(job.base) and set(header.ops) == {Op.READ.value}):
                found.deferred.append(obj.key)
                continue
            digest = (_digester(header, archive.timeline.digests.get(job.table) or {})
                      if job.check_digests else None)
            _take_changes(job, records, digest, found, stats)
            archive.check_memory(job.table, len(found.changed))
    return found


def _take_changes(job: TableJob, records: Iterable[Mapping[str, Any]],
                  digest: Callable[[Mapping[str, Any]], int] | None, found: _Changes,
                  stats: TableStats) -> None:
    """One segment's records between the base and the target, into *found*."""
    low, target = job.first_change, int(job.target)
    merger, changed, seen = found.merger, found.changed, found.seen
    for record in records:
        source = record["source"]
        lsn = source["lsn"]
        if lsn < low or lsn > target:
            continue
        if not mark_seen(seen, lsn, source["seq"]):
            stats.duplicates += 1
            continue
        op = record["op"]
        if op != "r":
            found.commits.add(lsn)
            stats.changes += 1
            if job.check_digests:
                if digest is None:
                    found.unchecked.add(lsn)
                else:
                    found.digests[lsn] = found.digests.get(lsn, 0) + digest(record)
        if op == "t":
            position = (lsn, source["seq"])
            if source["origin"] is None and (found.truncated is None
                                             or position > found.truncated):
                found.truncated = position
            merger.add(record_event(record))
            continue
        text_key = pg_key_text(record["key"])
        changed.add(copy_escape(text_key))
        before = record["before"]
        if op == "u" and before is not None:
            old_key = pg_key_text({name: before.get(name) for name in record["key"]})
            if old_key != text_key:
                # A key change: applied once every older version is in (`apply_key_changes`).
                found.key_changes.append(record)
                changed.add(copy_escape(old_key))
                continue
        merger.add(record_event(record, python_key=False), (job.table, text_key))


async def _load_snapshots(archive: Archive, job: TableJob, keys: Sequence[str], out: Output
                          ) -> None:
    """Every row of the base's compaction snapshot parts, as they are."""
    for key in keys:
        out.stats.segments += 1
        snapshot = await archive.snapshot(key)
        try:
            if out.plain(snapshot.header.columns, snapshot.header.lsn) \
                    and out.emit_copy is not None:
                for chunk in snapshot.row_chunks():
                    await out.raw(chunk, chunk.count(b"\n"))
            else:
                rows = snapshot.row_lines()
                for low in range(0, len(rows), 50_000):
                    await out.lines(rows[low:low + 50_000], snapshot.header.columns, [], [],
                                    snapshot.header.lsn)
        except PartCorrupt as exc:
            raise archive.snapshot_failed(key, exc) from None
        archive.check_memory(job.table, 0)


async def _snapshot_rows(archive: Archive, job: TableJob, snapshot: SnapshotPart,
                         changed: set[str], merger: Merger, out: Output) -> None:
    """A compaction snapshot part's rows: streamed as they are when none of its keys changed
    after it (and the target takes COPY text); else the rows whose key changed join the
    merger as the older version, found by set operations on the keys frame, and the others
    go out in slices."""
    header = snapshot.header
    raw = (out.emit_lines is None and out.emit_copy is not None
           and out.plain(header.columns, header.lsn))
    keys = snapshot.key_lines() if changed or not raw else []
    hits = changed.intersection(keys) if changed else set()
    if raw and not hits:
        del keys
        for chunk in snapshot.row_chunks():
            await out.raw(chunk, chunk.count(b"\n"))
            archive.check_memory(job.table, len(changed))
        return
    if raw:  # bytes in, bytes out: only the rows whose key changed are parsed
        lines = snapshot.row_bytes()
        weddings = snapshot.wedding_lines()
        where = dict(zip(keys, range(len(keys)), strict=True))
        drop = sorted(where[key] for key in hits)
        del where
        for n in drop:
            merger.add(line_event(job, header, n, weddings[n], keys[n], lines[n].decode()),
                       (job.table, unescape(keys[n])))
        del keys, weddings
        archive.check_memory(job.table, len(changed))
        pieces: list[bytes] = []
        count = size = start = 0
        for stop in [*drop, len(lines)]:
            if stop > start:
                piece = b"\n".join(lines[start:stop])
                pieces.append(piece)
                count += stop - start
                size += len(piece)
                if size >= RAW_BATCH:
                    await out.raw(b"\n".join(pieces) + b"\n", count)
                    pieces, count, size = [], 0, 0
            start = stop + 1
        if pieces:
            await out.raw(b"\n".join(pieces) + b"\n", count)
        return
    rows = snapshot.row_lines()
    weddings = snapshot.wedding_lines()
    if hits:
        where = dict(zip(keys, range(len(keys)), strict=True))
        drop = sorted(where[key] for key in hits)
        del where
        for n in drop:
            merger.add(line_event(job, header, n, weddings[n], keys[n], rows[n]),
                       (job.table, unescape(keys[n])))
    else:
        drop = []
    archive.check_memory(job.table, len(changed))
    if drop:  # the rows between the dropped ones, by slices (no per-row work)
        kept: tuple[list[str], list[str], list[str]] = ([], [], [])
        start = 0
        for stop in [*drop, len(rows)]:
            for whole, part in zip((rows, keys, weddings), kept, strict=True):
                part.extend(whole[start:stop])
            start = stop + 1
        rows, keys, weddings = kept
    for low in range(0, len(rows), 50_000):
        await out.lines(rows[low:low + 50_000], header.columns, keys[low:low + 50_000],
                        weddings[low:low + 50_000], header.lsn)


def _digester(header: SegmentHeader, wanted: Mapping[int, str]
              ) -> Callable[[Mapping[str, Any]], int] | None:
    """How to recompute the content digest of a record of a segment: re-encoded with the
    envelope schema it was written with, when that is ours (None otherwise), `ts_ms` as 0
    when the transaction record's digest (in *wanted*, by commit LSN) is of that kind
    (`avro.CONTENT_DIGEST`)."""
    codec = _codec()
    if header.schema_fingerprint != codec.event_fingerprint.hex():
        return None
    schema = codec.parsed_event_schema

    def digest(record: Mapping[str, Any]) -> int:
        body = io.BytesIO()
        if wanted.get(record["source"]["lsn"], CONTENT_DIGEST).startswith(CONTENT_DIGEST):
            record = {**record, "ts_ms": 0}
        schemaless_writer(body, schema, record)
        return int.from_bytes(hashlib.blake2b(body.getbuffer(), digest_size=16).digest(), "big")

    return digest


@functools.cache
def _codec() -> EventCodec:
    return EventCodec()


def _check_digests(timeline: Timeline, job: TableJob, found: _Changes) -> int:
    """Compare each transaction's content digest, recomputed from the changes read, with the
    one the capture recorded; how many matched. A difference means an archived change is not
    the one the capture sent."""
    low, target = job.first_change, int(job.target)
    checked = 0
    digests = timeline.digests.get(job.table)
    for lsn, want in digests.between(low, target) if digests is not None else ():
        if lsn in found.unchecked:
            continue
        got = digest_text(found.digests.get(lsn, 0), content=want.startswith(CONTENT_DIGEST))
        if got != want:
            nearest = timeline.before(lsn)
            raise ReplayFailed(
                f"{job.table}: the changes archived for the transaction committed at "
                f"{Lsn(lsn)} are not the ones the capture sent (content digest {got}, the "
                f"transaction record says {want}): a segment of {segments_prefix(job.table)} "
                f"covering {Lsn(lsn).hex_key()} was altered{nearest_hint(nearest)}",
                object=segments_prefix(job.table), nearest=nearest)
        checked += 1
    return checked


def _check_counts(timeline: Timeline, job: TableJob, seen: Mapping[int, bytearray],
                  change_commits: set[int]) -> None:
    announced = timeline.counts.get(job.table) or LsnColumn()
    low, target = job.first_change, int(job.target)
    for lsn, want in announced.between(low, target):
        bits = seen.get(lsn)
        got = int.from_bytes(bits, "little").bit_count() if bits else 0
        if got < want:
            nearest = timeline.before(lsn)
            raise ReplayFailed(
                f"{job.table}: the transaction committed at {lsn and Lsn(lsn)} announced "
                f"{want} change(s) and the archive holds {got}: a segment of "
                f"{segments_prefix(job.table)} covering {Lsn(lsn).hex_key()} is missing"
                f"{nearest_hint(nearest)}", object=segments_prefix(job.table), nearest=nearest)
    for lsn in sorted(change_commits):
        if lsn not in announced:
            nearest = timeline.before(lsn)
            raise ReplayFailed(
                f"{job.table}: changes committed at {Lsn(lsn)} have no transaction record: "
                f"the transaction records ({TRANSACTIONS}) have a gap there"
                f"{nearest_hint(nearest)}", object=TRANSACTIONS, nearest=nearest)


def _part_events(archive: Archive, key: str, data: bytes, job: TableJob,
                 seen: dict[int, bytearray]) -> Iterator[tuple[ChangeEvent, str]]:
    """The rows of an on-demand snapshot's part, as versions at their position."""
    header, batches = archive.open_part(key, data)
    for lines in batches:
        for line in lines:
            seq_text, wedding, key_field, row = line.split("\t", 3)
            seq = int(seq_text)
            if not mark_seen(seen, int(header.lsn), seq):
                continue
            event = line_event(job, header, seq, wedding, key_field, row)
            yield event, unescape(key_field)
