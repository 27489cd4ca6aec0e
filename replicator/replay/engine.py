"""Rebuilding one table's rows as of a point, from its planned segments.

**Reading.** `Archive` fetches and decrypts objects and decodes segments; every failure is a
`ReplayFailed` naming the object and the nearest earlier restorable point (a missing object, a
tampered or truncated one, an unknown or wrong key, content that does not match its header).

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
decoded once.

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
import bisect
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from connectors.base import ObjectStore
from connectors.errors import NotFound, StoreError
from replicator.crypto import CryptoError, Keyring, UnknownKey, decrypt, decrypt_stream
from replicator.events import ChangeEvent, Op, Tier, TransactionRecord
from replicator.position import ChangePosition, Lsn
from replicator.replay.plan import ReplayRefused
from replicator.replay.render import PgText, copy_escape, copy_line
from replicator.sink.merge import Merger, Tombstone
from replicator.sink.part import (
    KEY_SEPARATOR,
    PartCorrupt,
    PartHeader,
    decode_part,
    is_part_key,
    key_values,
    parse_part_key,
    row_fields,
    unescape,
)
from replicator.sink.part import key_text as part_key_text
from replicator.sink.segment import (
    SegmentError,
    SegmentHeader,
    chunk_stream,
    decode_record_segment,
    decode_transaction_segment,
    parse_key,
)
from replicator.sink.snapshot import (
    SnapshotHeader,
    SnapshotPart,
    is_snapshot_key,
    parse_snapshot_key,
)
from replicator.transport.avro import to_python
from replicator.transport.kafka import key_text

__all__ = ["Archive", "ReplayFailed", "TableJob", "TableSchema", "TableStats", "Timeline",
           "restore_table"]

Rows = list[list[Any]]
Emit = Callable[[Rows], Awaitable[None]]
EmitCopy = Callable[[str | bytes, int], Awaitable[None]]  # COPY text lines, and how many
# Rows as COPY text lines, their key texts and wedding ids (COPY-escaped), no newlines: what
# a compaction snapshot holds (`sink.snapshot`).
EmitLines = Callable[[list[str], list[str], list[str]], Awaitable[None]]
BATCH_ROWS = 2000
_RAW_BATCH = 8 << 20  # bytes of COPY text per write from a compaction snapshot


class ReplayFailed(ReplayRefused):
    """The replay stopped on an object it could not use. `object` names it; `nearest` is the
    nearest earlier restorable point, when there is one."""

    def __init__(self, message: str, *, object: str | None = None,
                 nearest: Lsn | None = None) -> None:
        super().__init__(message, nearest=nearest)
        self.object = object


# --- the timeline of commits, for "nearest earlier point" ------------------------------------


@dataclass(slots=True)
class Timeline:
    """The archived transaction records, reduced to what replay asks of them."""

    commits: list[int] = field(default_factory=list)  # sorted commit LSNs (no snapshots)
    times: dict[int, int] = field(default_factory=dict)  # commit LSN -> commit time (us)
    # table -> LSNs of its snapshot boundary records, sorted
    snapshots: dict[str, list[int]] = field(default_factory=dict)
    # table -> commit LSN -> changes announced
    counts: dict[str, dict[int, int]] = field(default_factory=dict)
    oldest: int = 0  # set by the caller: the oldest point any plan accepts

    @classmethod
    def of(cls, records: Sequence[TransactionRecord]) -> Timeline:
        timeline = cls()
        commits: set[int] = set()
        for record in records:
            lsn = int(record.commit_lsn)
            timeline.times.setdefault(lsn, record.commit_ts_us)
            if record.xid == 0:
                for table in record.counts:
                    timeline.snapshots.setdefault(table, []).append(lsn)
            else:
                commits.add(lsn)
            for table, n in record.counts.items():
                per = timeline.counts.setdefault(table, {})
                if record.xid == 0:
                    per[lsn] = max(per.get(lsn, 0), n)  # one boundary record per table
                else:
                    per[lsn] = n  # a redelivered record repeats the same counts
        timeline.commits = sorted(commits | {lsn for lsns in timeline.snapshots.values()
                                             for lsn in lsns})
        for lsns in timeline.snapshots.values():
            lsns.sort()
        return timeline

    def before(self, lsn: int) -> Lsn | None:
        """The newest commit strictly below *lsn* that is restorable (`None` if none)."""
        i = bisect.bisect_left(self.commits, lsn)
        if i == 0:
            return None
        point = Lsn(self.commits[i - 1])
        return point if point >= self.oldest else None

    def base(self, table: str, *, at_or_after: int, target: int) -> Lsn | None:
        """The table's snapshot to start from: the oldest boundary in range."""
        for lsn in self.snapshots.get(table, ()):
            if at_or_after <= lsn <= target:
                return Lsn(lsn)
        return None


def current_rss_mb() -> float:
    """The process's resident memory now (Linux: /proc/self/statm; else the peak so far)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def nearest_hint(nearest: Lsn | None) -> str:
    if nearest is None:
        return "; no earlier point is restorable"
    return f"; the nearest restorable earlier point is {nearest} (--at {nearest})"


# --- reading objects -------------------------------------------------------------------------


class Archive:
    """One destination's objects, read and decrypted."""

    def __init__(self, store: ObjectStore, keyring: Keyring, timeline: Timeline | None = None
                 ) -> None:
        self.store = store
        self.keyring = keyring
        self.timeline = timeline or Timeline()
        self.bytes_read = 0
        self.objects_read = 0
        self.memory_budget_mb: float | None = None  # checked as changed keys accumulate
        # The largest resident memory seen at the checks (after every object and batch):
        # unlike ru_maxrss, not inflated by a parent's memory when started by fork/vfork.
        self.peak_rss_mb = 0.0

    def check_memory(self, table: str, changed_keys: int) -> None:
        """Note the resident memory (`peak_rss_mb`), and stop the replay when the process
        outgrows the memory budget (module docstring)."""
        used = current_rss_mb()
        self.peak_rss_mb = max(self.peak_rss_mb, used)
        if self.memory_budget_mb is None:
            return
        if used > self.memory_budget_mb:
            raise ReplayFailed(
                f"{table}: the replay uses {used:,.0f} MB holding {changed_keys:,} changed "
                f"keys, over its memory budget of {self.memory_budget_mb:,.0f} MB: restore "
                "fewer tables at once (--jobs 1), a point with fewer changes since the "
                "table's snapshot, or raise --memory-budget")

    def _failed(self, key: str, what: str, first: int | None) -> ReplayFailed:
        nearest = self.timeline.before(first) if first is not None else None
        return ReplayFailed(f"object {key} {what}{nearest_hint(nearest)}", object=key,
                            nearest=nearest)

    @staticmethod
    def _first(key: str) -> int | None:
        try:
            if is_part_key(key):
                return int(parse_part_key(key).lsn)
            if is_snapshot_key(key):
                return int(parse_snapshot_key(key).lsn)
            return int(parse_key(key).first)
        except ValueError:
            return None

    async def _get(self, key: str) -> bytes:
        try:
            data = await self.store.get(key)
        except NotFound:
            raise self._failed(key, "is missing from the store", self._first(key)) from None
        except StoreError as exc:
            raise ReplayFailed(f"cannot read object {key}: {exc}", object=key) from None
        self.bytes_read += len(data)
        self.objects_read += 1
        return data

    def _unreadable(self, key: str, exc: Exception) -> ReplayFailed:
        """What is wrong with *key*, from an error raised while decrypting or decoding it."""
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, CryptoError):
            cause = cause.__cause__ or cause.__context__
        first = self._first(key)
        if isinstance(cause, UnknownKey):
            return self._failed(key, f"is encrypted with key {cause.key_name!r}, which is not "
                                "in the keyring (set REPLICATOR_KEK_<NAME> or the keyring "
                                "file)", first)
        if isinstance(cause, CryptoError) and not isinstance(exc, PartCorrupt):
            return self._failed(key, f"cannot be decrypted: {cause}", first)
        return self._failed(key, f"is corrupt: {exc}", first)

    async def fetch(self, key: str) -> bytes:
        """The decrypted bytes of *key* (small objects: schemas, transaction records)."""
        data = await self._get(key)
        try:
            return decrypt(data, key, self.keyring)
        except CryptoError as exc:
            raise self._unreadable(key, exc) from None

    async def segment(self, key: str, after: int | None = None
                      ) -> tuple[SegmentHeader, Iterator[dict[str, Any]]]:
        """The header and verified records of change segment *key*, decrypted while they are
        decoded (the plaintext is never held whole); errors name the object. With *after*,
        blocks of records all at or below that LSN are passed over (`decode_record_segment`)."""
        return self.open_segment(key, await self._get(key), after)

    def open_segment(self, key: str, data: bytes, after: int | None = None
                     ) -> tuple[SegmentHeader, Iterator[dict[str, Any]]]:
        """`segment()` of the stored bytes *data* of *key*."""
        try:
            header, records = decode_record_segment(
                chunk_stream(decrypt_stream((data,), name=key, keyring=self.keyring)), after)
        except (CryptoError, SegmentError) as exc:
            raise self._unreadable(key, exc) from None

        def checked() -> Iterator[dict[str, Any]]:
            try:
                yield from records
            except (CryptoError, SegmentError) as exc:
                raise self._unreadable(key, exc) from None

        if header.key != _without_digest(key):
            raise self._failed(key, f"holds {header.key}, not what its name says",
                               self._first(key))
        return header, checked()

    async def part(self, key: str) -> tuple[PartHeader, Iterator[list[str]]]:
        """The header and the body lines (in batches) of snapshot part *key*; errors name
        it."""
        return self.open_part(key, await self._get(key))

    def open_part(self, key: str, data: bytes) -> tuple[PartHeader, Iterator[list[str]]]:
        """`part()` of the stored bytes *data* of *key*."""
        try:
            header, batches = decode_part(decrypt(data, key, self.keyring))
        except (CryptoError, PartCorrupt) as exc:
            raise self._unreadable(key, exc) from None
        first = self._first(key)

        def checked() -> Iterator[list[str]]:
            try:
                yield from batches
            except PartCorrupt as exc:
                raise self._failed(key, f"is corrupt: {exc}", first) from None

        try:
            name = parse_part_key(key)
        except ValueError:
            raise self._failed(key, "is not a snapshot part name", first) from None
        if (name.table, name.lsn, name.first_seq, name.last_seq) != (
                header.table, header.lsn, header.first_seq, header.last_seq):
            raise self._failed(key, "holds other rows than its name says", first)
        return header, checked()

    async def snapshot(self, key: str) -> SnapshotPart:
        """Compaction snapshot part *key*, decrypted, its header checked against its name;
        errors (also those its frames raise as they are read) name it."""
        data = await self._get(key)
        first = self._first(key)
        try:
            part = SnapshotPart(decrypt(data, key, self.keyring))
        except (CryptoError, PartCorrupt) as exc:
            raise self._unreadable(key, exc) from None
        name = parse_snapshot_key(key)
        header = part.header
        if (name.table, name.lsn, name.number) != (header.table, header.lsn, header.part):
            raise self._failed(key, "holds another part than its name says", first)
        return part

    def snapshot_failed(self, key: str, exc: PartCorrupt) -> ReplayFailed:
        return self._failed(key, f"is corrupt: {exc}", self._first(key))

    async def transactions(self) -> list[TransactionRecord]:
        """Every archived transaction record (duplicates included), in name order."""
        out: list[TransactionRecord] = []
        async for info in self.store.list("transactions/"):
            data = await self.fetch(info.key)
            try:
                _, records = decode_transaction_segment(data)
                out.extend(records)
            except SegmentError as exc:
                raise self._unreadable(info.key, exc) from None
        return out


def _without_digest(key: str) -> str:
    parsed = parse_key(key)
    if not parsed.digest:
        return key
    return key[: -len(".seg")].rsplit("-", 1)[0] + ".seg"


# --- one table -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    not_null: bool


@dataclass(frozen=True, slots=True)
class TableSchema:
    """A table as archived under `schemas/<table>/<lsn>.json`."""

    table: str  # schema.table
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    lsn: Lsn

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TableSchema:
        return cls(doc["table"],
                   tuple(Column(c["name"], c["type"], bool(c.get("not_null"))) for c in
                         doc["columns"]),
                   tuple(doc.get("primary_key") or ()), Lsn(doc["lsn"]))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)


@dataclass(frozen=True, slots=True)
class TableJob:
    table: str
    schema: TableSchema
    segments: tuple[str, ...]
    base: Lsn  # the LSN of the base snapshot's rows
    target: Lsn
    wedding: str | None = None
    check_counts: bool = True
    # fetched headers (wedding restores)
    headers: Mapping[str, SegmentHeader | PartHeader | SnapshotHeader] | None = None
    compacted: bool = False  # the base is a compaction snapshot, which holds changes at base

    @property
    def first_change(self) -> int:
        """The lowest commit LSN whose changes the base does not hold."""
        return int(self.base) + 1 if self.compacted else int(self.base)


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


def _mark(seen: dict[int, bytearray], lsn: int, seq: int) -> bool:
    """Record position (lsn, seq) as seen; False when it was seen before."""
    index, mask = seq >> 3, 1 << (seq & 7)
    bits = seen.get(lsn)
    if bits is None:
        bits = seen[lsn] = bytearray(index + 1)
    elif len(bits) <= index:
        bits.extend(bytes(index + 1 - len(bits)))
    if bits[index] & mask:
        return False
    bits[index] |= mask
    return True


def _event(record: Mapping[str, Any], op: Op | None = None,
           key: Mapping[str, Any] | None = None, python_key: bool = True) -> ChangeEvent:
    """The change event of a segment record, its values left as archived. *python_key*:
    the key as Python values (for `merge_key`); else as archived (the caller gives the
    merger its own key)."""
    source = record["source"]
    keys = record["key"] if key is None else key
    return ChangeEvent(
        op=op or _OPS[record["op"]], schema=source["schema"], table=source["table"],
        position=ChangePosition(source["lsn"], source["seq"]),
        commit_ts_us=source["ts_us"], xid=source["txId"],
        key=to_python(keys) if python_key else keys,
        before=record["before"], after=record["after"], unchanged=tuple(record["unchanged"]),
        origin=source["origin"], db=source["db"], tier=_TIERS[record["priority"]],
        wedding_id=record["wedding_id"])


_OPS: dict[str, Op] = {op.value: op for op in Op}
_TIERS: dict[str, Tier] = {tier.value: tier for tier in Tier}


def _text_key(table: str, key: Mapping[str, Any]) -> tuple[str, str]:
    """Replay's merge key: the key columns' Postgres text, as part lines hold it."""
    return table, part_key_text(key)


class Remover(Protocol):
    """A target that can drop rows it was given (in the same transaction)."""

    async def remove_keys(self, keys: list[str]) -> list[list[str | None]]:
        """Drop the rows whose key text (COPY-escaped `sink.part.key_text`) is one of
        *keys*; their columns' text, in the schema's order (NULL as None)."""
        ...

    async def remove_all(self) -> None: ...


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
        return await _restore_wedding(archive, job, emit, progress)
    stats = TableStats(job.table)
    base = int(job.base)
    parts: list[str] = []  # the base's snapshot parts (rows-*.part at the base LSN)
    snapshots: list[str] = []  # the base's compaction snapshot parts
    for key in job.segments:
        if is_snapshot_key(key):
            snapshots.append(key)
        elif is_part_key(key) and int(parse_part_key(key).lsn) == base and not job.compacted:
            parts.append(key)
    out = _Output(job, stats, emit, emit_copy, emit_lines, progress)
    loop = asyncio.get_running_loop()

    def fetch(key: str) -> bytes:  # from the pass's thread, through this loop
        return asyncio.run_coroutine_threadsafe(archive._get(key), loop).result()

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
                event, text_key = _base_row_event(job, texts)
                merger.add(event, (job.table, text_key))

    for key in changes.deferred:
        _, records = await archive.segment(key)
        for record in records:
            seq = record["source"]["seq"]
            if not _mark(seen, base, seq):
                stats.duplicates += 1
                continue
            if truncated is not None and (base, seq) < truncated:
                continue
            if changed:
                text_key = part_key_text(record["key"])
                if copy_escape(text_key) in changed:
                    merger.add(_event(record, python_key=False), (job.table, text_key))
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
                if not _mark(seen, base, seq):
                    stats.duplicates += 1
                    continue
                if truncated is not None and (base, seq) < truncated:
                    continue
                if key_field in changed:
                    merger.add(_line_event(job, part, seq, wedding_text, key_field, row),
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

    _apply_key_changes(merger, key_changes, job.table)
    await _emit_states(merger, job, out, archive.timeline)
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
        parsed = parse_key(key)
        if parsed.last < low or parsed.first > target:
            continue
        header, records = archive.open_segment(key, fetch(key),
                                               low - 1 if parsed.first < low else None)
        stats.segments += 1
        if (not job.compacted and header.first.commit_lsn == header.last.commit_lsn == base
                and set(header.ops) == {Op.READ.value}):
            found.deferred.append(key)
            continue
        for record in records:
            source = record["source"]
            lsn = source["lsn"]
            if lsn < low or lsn > target:
                continue
            if not _mark(seen, lsn, source["seq"]):
                stats.duplicates += 1
                continue
            op = record["op"]
            if op != "r":
                found.commits.add(lsn)
                stats.changes += 1
            if op == "t":
                position = (lsn, source["seq"])
                if source["origin"] is None and (found.truncated is None
                                                 or position > found.truncated):
                    found.truncated = position
                merger.add(_event(record))
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
            merger.add(_event(record, python_key=False), (job.table, text_key))
        archive.check_memory(job.table, len(changed))
    return found


async def _load_snapshots(archive: Archive, job: TableJob, keys: Sequence[str], out: _Output
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


def _base_row_event(job: TableJob, texts: Sequence[str | None]) -> tuple[ChangeEvent, str]:
    """A base row the target removed (its columns' text, in the schema's order) as the
    version at the base, and its key text."""
    names = job.schema.names
    after = {n: (None if v is None else PgText(v)) for n, v in zip(names, texts, strict=True)}
    key_texts = [str(after[k]) for k in job.schema.primary_key]
    key = {k: after[k] for k in job.schema.primary_key}
    schema, _, table = job.table.partition(".")
    event = ChangeEvent(op=Op.READ, schema=schema, table=table,
                        position=ChangePosition(job.base, 0), commit_ts_us=0, xid=0, key=key,
                        after=after, tier=Tier.LOW)
    return event, KEY_SEPARATOR.join(key_texts)


class _Output:
    """Where restored rows go: value batches (*emit*), COPY text (*emit_copy*, for rows
    already in the schema's column order), or COPY text with key texts and wedding ids
    (*emit_lines*)."""

    def __init__(self, job: TableJob, stats: TableStats, emit: Emit,
                 emit_copy: EmitCopy | None, emit_lines: EmitLines | None,
                 progress: Callable[[int], None] | None) -> None:
        self.job, self.stats, self.emit = job, stats, emit
        self.emit_copy, self.emit_lines, self.progress = emit_copy, emit_lines, progress
        self.columns = job.schema.names
        self.batch: Rows = []
        self.keys: list[str] = []
        self.weddings: list[str] = []

    def _count(self, rows: int, base: bool) -> None:
        self.stats.rows += rows
        if base:
            self.stats.base_rows += rows
        if self.progress is not None:
            self.progress(rows)

    async def record(self, record: Mapping[str, Any]) -> None:
        """A base row from a change segment (op `r`)."""
        after = record["after"]
        self.batch.append([after.get(c) for c in self.columns])
        if self.emit_lines is not None:
            self.keys.append(copy_escape(part_key_text(record["key"])))
            self.weddings.append(_wedding_field(record["wedding_id"]))
        if len(self.batch) >= BATCH_ROWS:
            await self.flush()

    async def state(self, after: Mapping[str, Any], wedding: str | None, key: str) -> None:
        """A merged row (not a base row)."""
        self.batch.append([after.get(c) for c in self.columns])
        if self.emit_lines is not None:
            self.keys.append(copy_escape(key))
            self.weddings.append(_wedding_field(wedding))
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
                    weddings: list[str]) -> None:
        """Base rows as COPY text in *columns*' order (and their key texts and weddings, for
        *emit_lines*)."""
        if not rows:
            return
        if tuple(columns) != self.columns:
            where = [columns.index(c) if c in columns else -1 for c in self.columns]
            if self.emit_lines is not None:
                rows = [copy_line(_values(row, where))[:-1] for row in rows]
            else:
                await self.emit([_values(row, where) for row in rows])
                self._count(len(rows), True)
                return
        if self.emit_lines is not None:
            await self.emit_lines(rows, keys, weddings)
        elif self.emit_copy is not None:
            await self.emit_copy("\n".join(rows) + "\n", len(rows))
        else:
            where = list(range(len(columns)))
            await self.emit([_values(row, where) for row in rows])
        self._count(len(rows), True)

    async def raw(self, chunk: bytes, rows: int) -> None:
        """COPY text straight from a compaction snapshot (*emit_copy* only)."""
        assert self.emit_copy is not None
        await self.emit_copy(chunk, rows)
        self._count(rows, True)


def _wedding_field(wedding: str | None) -> str:
    return "\\N" if wedding is None else copy_escape(wedding)


async def _snapshot_rows(archive: Archive, job: TableJob, snapshot: SnapshotPart,
                         changed: set[str], merger: Merger, out: _Output) -> None:
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
            merger.add(_line_event(job, header, n, weddings[n], keys[n], lines[n].decode()),
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
                if size >= _RAW_BATCH:
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
            merger.add(_line_event(job, header, n, weddings[n], keys[n], rows[n]),
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
                f"segments/{job.table}/ covering {Lsn(lsn).hex_key()} is missing"
                f"{nearest_hint(nearest)}", object=f"segments/{job.table}/", nearest=nearest)
    for lsn in sorted(change_commits):
        if lsn not in announced:
            nearest = timeline.before(lsn)
            raise ReplayFailed(
                f"{job.table}: changes committed at {Lsn(lsn)} have no transaction record: "
                f"the transaction records (transactions/) have a gap there"
                f"{nearest_hint(nearest)}", object="transactions/", nearest=nearest)


def _apply_key_changes(merger: Merger, key_changes: list[dict[str, Any]],
                       text_keys: str | None = None) -> None:
    """An update that moves a row to a new key deletes the old key, and takes along the old
    row's values of the columns it left unchanged (TOAST), in position order (chains).
    *text_keys*: the table, when the merger is keyed by `_text_key`."""
    key_changes.sort(key=lambda r: (r["source"]["lsn"], r["source"]["seq"]))
    python_key = text_keys is None
    for record in key_changes:
        before = record["before"]
        old = {name: before.get(name) for name in record["key"]}
        gone = _event(record, Op.DELETE, old, python_key=python_key)
        moved = _event(record, python_key=python_key)
        gone_key = moved_key = None
        if text_keys is not None:
            gone_key, moved_key = _text_key(text_keys, old), _text_key(text_keys, record["key"])
        if moved.unchanged:
            taken = merger.values_before(gone, moved.position, moved.unchanged, gone_key)
            moved.after = {**(moved.after or {}), **taken}
            moved.unchanged = tuple(c for c in moved.unchanged if c not in taken)
        merger.add(gone, gone_key)
        merger.add(moved, moved_key)


async def _emit_states(merger: Merger, job: TableJob, out: _Output, timeline: Timeline
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


async def _restore_wedding(archive: Archive, job: TableJob, emit: Emit,
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
        if lsn < base or lsn > target or not _mark(seen, lsn, source["seq"]):
            return
        op, owner = record["op"], record["wedding_id"]
        if op == "t" and not deletes_only:
            merger.add(_event(record))
        elif owner is None and op == "d":
            unknown_deletes.append(dict(record))
        elif owner == wedding and not deletes_only:
            event = _event(record)
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
                    if owner != mine or not _mark(seen, lsn, int(seq_text)):
                        continue
                    event = _line_event(job, part, int(seq_text), owner, key_field, row)
                    wanted.add(key_text(event.key))
                    merger.add(event)
            continue
        parsed = parse_key(key)
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
            merger.add(_event(record))
            stats.changes += 1
    _apply_key_changes(merger, key_changes)
    stats.changed_keys = len(wanted)
    await _emit_states(merger, job, _Output(job, stats, emit, None, None, progress),
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
        yield n, _line_event(job, snapshot.header, n, mine, keys[n], rows[n])


def _values(row: str, where: Sequence[int]) -> list[Any]:
    """A part's COPY text row as values in the schema's column order (`PgText`, or None)."""
    fields = row_fields(row)
    return [None if i < 0 or fields[i] is None else PgText(fields[i]) for i in where]


def _line_event(job: TableJob, header: PartHeader | SnapshotHeader, seq: int, wedding: str,
                key_field: str, row: str) -> ChangeEvent:
    names = header.columns
    fields = row_fields(row)
    after = {n: (None if v is None else PgText(v)) for n, v in zip(names, fields, strict=True)}
    schema, _, table = job.table.partition(".")
    key = key_values(unescape(key_field).split(KEY_SEPARATOR), header.key_kinds, header.key)
    # A compaction snapshot's row keeps no commit time or tier: neither decides a merge of
    # one origin's versions (positions do).
    ts, tier = ((header.min_commit_ts_us, Tier(header.tier)) if isinstance(header, PartHeader)
                else (0, Tier.LOW))
    return ChangeEvent(op=Op.READ, schema=schema, table=table,
                       position=ChangePosition(header.lsn, seq),
                       commit_ts_us=ts, xid=0, key=key, after=after, tier=tier,
                       wedding_id=None if wedding == "\\N" else unescape(wedding))


def _part_events(archive: Archive, key: str, data: bytes, job: TableJob,
                 seen: dict[int, bytearray]) -> Iterator[tuple[ChangeEvent, str]]:
    """The rows of an on-demand snapshot's part, as versions at their position."""
    header, batches = archive.open_part(key, data)
    for lines in batches:
        for line in lines:
            seq_text, wedding, key_field, row = line.split("\t", 3)
            seq = int(seq_text)
            if not _mark(seen, int(header.lsn), seq):
                continue
            event = _line_event(job, header, seq, wedding, key_field, row)
            yield event, unescape(key_field)
