"""One table of a restore: its archived schema, its job, its figures, and where its rows go.

`Output` sends restored rows to the target as value batches, as COPY text (rows already in the
schema's column order, unparsed), or, for compaction, as COPY text with each row's key text and
wedding id. The helpers here turn archived records and snapshot lines into change events.

A column an archived row image lacks (a change record's `after` map, or a part or snapshot
written with fewer columns: the row was written before the column was added) is restored as
the column's missing value from the schema document (`TableSchema.absent`, as `PgText`), NULL
when it has none; a column present as NULL stays NULL. Every output goes through here, so
databases, files, verify's hashes and compaction snapshots all get the filled value.
"""


from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from replicator.archive.layout import (
    is_part_key,
    is_snapshot_key,
    parse_part_key,
    parse_segment_key,
)
from replicator.archive.merge import ConflictPolicy, Merger, Tombstone
from replicator.archive.part import (
    KEY_SEPARATOR,
    PartHeader,
    key_values,
    pg_key_text,
    row_fields,
    unescape,
)
from replicator.archive.reader import ReplayFailed, Timeline, nearest_hint
from replicator.archive.render import PgText, copy_escape, copy_line
from replicator.archive.segment import (
    SegmentHeader,
)
from replicator.archive.snapshot import (
    SnapshotHeader,
)
from replicator.events import ChangeEvent, Op, Tier, split_qualified
from replicator.keys import canonical_key
from replicator.position import ChangePosition, Lsn, mark_seq
from replicator.transport.avro import event_from_dict

__all__ = ["Column", "JobObject", "ObjectKind", "Output", "Remover", "TableJob", "TableSchema",
           "TableStats", "apply_key_changes", "emit_states", "job_objects"]

Rows = list[list[Any]]
Emit = Callable[[Rows], Awaitable[None]]
EmitCopy = Callable[[str | bytes, int], Awaitable[None]]  # COPY text lines, and how many
# Rows as COPY text lines, their key texts and wedding ids (COPY-escaped), no newlines: what
# a compaction snapshot holds (`archive.snapshot`).
EmitLines = Callable[[list[str], list[str], list[str]], Awaitable[None]]
BATCH_ROWS = 2000
RAW_BATCH = 8 << 20  # bytes of COPY text per write from a compaction snapshot


# --- one table -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    not_null: bool
    default: str | None = None  # the default expression (`pg_get_expr`), as of the schema


@dataclass(frozen=True, slots=True)
class TableSchema:
    """A table as archived under `schemas/<table>/<lsn>.json` (documents written before the
    capture described DDL lack `default`, `missing`, `dropped`, `resnapshot` and the rest:
    they read as no default known, no missing values, not dropped, not rewritten)."""

    table: str  # schema.table
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    lsn: Lsn
    # column -> the Postgres text of the value rows written before the column existed read
    # as (`attmissingval`); only the columns that have one (the others read as NULL)
    missing: Mapping[str, str] = field(default_factory=dict)
    # column -> the names it had before (oldest first): rows archived before a rename carry
    # the old name (`previous_names` in the document)
    previous: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # column -> its default expression, where one is set
    defaults: Mapping[str, str] = field(default_factory=dict)
    defaults_known: bool = False  # the document says each column's default (or its absence)
    dropped: bool = False  # the table was dropped (or renamed away) at `lsn`
    resnapshot: bool = False  # the DDL at `lsn` rewrote it: exact again from a re-snapshot
    renamed_to: str | None = None
    renamed_from: str | None = None
    command: str | None = None  # the DDL's command tag
    # column -> the LSN its present incarnation was added at, for a column dropped and added
    # again under the same name (`reborn_columns`): a row image older than that holds the
    # old column's value, which the present column never had
    reborn: Mapping[str, Lsn] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TableSchema:
        columns = tuple(Column(c["name"], c["type"], bool(c.get("not_null")),
                               c.get("default")) for c in doc.get("columns") or ())
        raw = doc.get("columns") or ()
        missing = {c["name"]: str(c["missing"]) for c in raw if c.get("missing") is not None}
        defaults = {c.name: c.default for c in columns if c.default is not None}
        previous = {c["name"]: tuple(c["previous_names"]) for c in raw
                    if c.get("previous_names")}
        return cls(doc["table"], columns, tuple(doc.get("primary_key") or ()), Lsn(doc["lsn"]),
                   missing=MappingProxyType(missing), defaults=MappingProxyType(defaults),
                   previous=MappingProxyType(previous),
                   defaults_known=bool(raw) and all("default" in c for c in raw),
                   dropped=bool(doc.get("dropped")), resnapshot=bool(doc.get("resnapshot")),
                   renamed_to=doc.get("renamed_to"), renamed_from=doc.get("renamed_from"),
                   command=doc.get("command"))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def absent(self) -> tuple[PgText | None, ...]:
        """Per column, in order: the value of a row image that lacks the column (written
        before it was added): its missing value, or NULL."""
        missing = self.missing
        return tuple(PgText(missing[c.name]) if c.name in missing else None
                     for c in self.columns)

    def fill(self, after: Mapping[str, Any]) -> list[Any]:
        """An archived row image's values in column order, the columns it lacks filled with
        their missing value (`absent`); a column present as NULL stays NULL."""
        if self.previous:
            out = []
            for c, m in zip(self.names, self.absent, strict=True):
                for name in (c, *reversed(self.previous.get(c, ()))):
                    if name in after:
                        out.append(after[name])
                        break
                else:
                    out.append(m)
            return out
        if not self.missing:
            return [after.get(c) for c in self.names]
        return [after.get(c, m) for c, m in zip(self.names, self.absent, strict=True)]

    def stale(self, lsn: int) -> list[int]:
        """The indexes of the columns whose value in a row image written at *lsn* belongs to
        an older column of the same name (`reborn`): they read as `absent` instead."""
        if not self.reborn:
            return []
        return [n for n, c in enumerate(self.names) if lsn < self.reborn.get(c, 0)]

    def index_in(self, columns: Sequence[str]) -> list[int]:
        """Where each of the schema's columns is in *columns* (by its name or, after a
        rename, an earlier one), -1 where it is not."""
        out = []
        for c in self.names:
            found = [columns.index(n) for n in (c, *reversed(self.previous.get(c, ())))
                     if n in columns]
            out.append(found[0] if found else -1)
        return out


@dataclass(frozen=True, slots=True)
class TableJob:
    table: str
    schema: TableSchema
    segments: tuple[str, ...]
    base: Lsn  # the LSN of the base snapshot's rows
    target: Lsn
    wedding: str | None = None
    check_counts: bool = True
    # A restore of several weddings at once (`tiered`): their ids; `wedding` then only names
    # them in messages.
    weddings: frozenset[str] | None = None
    # Recompute each transaction's content digest from the archived changes and compare it
    # with the capture's (verify: it re-encodes every change read).
    check_digests: bool = False
    # fetched headers (wedding restores)
    headers: Mapping[str, SegmentHeader | PartHeader | SnapshotHeader] | None = None
    compacted: bool = False  # the base is a compaction snapshot, which holds changes at base
    # The base is an empty table: the table was dropped at `base` and created again after it
    # (nothing at or below `base` is applied: the old table's rows are gone).
    cleared: bool = False
    # The table's conflict rule (`[conflicts]`); None: the latest commit wins across origins.
    policy: ConflictPolicy | None = None

    def new_merger(self) -> Merger:
        """A merger with the table's conflict rule."""
        return Merger(None if self.policy is None else {self.table: self.policy})

    def owns(self, wedding_id: str | None) -> bool:
        """Whether a row of *wedding_id* is one this wedding restore keeps."""
        if self.weddings is not None:
            return wedding_id in self.weddings
        return wedding_id == self.wedding

    def may_hold(self, header: SegmentHeader | PartHeader | SnapshotHeader) -> bool:
        """False only when *header* proves no row of the restore's wedding(s) is inside."""
        if self.weddings is None:
            assert self.wedding is not None
            return header.may_hold_wedding(self.wedding)
        ids = header.wedding_ids
        if ids is not None:
            return not self.weddings.isdisjoint(ids)
        return any(header.may_hold_wedding(w) for w in self.weddings)

    @property
    def holds_base(self) -> bool:
        """The base stands for every change at its LSN (a compaction snapshot, a drop)."""
        return self.compacted or self.cleared

    @property
    def first_change(self) -> int:
        """The lowest commit LSN whose changes the base does not hold."""
        return int(self.base) + 1 if self.holds_base else int(self.base)


@dataclass(slots=True)
class TableStats:
    table: str
    rows: int = 0
    base_rows: int = 0
    changes: int = 0
    changed_keys: int = 0
    duplicates: int = 0
    segments: int = 0
    segments_skipped: int = 0  # passed over because their header proved them irrelevant
    digests_checked: int = 0  # transactions whose content digest matched (check_digests)


class ObjectKind(enum.Enum):
    """What a planned object is to a restore."""

    SNAPSHOT = "snapshot"  # a part of the base's compaction snapshot
    BASE_PART = "base part"  # a part of the capture snapshot the table starts from
    PART = "part"  # a part of a later (on-demand) capture snapshot: versions like changes
    SEGMENT = "segment"  # changes (and snapshot rows that did not fit a part)


@dataclass(frozen=True, slots=True)
class JobObject:
    key: str
    kind: ObjectKind
    first: Lsn  # the lowest and highest commit LSN its name gives
    last: Lsn


def job_objects(job: TableJob) -> Iterator[JobObject]:
    """The objects of *job* in plan order, each with its kind, less the parts and segments
    whose name proves they hold nothing between the base and the target: the one loop over
    the three object kinds that the table and wedding restores share."""
    base, low, target = int(job.base), job.first_change, int(job.target)
    for key in job.segments:
        if is_snapshot_key(key):
            yield JobObject(key, ObjectKind.SNAPSHOT, job.base, job.base)
        elif is_part_key(key):
            lsn = parse_part_key(key).lsn
            if lsn == base and not job.holds_base:
                yield JobObject(key, ObjectKind.BASE_PART, lsn, lsn)
            elif low <= lsn <= target:
                yield JobObject(key, ObjectKind.PART, lsn, lsn)
        else:
            parsed = parse_segment_key(key)
            if parsed.last >= low and parsed.first <= target:
                yield JobObject(key, ObjectKind.SEGMENT, parsed.first, parsed.last)


def mark_seen(seen: dict[int, bytearray], lsn: int, seq: int) -> bool:
    """Record position (lsn, seq) as seen; False when it was seen before."""
    bits = seen.get(lsn)
    if bits is None:
        bits = seen[lsn] = bytearray()
    return mark_seq(bits, seq)


def record_event(record: Mapping[str, Any], op: Op | None = None,
                 key: Mapping[str, Any] | None = None, python_key: bool = True) -> ChangeEvent:
    """An archived change record as the event a restore merges: its values left as archived
    (`archive.render` writes them), its key as Python values (for `merge_key`) or, with
    *python_key* false, as archived (the caller gives the merger its own key)."""
    return event_from_dict(record, python_values=False, python_key=python_key, op=op, key=key)


def merge_text_key(table: str, key: Mapping[str, Any]) -> tuple[str, str]:
    """Replay's merge key: the key columns' Postgres text, as part lines hold it."""
    return table, pg_key_text(key)


class Remover(Protocol):
    """A target that can drop rows it was given (in the same transaction)."""

    async def remove_keys(self, keys: list[str]) -> list[list[str | None]]:
        """Drop the rows whose key text (COPY-escaped `archive.part.pg_key_text`) is one of
        *keys*; their columns' text, in the schema's order (NULL as None)."""
        ...

    async def remove_all(self) -> None: ...


def base_row_event(job: TableJob, texts: Sequence[str | None]) -> tuple[ChangeEvent, str]:
    """A base row the target removed (its columns' text, in the schema's order) as the
    version at the base, and its key text."""
    names = job.schema.names
    after = {n: (None if v is None else PgText(v)) for n, v in zip(names, texts, strict=True)}
    key_texts = [str(after[k]) for k in job.schema.primary_key]
    key = {k: after[k] for k in job.schema.primary_key}
    schema, table = split_qualified(job.table)
    event = ChangeEvent(op=Op.READ, schema=schema, table=table,
                        position=ChangePosition(job.base, 0), commit_ts_us=0, xid=0, key=key,
                        after=after, tier=Tier.LOW)
    return event, KEY_SEPARATOR.join(key_texts)


class Output:
    """Where restored rows go: value batches (*emit*), COPY text (*emit_copy*, for rows
    already in the schema's column order), or COPY text with key texts and wedding ids
    (*emit_lines*)."""

    def __init__(self, job: TableJob, stats: TableStats, emit: Emit,
                 emit_copy: EmitCopy | None, emit_lines: EmitLines | None,
                 progress: Callable[[int], None] | None) -> None:
        self.job, self.stats, self.emit = job, stats, emit
        self.emit_copy, self.emit_lines, self.progress = emit_copy, emit_lines, progress
        self.columns = job.schema.names
        # What a column lacking from a row image (written before it was added) reads as.
        self.absent = job.schema.absent
        self.fill = job.schema.fill
        self.stale = job.schema.stale
        self.batch: Rows = []
        self.keys: list[str] = []
        self.weddings: list[str] = []

    def _count(self, rows: int, base: bool) -> None:
        self.stats.rows += rows
        if base:
            self.stats.base_rows += rows
        if self.progress is not None:
            self.progress(rows)

    def _filled(self, after: Mapping[str, Any], lsn: int) -> list[Any]:
        values = self.fill(after)
        for n in self.stale(lsn):
            values[n] = self.absent[n]
        return values

    def plain(self, columns: Sequence[str], lsn: int) -> bool:
        """Whether base rows written at *lsn* with *columns* are the target's rows as they
        are (no column to reorder, fill or void)."""
        return tuple(columns) == self.columns and not self.stale(lsn)

    async def record(self, record: Mapping[str, Any]) -> None:
        """A base row from a change segment (op `r`)."""
        self.batch.append(self._filled(record["after"], record["source"]["lsn"]))
        if self.emit_lines is not None:
            self.keys.append(copy_escape(pg_key_text(record["key"])))
            self.weddings.append(wedding_field(record["wedding_id"]))
        if len(self.batch) >= BATCH_ROWS:
            await self.flush()

    async def state(self, after: Mapping[str, Any], wedding: str | None, key: str,
                    lsn: int) -> None:
        """A merged row (not a base row), its newest version written at *lsn*."""
        self.batch.append(self._filled(after, lsn))
        if self.emit_lines is not None:
            self.keys.append(copy_escape(key))
            self.weddings.append(wedding_field(wedding))
        if len(self.batch) >= BATCH_ROWS:
            await self.flush(base=False)

    async def flush(self, base: bool = True) -> None:
        batch, self.batch = self.batch, []
        if not batch:
            return
        if self.emit_lines is not None:
            keys, weddings, self.keys, self.weddings = self.keys, self.weddings, [], []
            await self.emit_lines([copy_line(values)[:-1] for values in batch], keys, weddings)
        else:
            await self.emit(batch)
        self._count(len(batch), base)

    async def lines(self, rows: list[str], columns: Sequence[str], keys: list[str],
                    weddings: list[str], lsn: int) -> None:
        """Base rows written at *lsn* as COPY text in *columns*' order (and their key texts
        and weddings, for *emit_lines*)."""
        if not rows:
            return
        if not self.plain(columns, lsn):
            where = self.job.schema.index_in(columns)
            for n in self.stale(lsn):
                where[n] = -1
            absent = self.absent
            if self.emit_lines is not None:
                rows = [copy_line(row_values(row, where, absent))[:-1] for row in rows]
            else:
                await self.emit([row_values(row, where, absent) for row in rows])
                self._count(len(rows), True)
                return
        if self.emit_lines is not None:
            await self.emit_lines(rows, keys, weddings)
        elif self.emit_copy is not None:
            await self.emit_copy("\n".join(rows) + "\n", len(rows))
        else:
            where = list(range(len(columns)))
            await self.emit([row_values(row, where) for row in rows])
        self._count(len(rows), True)

    async def raw(self, chunk: bytes, rows: int) -> None:
        """COPY text straight from a compaction snapshot (*emit_copy* only)."""
        assert self.emit_copy is not None
        await self.emit_copy(chunk, rows)
        self._count(rows, True)


def wedding_field(wedding: str | None) -> str:
    return "\\N" if wedding is None else copy_escape(wedding)


def row_values(row: str, where: Sequence[int],
               absent: Sequence[PgText | None] | None = None) -> list[Any]:
    """A part's COPY text row as values in the schema's column order (`PgText`, or None);
    a column the row lacks (index -1: the part was written before it was added) is its
    value in *absent* (`TableSchema.absent`), NULL without."""
    fields = row_fields(row)
    if absent is None:
        return [None if i < 0 or fields[i] is None else PgText(fields[i]) for i in where]
    return [absent[n] if i < 0 else None if fields[i] is None else PgText(fields[i])
            for n, i in enumerate(where)]


def line_key(header: PartHeader | SnapshotHeader, key_field: str) -> str:
    """The canonical key (`keys.canonical_key`) of a part's or snapshot's row, from its key
    field: what `line_event`'s event would have."""
    return canonical_key(key_values(unescape(key_field).split(KEY_SEPARATOR), header.key_kinds,
                                    header.key))


def line_event(job: TableJob, header: PartHeader | SnapshotHeader, seq: int, wedding: str,
                key_field: str, row: str) -> ChangeEvent:
    names = header.columns
    fields = row_fields(row)
    after = {n: (None if v is None else PgText(v)) for n, v in zip(names, fields, strict=True)}
    schema, table = split_qualified(job.table)
    key = key_values(unescape(key_field).split(KEY_SEPARATOR), header.key_kinds, header.key)
    # A compaction snapshot's row keeps no commit time or tier: neither decides a merge of
    # one origin's versions (positions do).
    ts, tier = ((header.min_commit_ts_us, Tier(header.tier)) if isinstance(header, PartHeader)
                else (0, Tier.LOW))
    return ChangeEvent(op=Op.READ, schema=schema, table=table,
                       position=ChangePosition(header.lsn, seq),
                       commit_ts_us=ts, xid=0, key=key, after=after, tier=tier,
                       wedding_id=None if wedding == "\\N" else unescape(wedding))


# --- what every restore does with the versions it gathered ----------------------------------


def apply_key_changes(merger: Merger, key_changes: list[Mapping[str, Any]],
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
        if job.wedding is not None and not job.owns(state.wedding_id):
            continue
        if state.unchanged:
            raise ReplayFailed(
                f"{job.table}: the row with key {dict(state.key)} at {state.position} has "
                f"unchanged column(s) {', '.join(state.unchanged)} and no earlier version in "
                f"the archive to take them from{nearest_hint(timeline.before(job.base))}")
        await out.state(state.after or {}, state.wedding_id, key[1], int(state.position.commit_lsn))
    await out.flush(base=False)
