"""`replicator impact`: which weddings the changes committed in a time window touched.

For each wedding named by a committed change whose commit time is in `[since, until]`: the
tables, and in each the inserts, updates and deletes; the first and last change time; the
wedding's date and tier; its vendors. Changes whose record names no wedding (`wedding_id`
null: a table without a link to a wedding, a delete under the default replica identity, a
truncate) are counted apart, per table, as `unresolved`.

What it reads, and why (docs/ARCHITECTURE.md, "Replay"):
- The destination's checkpoint and transaction records. Only transactions committed below
  the checkpoint count (what a restore at `latest` holds). The window's times become the
  commit LSNs of the transactions committed in it, per table (the records' counts name the
  tables each changed), like `replay --at <time>`; `until` defaults to the newest archived
  commit. Snapshot rows (op `r`) are not changes and are never counted.
- The change segments whose name's LSN range holds one of those LSNs: nothing else. With
  `wedding`, each one's header first (one ranged read, `run.HEADER_FETCH_BYTES`), and only
  those whose wedding list or Bloom filter may hold the wedding are read (a header read that
  already holds the whole object, as it does below 1 MiB, is used as the object).
- Records are de-duplicated by position, and the changes found at each commit must be the
  count its transaction record announced (fewer: a segment is missing, `ReplayFailed`);
  not with `wedding`, which skips segments on purpose and counts only that wedding's
  changes (`unresolved` is then left empty).
- The dates and vendors: the calendar table (`[priority]`) and the vendor link's table
  (`[impact] vendors`) restored as of `until` by `run.prepare` / `run.apply`, into a target
  that keeps only the touched weddings' rows (with `wedding`: a wedding restore, which reads
  only the objects whose header may hold it, as the capture classified the rows). A table
  the archive lacks, or cannot restore at that point, leaves the dates (or vendors) unknown,
  with a warning. The tier is `priority.WeddingCalendar.tier_for_date` with the calendar's
  boundaries and time zone; a wedding without a calendar row has no date and no tier.
- An update names the row's new wedding only: a row moved from one wedding to another counts
  for the new one.
- The cross-origin conflicts the sinks recorded (`conflicts/<table>/…`, `sink/conflicts.py`)
  whose time (the later version's commit) is in the window, for the selected tables (with
  `wedding`: those whose versions name it): the key, the rule that decided, both versions'
  origin, role and op, and the winner. A record that cannot be read is a warning.

`objects_read` counts the objects fetched whole (transaction records, schemas, segments, the
restore's objects), `headers_read` the ranged header reads not used as the whole object, and
`bytes_read` every byte fetched; each object is fetched once (the small ones the restore asks
for again are kept, and the restore of the calendar plans from the transaction records read
first). `steps_s` times the parts: `transactions` (the records, and the timeline),
`window` (the window's segments), `calendar` (the calendar and vendor tables as of the end).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, Final

from connectors.base import ObjectInfo, ObjectStore, run_bounded
from connectors.errors import NotFound, StoreError
from replicator.archive.layout import (
    SEGMENTS,
    SNAPSHOTS,
    conflicts_prefix,
    is_part_key,
    parse_conflict_key,
    parse_segment_key,
    segments_prefix,
)
from replicator.archive.merge import ConflictPolicy
from replicator.archive.part import row_fields
from replicator.archive.reader import (
    Archive,
    ReplayFailed,
    Timeline,
    dead_letters,
    recorded_gaps,
)
from replicator.archive.reader import checkpoint as archive_checkpoint
from replicator.archive.render import copy_escape, text, utc_text
from replicator.archive.segment import SegmentError, SegmentHeader, read_header
from replicator.config import PriorityConfig, VendorLink
from replicator.crypto import CryptoError, Keyring, decrypt, decrypt_stream
from replicator.errors import ReplicatorError
from replicator.events import Op, Tier, TransactionRecord
from replicator.position import Lsn
from replicator.priority import WeddingCalendar
from replicator.replay.plan import ReplayRefused, select_tables, tables_of
from replicator.replay.run import (
    HEADER_FETCH_BYTES,
    ArchiveFacts,
    apply,
    find_destination,
    prepare,
)
from replicator.replay.table import TableSchema, mark_seen
from replicator.replay.targets import TableWriter

__all__ = ["CSV_HEADER", "Counts", "ImpactReport", "Tally", "WeddingImpact", "impact",
           "ordered", "segments_for", "window_commits"]

CSV_HEADER: Final = ("wedding_id", "wedding_date", "tier", "table", "inserts", "updates",
                     "deletes", "first_change", "last_change", "vendors")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_READS_AT_ONCE: Final = 8


def epoch_us(moment: datetime) -> int:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ReplayRefused(f"{moment.isoformat()} has no time zone: give one (e.g. +00:00 or Z)")
    return (moment - _EPOCH) // timedelta(microseconds=1)


# --- counting (pure) -------------------------------------------------------------------------


@dataclass(slots=True)
class Counts:
    """Changes of one table: inserts, updates, deletes, and truncates (shown only if any)."""

    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    truncates: int = 0

    def add(self, op: str) -> None:
        if op == Op.CREATE:
            self.inserts += 1
        elif op == Op.UPDATE:
            self.updates += 1
        elif op == Op.DELETE:
            self.deletes += 1
        elif op == Op.TRUNCATE:
            self.truncates += 1

    @property
    def total(self) -> int:
        return self.inserts + self.updates + self.deletes + self.truncates

    def to_dict(self) -> dict[str, int]:
        out = {"inserts": self.inserts, "updates": self.updates, "deletes": self.deletes}
        if self.truncates:
            out["truncates"] = self.truncates
        return out


@dataclass(slots=True)
class WeddingImpact:
    """One wedding the window touched."""

    wedding_id: str
    tables: dict[str, Counts] = field(default_factory=dict)
    first_us: int | None = None  # commit time of its first and last change in the window
    last_us: int | None = None
    wedding_date: date | None = None
    tier: Tier | None = None
    vendors: list[str] = field(default_factory=list)

    def add(self, table: str, op: str, commit_ts_us: int) -> None:
        self.tables.setdefault(table, Counts()).add(op)
        if self.first_us is None or commit_ts_us < self.first_us:
            self.first_us = commit_ts_us
        if self.last_us is None or commit_ts_us > self.last_us:
            self.last_us = commit_ts_us

    def to_dict(self) -> dict[str, Any]:
        return {
            "wedding_id": self.wedding_id,
            "wedding_date": None if self.wedding_date is None else self.wedding_date.isoformat(),
            "tier": None if self.tier is None else self.tier.value,
            "tables": {t: c.to_dict() for t, c in sorted(self.tables.items())},
            "vendors": list(self.vendors),
            "first_change": None if self.first_us is None else utc_text(self.first_us),
            "last_change": None if self.last_us is None else utc_text(self.last_us),
        }


def window_commits(records: Iterable[TransactionRecord], since_us: int, until_us: int,
                   tables: Iterable[str]) -> dict[str, list[int]]:
    """Per table of *tables*: the commit LSNs, sorted, of the transactions committed in
    `[since_us, until_us]` that changed it (their records' counts say which tables; snapshot
    boundary records, xid 0, are not transactions)."""
    wanted = set(tables)
    found: dict[str, set[int]] = {}
    for record in records:
        if record.xid == 0 or not since_us <= record.commit_ts_us <= until_us:
            continue
        for table, n in record.counts.items():
            if n > 0 and table in wanted:
                found.setdefault(table, set()).add(int(record.commit_lsn))
    return {table: sorted(lsns) for table, lsns in sorted(found.items())}


def segments_for(listing: Iterable[str | ObjectInfo], window: Mapping[str, Sequence[int]]
                 ) -> list[tuple[str, str, int | None]]:
    """The change segments of *listing* whose name's commit-LSN range holds one of their
    table's LSNs in *window*, in listing order: (name, table, size when listed)."""
    out = []
    for item in listing:
        key, size = (item, None) if isinstance(item, str) else (item.key, item.size)
        if not key.startswith(SEGMENTS) or is_part_key(key):
            continue
        try:
            name = parse_segment_key(key)
        except ValueError as exc:
            raise ReplayRefused(f"object {key} is not a valid segment name ({exc})") from None
        lsns = window.get(name.table)
        if not lsns:
            continue
        i = bisect.bisect_left(lsns, name.first)
        if i < len(lsns) and lsns[i] <= name.last:
            out.append((key, name.table, size))
    return out


class Tally:
    """The changes of the window, counted per wedding and table: records are taken only at
    their table's window LSNs, once per position, and (with *wedding*) only that wedding's."""

    def __init__(self, window: Mapping[str, Sequence[int]], wedding: str | None = None) -> None:
        self.window = {table: frozenset(lsns) for table, lsns in window.items()}
        self.wedding = wedding
        self.seen: dict[str, dict[int, bytearray]] = {}
        self.weddings: dict[str, WeddingImpact] = {}
        self.unresolved: dict[str, Counts] = {}
        self.duplicates = 0

    def add(self, table: str, record: Mapping[str, Any]) -> None:
        source = record["source"]
        lsn = source["lsn"]
        if lsn not in self.window.get(table, ()):
            return
        if not mark_seen(self.seen.setdefault(table, {}), lsn, source["seq"]):
            self.duplicates += 1
            return
        op = record["op"]
        if op == Op.READ:
            return  # a snapshot row, not a change
        owner = record["wedding_id"]
        if self.wedding is not None:
            if owner == self.wedding:
                self._wedding(owner).add(table, op, source["ts_us"])
        elif owner is None:
            self.unresolved.setdefault(table, Counts()).add(op)
        else:
            self._wedding(owner).add(table, op, source["ts_us"])

    def _wedding(self, wedding: str) -> WeddingImpact:
        found = self.weddings.get(wedding)
        if found is None:
            found = self.weddings[wedding] = WeddingImpact(wedding)
        return found

    def check(self, timeline: Timeline) -> None:
        """Every window transaction's changes are here: as many as its record announced."""
        for table, lsns in sorted(self.window.items()):
            announced: Mapping[int, int] = timeline.counts.get(table) or {}
            seen = self.seen.get(table, {})
            for lsn in sorted(lsns):
                bits = seen.get(lsn)
                got = int.from_bytes(bits, "little").bit_count() if bits else 0
                want = announced.get(lsn, 0)
                if got < want:
                    raise ReplayFailed(
                        f"{table}: the transaction committed at {Lsn(lsn)} announced {want} "
                        f"change(s) and the archive holds {got}: a segment of "
                        f"{segments_prefix(table)} covering {Lsn(lsn).hex_key()} is missing",
                        object=segments_prefix(table))


def _id_order(wedding_id: str) -> tuple[int, int, str]:
    if wedding_id.isascii() and wedding_id.isdigit():
        return 0, int(wedding_id), wedding_id
    return 1, 0, wedding_id


def ordered(weddings: Iterable[WeddingImpact]) -> list[WeddingImpact]:
    """Nearest wedding date first, weddings without a date last; then by id (numbers as
    numbers)."""
    return sorted(weddings, key=lambda w: (w.wedding_date is None,
                                           w.wedding_date or date.min, _id_order(w.wedding_id)))


def as_date(value: Any) -> date | None:
    """A wedding date column's archived value as a date (a timestamp's date part); None for
    NULL, infinity or a date Python cannot hold."""
    rendered = text(value)
    if rendered is None:
        return None
    try:
        return date.fromisoformat(rendered[:10])
    except ValueError:
        return None


# --- the report ------------------------------------------------------------------------------


@dataclass(slots=True)
class ImpactReport:
    since_us: int
    until_us: int
    destination: str
    weddings: list[WeddingImpact] = field(default_factory=list)
    unresolved: dict[str, Counts] = field(default_factory=dict)
    wedding: str | None = None  # --wedding: only that one was counted
    calendar: str | None = None  # the calendar table the dates come from, if restored
    vendor_link: VendorLink | None = None
    from_lsn: Lsn | None = None  # the window's commits: first and last commit LSN
    to_lsn: Lsn | None = None
    segments: int = 0  # change segments in the window
    segments_skipped: int = 0  # of which their header proved them not to hold the wedding
    objects_read: int = 0
    headers_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    # seconds of each part: the transaction records, the window's segments, the calendar
    # and vendor link restored as of the window's end
    steps_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)  # in the window, by time

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": utc_text(self.since_us),
            "until": utc_text(self.until_us),
            "destination": self.destination,
            "from_lsn": None if self.from_lsn is None else str(self.from_lsn),
            "to_lsn": None if self.to_lsn is None else str(self.to_lsn),
            "weddings": [w.to_dict() for w in self.weddings],
            "unresolved": {t: c.to_dict() for t, c in sorted(self.unresolved.items())},
            "segments": self.segments,
            "segments_skipped": self.segments_skipped,
            "objects_read": self.objects_read,
            "headers_read": self.headers_read,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "steps_s": {k: round(v, 3) for k, v in self.steps_s.items()},
            "warnings": list(self.warnings),
            "conflicts": list(self.conflicts),
        }

    def csv_rows(self) -> list[list[str]]:
        """One row per (wedding, table), then per table of unresolved changes (an empty
        wedding id): `CSV_HEADER`'s columns, vendors joined by `;`."""
        rows = []
        for w in self.weddings:
            entry = w.to_dict()
            for table, counts in sorted(w.tables.items()):
                rows.append([w.wedding_id, entry["wedding_date"] or "", entry["tier"] or "",
                             table, str(counts.inserts), str(counts.updates),
                             str(counts.deletes), entry["first_change"] or "",
                             entry["last_change"] or "", ";".join(w.vendors)])
        for table, counts in sorted(self.unresolved.items()):
            rows.append(["", "", "", table, str(counts.inserts), str(counts.updates),
                         str(counts.deletes), "", "", ""])
        return rows


# --- reading ---------------------------------------------------------------------------------


class ReadOnly(ReplicatorError):
    """A write was asked of the store `impact` only reads (a bug)."""


class _Reads(ObjectStore):
    """The store, read-only, counting what is fetched (module docstring); whole reads of
    objects other than segments and snapshots are kept, so the restore's second read of the
    transaction records, checkpoint, gaps and schemas costs nothing."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.objects = 0
        self.headers = 0
        self.bytes = 0
        self._kept: dict[str, bytes] = {}

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        whole = start == 0 and end is None
        if whole and key in self._kept:
            return self._kept[key]
        data = await self.inner.get(key, start=start, end=end)
        self.bytes += len(data)
        if whole:
            self.objects += 1
            if not key.startswith((SEGMENTS, SNAPSHOTS)):
                self._kept[key] = data
        else:
            self.headers += 1
        return data

    def used_whole(self) -> None:
        """The last header read held the whole object, and was used as the object."""
        self.headers -= 1
        self.objects += 1

    async def stat(self, key: str) -> ObjectInfo:
        return await self.inner.stat(key)

    def list(self, prefix: str = "", *, after: str | None = None) -> AsyncIterator[ObjectInfo]:
        return self.inner.list(prefix, after=after)

    async def put(self, key: str, data: bytes, *,
                  metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        raise ReadOnly(f"impact does not write to the archive (asked to write {key})")

    async def delete(self, keys: Iterable[str]) -> None:
        raise ReadOnly("impact does not delete from the archive")

    async def close(self) -> None:
        return None  # the caller's store


async def _fetch(reads: _Reads, key: str, end: int | None = None) -> bytes:
    try:
        return await reads.get(key, end=end)
    except NotFound:
        raise ReplayFailed(f"object {key} is missing from the store", object=key) from None
    except StoreError as exc:
        raise ReplayFailed(f"cannot read object {key}: {exc}", object=key) from None


async def _conflicts(reads: _Reads, keyring: Keyring, tables: Sequence[str], since_us: int,
                     until_us: int, wedding: str | None, warnings: list[str]
                     ) -> list[dict[str, Any]]:
    """The conflict records of *tables* in the window (module docstring), by time."""
    names = []
    for table in tables:
        async for info in reads.list(conflicts_prefix(table)):
            try:
                _, at = parse_conflict_key(info.key)
            except ValueError as exc:
                warnings.append(str(exc))
                continue
            if since_us <= at <= until_us:
                names.append((at, info.key))
    found = []
    for at, key in sorted(names):
        try:
            doc = json.loads(decrypt(await _fetch(reads, key), key, keyring))
            sides = {side: doc[side] for side in ("winner", "loser")}
            entry = {"at": utc_text(at), "table": doc["table"], "key": doc["key"],
                     "group": doc["group"], "rule": doc["rule"], "object": key,
                     **{side: {f: v.get(f) for f in ("origin", "role", "op", "commit_time",
                                                     "lsn", "wedding_id")}
                        for side, v in sides.items()}}
        except (CryptoError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.append(f"conflict record {key} cannot be read: {exc}")
            continue
        if wedding is None or wedding in (entry["winner"]["wedding_id"],
                                          entry["loser"]["wedding_id"]):
            found.append(entry)
    return found


def _header_of(key: str, data: bytes, keyring: Keyring) -> SegmentHeader | None:
    """The segment's header from its first bytes (None when it cannot be read from them:
    the whole object is read then, and its errors named)."""
    try:
        return read_header(next(decrypt_stream((data,), name=key, keyring=keyring)))
    except (CryptoError, SegmentError, ValueError, StopIteration):
        return None


# --- the weddings' dates and vendors ---------------------------------------------------------


class KeepRows:
    """A restore target that keeps, per table, the rows whose value in one of the given
    columns is a wanted wedding id (as text; every row when *weddings* is None), as
    column -> text."""

    def __init__(self, columns: Mapping[str, set[str]], weddings: set[str] | None) -> None:
        self.bytes_written = 0
        self.columns = columns  # table -> the wedding columns to match
        self.weddings = weddings
        self.rows: dict[str, list[dict[str, str | None]]] = {t: [] for t in columns}

    async def prepare(self, schemas: Sequence[TableSchema], *, wedding: str | None = None,
                      point: str | None = None) -> None:
        return None

    def table(self, schema: TableSchema) -> contextlib.AbstractAsyncContextManager[TableWriter]:
        return self._table(schema)

    @contextlib.asynccontextmanager
    async def _table(self, schema: TableSchema) -> AsyncIterator[TableWriter]:
        yield _KeepWriter(self, schema)

    async def commit(self) -> None:
        return None

    async def abort(self) -> None:
        return None


class _KeepWriter:
    def __init__(self, target: KeepRows, schema: TableSchema) -> None:
        self.names = schema.names
        self.where = [self.names.index(c) for c in sorted(target.columns[schema.table])]
        self.weddings = target.weddings
        # the ids as their COPY text fields (what a line holds), for `write_copy`
        self.escaped = (None if target.weddings is None
                        else {copy_escape(w) for w in target.weddings})
        self.kept = target.rows[schema.table]

    async def write(self, rows: list[list[Any]]) -> None:
        for row in rows:
            if self.weddings is None or any(text(row[i]) in self.weddings for i in self.where):
                self.kept.append({n: text(v) for n, v in zip(self.names, row, strict=True)})

    async def write_copy(self, data: str | bytes, rows: int) -> None:
        """Rows as COPY text in the schema's column order (the restore's fast path): a
        line is split only as far as its wedding columns to be picked, and only the rows
        kept are unescaped whole (the same texts `write` keeps)."""
        lines = (data.decode() if isinstance(data, bytes) else data).split("\n")
        if lines and not lines[-1]:
            lines.pop()
        wanted = self.escaped
        last = max(self.where, default=0)
        for line in lines:
            if wanted is not None:
                fields = line.split("\t", last + 1)
                if not any(fields[i] in wanted for i in self.where):
                    continue
            self.kept.append(dict(zip(self.names, row_fields(line), strict=True)))


@dataclass(slots=True)
class _Found:
    dates: dict[str, date | None] | None = None  # None: the calendar was not restored
    vendors: dict[str, set[str]] | None = None  # None: no link, or its table not restored
    any_rows: bool = False


def _missing_columns(schema: TableSchema, columns: Iterable[str], what: str) -> None:
    lacking = [c for c in columns if c not in schema.names]
    if lacking:
        raise ReplayRefused(f"{what}: table {schema.table} has no column "
                            f"{', '.join(lacking)} in the archive (its columns: "
                            f"{', '.join(schema.names)})")


def _unrestored(found: _Found, cut: Lsn, exc: ReplayFailed, warnings: list[str]) -> _Found:
    warnings.append(f"the calendar and vendor tables could not be restored as of LSN {cut}: "
                    f"{exc}; wedding dates, tiers and vendors are unknown")
    return found


async def _dates_and_vendors(reads: _Reads, keyring: Keyring, facts: ArchiveFacts, *, cut: Lsn,
                             weddings: set[str], wedding: str | None, known: set[str],
                             calendar: PriorityConfig | None, link: VendorLink | None,
                             warnings: list[str],
                             policies: Mapping[str, ConflictPolicy] | None = None) -> _Found:
    """The calendar table and the vendor link's table restored as of *cut*, keeping the rows
    of *weddings* (with *wedding*: a wedding restore of that one)."""
    found = _Found()
    columns: dict[str, set[str]] = {}
    if calendar is not None and calendar.calendar:
        if calendar.weddings_table in known:
            columns.setdefault(calendar.weddings_table, set()).add(calendar.wedding_id_column)
        else:
            warnings.append(f"the calendar table {calendar.weddings_table} is not in the "
                            "archive: wedding dates and tiers are unknown (null)")
    elif calendar is not None:
        warnings.append("no wedding calendar is configured ([priority] weddings_table): "
                        "wedding dates and tiers are unknown (null)")
    if link is not None:
        if link.table in known:
            columns.setdefault(link.table, set()).add(link.wedding_column)
        else:
            warnings.append(f"the vendor link's table {link.table} is not in the archive: "
                            "no vendors are listed")
    prepared = None
    while columns:
        try:
            prepared = await prepare(reads, keyring, at=cut, tables=sorted(columns),
                                     wedding=wedding, allow_stale=True, facts=facts,
                                     policies=policies)
            break
        except ReplayRefused as exc:
            refused = [t for t in exc.tables if t in columns] or sorted(columns)
            for table in refused:
                del columns[table]
                what = ("wedding dates and tiers are unknown (null)"
                        if calendar is not None and table == calendar.weddings_table
                        else "no vendors are listed")
                warnings.append(f"{table} cannot be restored as of LSN {cut}: {exc}; {what}")
        except ReplayFailed as exc:
            return _unrestored(found, cut, exc, warnings)
    if prepared is None:
        return found
    if calendar is not None and calendar.weddings_table in columns:
        _missing_columns(prepared.schemas[calendar.weddings_table],
                         (calendar.wedding_id_column, calendar.wedding_date_column),
                         "[priority] the wedding calendar")
    if link is not None and link.table in columns:
        _missing_columns(prepared.schemas[link.table], (link.column, link.wedding_column),
                         "[impact] vendors")
    keep = KeepRows(columns, weddings | ({wedding} if wedding is not None else set()))
    try:
        await apply(prepared, keep, jobs=2)
    except ReplayRefused:
        if wedding is None:
            raise
        # A wedding restore refuses a wedding without a row at the point: none to keep.
    except ReplayFailed as exc:
        return _unrestored(found, cut, exc, warnings)
    if calendar is not None and calendar.weddings_table in columns:
        found.dates = {}
        for row in keep.rows[calendar.weddings_table]:
            wid = row[calendar.wedding_id_column]
            if wid is not None:
                found.dates[wid] = as_date(row[calendar.wedding_date_column])
    if link is not None and link.table in columns:
        found.vendors = {}
        for row in keep.rows[link.table]:
            wid, vendor = row[link.wedding_column], row[link.column]
            if wid is not None and vendor is not None:
                found.vendors.setdefault(wid, set()).add(vendor)
    found.any_rows = any(keep.rows.values())
    return found


# --- the command -----------------------------------------------------------------------------


async def impact(store: ObjectStore, keyring: Keyring, *, since: datetime,
                 until: datetime | None = None, tables: Sequence[str] | None = None,
                 wedding: str | None = None, destination: str | None = None,
                 calendar: PriorityConfig | None = None, vendors: VendorLink | None = None,
                 heartbeat_s: float = 10.0, today: Callable[[], date] | None = None,
                 policies: Mapping[str, ConflictPolicy] | None = None) -> ImpactReport:
    """The weddings touched by the changes committed in `[since, until]` (module
    docstring). *calendar*: the `[priority]` section (None: no dates or tiers); *vendors*:
    the `[impact]` vendor link; *policies*: the conflict rules by table; *today*: for the
    tiers (default: today in the calendar's time zone). Raises `ReplayRefused` for a window
    that cannot be asked (since after until, or entirely after the newest archived commit),
    a table or wedding the archive does not hold, and `ReplayFailed` for an object it cannot
    use."""
    started = time.perf_counter()
    since_us = epoch_us(since)
    until_us = None if until is None else epoch_us(until)
    if until_us is not None and since_us > until_us:
        raise ReplayRefused(f"--since {utc_text(since_us)} is after --until "
                            f"{utc_text(until_us)}")
    reads = _Reads(store)
    dest = await find_destination(reads, destination)
    checkpoint = await archive_checkpoint(reads, dest, keyring=keyring)
    archive = Archive(reads, keyring)
    records = [r for r in await archive.transactions() if r.commit_lsn < checkpoint]
    timeline = archive.timeline = Timeline.of(records)
    report_steps = {"transactions": time.perf_counter() - started}
    if not records:
        raise ReplayRefused(f"the archive of destination {dest} holds no commit below its "
                            f"checkpoint {checkpoint} yet: nothing to report")
    newest = max(records, key=lambda r: (r.commit_ts_us, int(r.commit_lsn)))
    newest_text = f"{utc_text(newest.commit_ts_us)} (LSN {newest.commit_lsn})"
    if since_us > newest.commit_ts_us:
        raise ReplayRefused(f"the window starts at {utc_text(since_us)}, after the newest "
                            f"archived commit {newest_text}: nothing archived is that recent "
                            "yet", nearest=newest.commit_lsn)
    end_us = newest.commit_ts_us if until_us is None else until_us
    report = ImpactReport(since_us, end_us, dest, wedding=wedding, vendor_link=vendors)
    oldest = min(records, key=lambda r: (r.commit_ts_us, int(r.commit_lsn)))
    if since_us < oldest.commit_ts_us:
        report.warnings.append(f"the archive begins at {utc_text(oldest.commit_ts_us)} (LSN "
                               f"{oldest.commit_lsn}): changes committed before it are not "
                               "in it")
    if until_us is not None and until_us > newest.commit_ts_us + heartbeat_s * 1e6:
        report.warnings.append(f"the newest archived commit is {newest_text}: changes "
                               "committed after it are not archived yet (the archive may be "
                               "behind)")

    listing = [info async for info in reads.list(SEGMENTS)]
    known = set(tables_of(listing)) | set(timeline.counts)
    selected = select_tables(sorted(known), tables)
    window = window_commits(records, since_us, end_us, selected)
    inside = [r.commit_lsn for r in records if since_us <= r.commit_ts_us <= end_us]
    try:
        gaps = await recorded_gaps(reads, keyring)
    except ValueError as exc:
        raise ReplayRefused(f"cannot read the recorded gaps: {exc}") from None
    if inside:
        report.from_lsn, report.to_lsn = min(inside), max(inside)
        for start, end in gaps:
            if start < report.to_lsn and end > report.from_lsn:
                report.warnings.append(f"the window overlaps the recorded gap {start}-{end}: "
                                       "changes committed there may be missing")

    tally = Tally(window, wedding)
    chosen = segments_for(listing, window)
    report.segments = len(chosen)

    async def one(key: str, table: str, size: int | None) -> None:
        if wedding is not None:
            data = await _fetch(reads, key, HEADER_FETCH_BYTES)
            header = _header_of(key, data, keyring)
            if header is not None and not header.may_hold_wedding(wedding):
                report.segments_skipped += 1
                return
            if size is not None and len(data) >= size:
                reads.used_whole()
            else:
                data = await _fetch(reads, key)
        else:
            data = await _fetch(reads, key)
        first = parse_segment_key(key).first
        lowest = window[table][0]
        _, found = archive.open_segment(key, data, lowest - 1 if lowest > first else None)
        for record in found:
            tally.add(table, record)

    mark = time.perf_counter()
    await run_bounded([partial(one, *c) for c in chosen], _READS_AT_ONCE)
    report_steps["window"] = time.perf_counter() - mark
    mark = time.perf_counter()
    if wedding is None:
        tally.check(timeline)

    touched = set(tally.weddings)
    if touched or wedding is not None:
        cut_at = [r.commit_lsn for r in records if r.commit_ts_us <= end_us]
        if cut_at:
            # The restore of the calendar and the vendor link plans from what was read
            # above (the transaction records above all), reading none of it again.
            facts = ArchiveFacts(dest, checkpoint, [
                *listing, *[info async for info in reads.list(SNAPSHOTS)]],
                await dead_letters(reads), gaps, archive, {})
            found = await _dates_and_vendors(
                reads, keyring, facts, cut=Lsn(max(cut_at)), weddings=touched,
                wedding=wedding, known=known | set(timeline.snapshots), calendar=calendar,
                link=vendors, warnings=report.warnings, policies=policies)
        else:
            found = _Found()
            report.warnings.append(f"nothing is archived at or before {utc_text(end_us)}: "
                                   "wedding dates, tiers and vendors are unknown")
        if wedding is not None and not touched:
            if not found.any_rows and found.dates is not None and calendar is not None:
                raise ReplayRefused(
                    f"wedding {wedding} matches nothing in the archive: no change in the "
                    f"window names it, and the calendar ({calendar.weddings_table}) has no "
                    f"row of it as of {utc_text(end_us)}")
            if found.dates is None:
                report.warnings.append(f"whether wedding {wedding} exists cannot be told "
                                       "without the calendar")
        _describe(tally.weddings.values(), found, calendar, today)
        report.calendar = (calendar.weddings_table
                           if calendar is not None and found.dates is not None else None)
    report.conflicts = await _conflicts(reads, keyring, selected, since_us, end_us, wedding,
                                        report.warnings)
    report.weddings = ordered(tally.weddings.values())
    report.unresolved = dict(sorted(tally.unresolved.items()))
    for table, counts in report.unresolved.items():
        if counts.truncates:
            report.warnings.append(f"{table} was truncated {counts.truncates} time(s) in the "
                                   "window: every wedding's rows in it went")
    report_steps["calendar"] = time.perf_counter() - mark
    report.steps_s = report_steps
    report.objects_read, report.headers_read = reads.objects, reads.headers
    report.bytes_read = reads.bytes
    report.seconds = time.perf_counter() - started
    return report


def _describe(weddings: Iterable[WeddingImpact], found: _Found,
              calendar: PriorityConfig | None, today: Callable[[], date] | None) -> None:
    """Each wedding's date, tier and vendors from what the restore found."""
    tiers = WeddingCalendar(calendar, today) if calendar is not None else None
    for w in weddings:
        if found.dates is not None and w.wedding_id in found.dates and tiers is not None:
            w.wedding_date = found.dates[w.wedding_id]
            w.tier = tiers.tier_for_date(w.wedding_date)
        if found.vendors is not None:
            w.vendors = sorted(found.vendors.get(w.wedding_id, ()))
