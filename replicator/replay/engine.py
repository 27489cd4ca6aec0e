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

**From a compaction snapshot** (`sink.snapshot`, base kind "snapshot"): the snapshot holds
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
lines hold it (`sink.part.key_text`), so changes and snapshot-part lines meet without parsing
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastavro import schemaless_writer

from replicator.archive.layout import (
    TRANSACTIONS,
    is_part_key,
    is_snapshot_key,
    parse_part_key,
    parse_segment_key,
    segments_prefix,
)
from replicator.archive.merge import Merger, Tombstone
from replicator.archive.part import PartCorrupt, unescape
from replicator.archive.part import key_text as part_key_text
from replicator.archive.reader import Archive, ReplayFailed, Timeline, current_rss_mb, nearest_hint
from replicator.archive.render import copy_escape
from replicator.archive.segment import SegmentHeader
from replicator.archive.snapshot import SnapshotPart
from replicator.events import ChangeEvent, Op
from replicator.position import Lsn
from replicator.replay.table import (
    RAW_BATCH,
    Emit,
    EmitCopy,
    EmitLines,
    Output,
    Remover,
    TableJob,
    TableSchema,
    TableStats,
    base_row_event,
    line_event,
    mark_seen,
    merge_text_key,
    record_event,
)
from replicator.transport.avro import EventCodec, digest_text

__all__ = ["Archive", "ReplayFailed", "TableJob", "TableSchema", "TableStats", "Timeline",
           "current_rss_mb", "restore_table"]


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
    read, and the rows of changed keys removed after."""
    if job.wedding is not None:
        from replicator.replay.wedding import restore_wedding

        return await restore_wedding(archive, job, emit, progress)
    stats = TableStats(job.table)
    base = int(job.base)
    parts: list[str] = []  # the base's snapshot parts (rows-*.part at the base LSN)
    snapshots: list[str] = []  # the base's compaction snapshot parts
    for key in job.segments:
        if is_snapshot_key(key):
            snapshots.append(key)
        elif is_part_key(key) and int(parse_part_key(key).lsn) == base and not job.compacted:
            parts.append(key)
    out = Output(job, stats, emit, emit_copy, emit_lines, progress)
    loop = asyncio.get_running_loop()

    def fetch(key: str) -> bytes:  # from the pass's thread, through this loop
        return asyncio.run_coroutine_threadsafe(archive.stored(key), loop).result()

    # Pass 1 runs in a thread. With a target that can take the base first and drop the
    # rows of changed keys after (`remover`), a compaction snapshot's rows are loaded
    # meanwhile: the target database works while this process decodes the changes.
    early = bool(snapshots) and remover is not None and emit_lines is None
    pending = asyncio.create_task(_load_snapshots(archive, job, snapshots, out)) if early else None
    try:
        changes = await asyncio.to_thread(_pass1, archive, job, fetch, stats)
    except BaseException:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        raise
    if pending is not None:
        await pending
    merger, changed, seen = changes.merger, changes.changed, changes.seen
    truncated, key_changes = changes.truncated, changes.key_changes
    stats.changed_keys = len(changed)
    if early:
        assert remover is not None
        if truncated is not None:  # a truncate after the base empties the table
            await remover.remove_all()
            stats.rows -= stats.base_rows
            stats.base_rows = 0
        elif changed:
            removed = await remover.remove_keys(sorted(changed))
            stats.rows -= len(removed)
            stats.base_rows -= len(removed)
            for texts in removed:
                event, text_key = base_row_event(job, texts)
                merger.add(event, (job.table, text_key))

    for key in changes.deferred:
        _, records = await archive.segment(key)
        for record in records:
            seq = record["source"]["seq"]
            if not mark_seen(seen, base, seq):
                stats.duplicates += 1
                continue
            if truncated is not None and (base, seq) < truncated:
                continue
            if changed:
                text_key = part_key_text(record["key"])
                if copy_escape(text_key) in changed:
                    merger.add(record_event(record, python_key=False), (job.table, text_key))
                    continue
            await out.record(record)
    await out.flush()

    for key in parts:
        stats.segments += 1
        part, batches = await archive.part(key)
        for lines in batches:
            rows: list[str] = []
            keys: list[str] = []
            weddings: list[str] = []
            for line in lines:
                seq_text, wedding_text, key_field, row = line.split("\t", 3)
                seq = int(seq_text)
                if not mark_seen(seen, base, seq):
                    stats.duplicates += 1
                    continue
                if truncated is not None and (base, seq) < truncated:
                    continue
                if key_field in changed:
                    merger.add(line_event(job, part, seq, wedding_text, key_field, row),
                               (job.table, unescape(key_field)))
                    continue
                rows.append(row)
                if emit_lines is not None:
                    keys.append(key_field)
                    weddings.append(wedding_text)
            archive.check_memory(job.table, len(changed))
            await out.lines(rows, part.columns, keys, weddings)

    for key in snapshots if not early else ():
        stats.segments += 1
        snapshot = await archive.snapshot(key)
        if truncated is not None:  # a truncate after the base empties the table
            continue
        try:
            await _snapshot_rows(archive, job, snapshot, changed, merger, out)
        except PartCorrupt as exc:
            raise archive.snapshot_failed(key, exc) from None

    if job.check_counts:  # before any conclusion is drawn from the versions found
        _check_counts(archive.timeline, job, seen, changes.commits)
    if job.check_digests:
        stats.digests_checked = _check_digests(archive.timeline, job, changes)

    apply_key_changes(merger, key_changes, job.table)
    await emit_states(merger, job, out, archive.timeline)
    return stats


@dataclass(slots=True)
class _Changes:
    """What pass 1 found: every change after the base, merged; the changed keys."""

    merger: Merger = field(default_factory=Merger)
    # The changed keys, as part lines hold them (`sink.part.key_text`, COPY-escaped).
    changed: set[str] = field(default_factory=set)
    seen: dict[int, bytearray] = field(default_factory=dict)
    commits: set[int] = field(default_factory=set)  # commit LSNs with changes
    truncated: tuple[int, int] | None = None
    # check_digests: commit LSN -> sum of the changes' content digests read; and the commits
    # with a change in a segment of another envelope schema (not re-encodable: not checked)
    digests: dict[int, int] = field(default_factory=dict)
    unchecked: set[int] = field(default_factory=set)
    deferred: list[str] = field(default_factory=list)  # segments of base rows only
    key_changes: list[dict[str, Any]] = field(default_factory=list)


def _pass1(archive: Archive, job: TableJob, fetch: Callable[[str], bytes], stats: TableStats
           ) -> _Changes:
    """Pass 1 (module docstring), in a thread: *fetch* gets an object's stored bytes."""
    found = _Changes()
    merger, changed, seen = found.merger, found.changed, found.seen
    base, target, low = int(job.base), int(job.target), job.first_change
    for key in job.segments:
        if is_snapshot_key(key):
            continue
        if is_part_key(key):
            lsn = int(parse_part_key(key).lsn)
            if low <= lsn <= target and not (lsn == base and not job.compacted):
                # an on-demand snapshot: versions like changes
                stats.segments += 1
                for event, text_key in _part_events(archive, key, fetch(key), job, seen):
                    merger.add(event, (job.table, text_key))
                    changed.add(copy_escape(text_key))
            continue
        parsed = parse_segment_key(key)
        if parsed.last < low or parsed.first > target:
            continue
        header, records = archive.open_segment(key, fetch(key),
                                               low - 1 if parsed.first < low else None)
        stats.segments += 1
        digest = _digester(header) if job.check_digests else None
        if (not job.compacted and header.first.commit_lsn == header.last.commit_lsn == base
                and set(header.ops) == {Op.READ.value}):
            found.deferred.append(key)
            continue
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
            text_key = part_key_text(record["key"])
            changed.add(copy_escape(text_key))
            before = record["before"]
            if op == "u" and before is not None:
                old_key = part_key_text({name: before.get(name) for name in record["key"]})
                if old_key != text_key:
                    # A key change: applied once every older version is in (below).
                    found.key_changes.append(record)
                    changed.add(copy_escape(old_key))
                    continue
            merger.add(record_event(record, python_key=False), (job.table, text_key))
        archive.check_memory(job.table, len(changed))
    return found


async def _load_snapshots(archive: Archive, job: TableJob, keys: Sequence[str], out: Output
                          ) -> None:
    """Every row of the base's compaction snapshot parts, as they are."""
    for key in keys:
        out.stats.segments += 1
        snapshot = await archive.snapshot(key)
        try:
            if snapshot.header.columns == out.columns and out.emit_copy is not None:
                for chunk in snapshot.row_chunks():
                    await out.raw(chunk, chunk.count(b"\n"))
            else:
                rows = snapshot.row_lines()
                for low in range(0, len(rows), 50_000):
                    await out.lines(rows[low:low + 50_000], snapshot.header.columns, [], [])
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
    raw = out.emit_lines is None and out.emit_copy is not None and header.columns == out.columns
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
                        weddings[low:low + 50_000])


def _digester(header: SegmentHeader) -> Callable[[Mapping[str, Any]], int] | None:
    """How to recompute the content digest of a record of a segment: re-encoded with the
    envelope schema it was written with, when that is ours (None otherwise)."""
    codec = _codec()
    if header.schema_fingerprint != codec.event_fingerprint.hex():
        return None
    schema = codec.parsed_event_schema

    def digest(record: Mapping[str, Any]) -> int:
        body = io.BytesIO()
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
    for lsn, want in sorted(timeline.digests.get(job.table, {}).items()):
        if lsn < low or lsn > target or lsn in found.unchecked:
            continue
        got = digest_text(found.digests.get(lsn, 0))
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
    announced = timeline.counts.get(job.table, {})
    low, target = job.first_change, int(job.target)
    for lsn in sorted(announced):
        if lsn < low or lsn > target:
            continue
        bits = seen.get(lsn)
        got = int.from_bytes(bits, "little").bit_count() if bits else 0
        want = announced[lsn]
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


def apply_key_changes(merger: Merger, key_changes: list[dict[str, Any]],
                       text_keys: str | None = None) -> None:
    """An update that moves a row to a new key deletes the old key, and takes along the old
    row's values of the columns it left unchanged (TOAST), in position order (chains).
    *text_keys*: the table, when the merger is keyed by `_text_key`."""
    key_changes.sort(key=lambda r: (r["source"]["lsn"], r["source"]["seq"]))
    python_key = text_keys is None
    for record in key_changes:
        before = record["before"]
        old = {name: before.get(name) for name in record["key"]}
        gone = record_event(record, Op.DELETE, old, python_key=python_key)
        moved = record_event(record, python_key=python_key)
        gone_key = moved_key = None
        if text_keys is not None:
            gone_key = merge_text_key(text_keys, old)
            moved_key = merge_text_key(text_keys, record["key"])
        if moved.unchanged:
            taken = merger.values_before(gone, moved.position, moved.unchanged, gone_key)
            moved.after = {**(moved.after or {}), **taken}
            moved.unchanged = tuple(c for c in moved.unchanged if c not in taken)
        merger.add(gone, gone_key)
        merger.add(moved, moved_key)


async def emit_states(merger: Merger, job: TableJob, out: Output, timeline: Timeline
                       ) -> None:
    for key, state in merger.state().items():
        if isinstance(state, Tombstone):
            continue
        if job.wedding is not None and state.wedding_id != job.wedding:
            continue
        if state.unchanged:
            raise ReplayFailed(
                f"{job.table}: the row with key {dict(state.key)} at {state.position} has "
                f"unchanged column(s) {', '.join(state.unchanged)} and no earlier version in "
                f"the archive to take them from{nearest_hint(timeline.before(job.base))}")
        await out.state(state.after or {}, state.wedding_id, key[1])
    await out.flush(base=False)


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
