"""The replay plan: which objects rebuild which tables as of which point, for replay, verify
and compaction. Everything here is pure: it works on a listing and on headers or
transaction records the caller already read, and never does I/O.

**The cut.** A plan's `target` is an LSN, and the restored state is every change whose commit
LSN is at or below it (the applier drops records past it from a segment that straddles it).
It is transaction-consistent by construction: a transaction's changes share its commit LSN.

**How far forward.** A destination's checkpoint (`sink.checkpoint`) is the *end* LSN of the
newest transaction complete there. The next transaction's commit record can start exactly at
that LSN (two commits written back to back, common under concurrent load), and that
transaction is not covered; PostgreSQL itself treats `confirmed_flush_lsn` the same way
(a transaction is skipped on restart only if its commit LSN is *below* it). So the
transactions a checkpoint `C` covers are those with a commit LSN below `C`, and the latest
recoverable point is `C - 1`; `at="latest"` means that point. A later point is refused.

**How far back.** A table can be rebuilt from its oldest full state: the oldest compaction
snapshot, or the first change segment, which holds the table's initial snapshot (op `r`)
rows. The name of a segment does not tell its ops; with the first segments' headers at hand
(`headers`), segments that hold no `r` rows are passed over, and the first one that does
marks the start (its first position: exact when the segment holds only snapshot rows).
Without a header, the table's first segment is taken to start with its snapshot, which holds
for an archive that retention has not trimmed. The oldest point of a plan is the newest of
its tables' oldest points; an earlier target is refused, naming the table and the point.

**Gaps.** A recorded gap `(from, to)` (the capture state's `gap/<from>-<to>`: changes between
the last transaction in Kafka and a new slot's consistent point may be missing) refuses every
target strictly inside it; the nearest earlier restorable point is its start. At `to` the
capture snapshotted every table again, so a table restored to `to` or later starts from that
re-snapshot (its earlier segments are left out: rows deleted during the gap must not come
back). This assumes the capture's `snapshot = "initial"` (the default); with `"never"` a gap
end has no re-snapshot, and no replay across it can be right.

**Snapshot parts.** A sink writes a flush of nothing but one table's snapshot rows at one LSN
as a part (`archive.part`, `snapshots/<table>/<lsn>/rows-<seq>-<seq>-<digest>.part`): planned
like a segment covering that one LSN. With *snapshots* (table -> the LSNs of its snapshot
boundary records, from the transaction records), a table's oldest point is its first complete
snapshot, and a table with no objects at all (empty at its snapshot, never changed) is
planned too.

**Snapshots.** Compaction writes `snapshots/<table>/<lsn>/part-<n>.snap` (`archive.snapshot`):
the full table state at `<lsn>`, in parts numbered from 0, and then, last, the manifest
`snapshots/<table>/<lsn>/manifest-<parts>.json`. Only a snapshot with its manifest counts (one
without is a compaction cut short, and is passed over); one whose manifest names a part the
listing lacks is refused, naming the part. A table starts from its newest snapshot at or
below the target, and then needs only the segments holding changes after it.

**Weddings.** A wedding restore leaves out a segment whose fetched header proves it cannot
matter to the wedding: the wedding is not among its ids (or not in their Bloom filter), and
it holds no truncate (which concerns every wedding) and no delete of unknown wedding (a delete
under the default replica identity carries only the key; the header counts them, and older
headers that do not are taken to have some when they hold any delete). A segment without a
fetched header is kept. The applier then reads a segment kept only for its unknown deletes
only if its filter of deleted keys may hold a key of the wedding.

**Schema history.** With *history* (table -> `SchemaMark`s, what its archived schema
documents say: `dropped`, `renamed_to`, `resnapshot`, `command`), a table whose newest document
at or below the target says it was dropped (or renamed away) is left out of a whole-archive
plan (`left_out`, with the reason) and refused when asked for by name. One dropped and created
again starts empty at its drop (base kind "recreated": nothing at or below the drop is read).
A table rewritten at `L` by a DDL the changes do not show (`resnapshot`) is exact again only
from its next snapshot boundary `L2 >= L` (the re-snapshot's rows, op `r` at `L2`, upsert
every row): a target in `[L, L2)` is refused, naming the table (`tables`), with `L - 1` (out
of any gap or other such window) as the nearest point; the windows count like gaps for every
nearest point suggested.

**Time cuts.** `resolve_time` turns a moment into the commit LSN of the last transaction
committed at or before it; `transaction_segments_for` says which transaction segments hold
the records it needs (few, when their headers are known). `plan(at=<datetime>)` takes the
resolution as a callable, e.g. `functools.partial(resolve_time, records)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, NamedTuple, Protocol

from connectors.base import ObjectInfo
from replicator.archive.layout import (
    SEGMENTS,
    SNAPSHOTS,
    TRANSACTIONS,
    SegmentKey,
    SegmentKind,
    SnapshotName,
    is_manifest_key,
    is_part_key,
    is_snapshot_key,
    manifest_key,
    parse_manifest_key,
    parse_part_key,
    parse_segment_key,
    parse_snapshot_key,
    snapshot_key,
)
from replicator.archive.part import PartHeader
from replicator.archive.segment import SegmentHeader
from replicator.archive.snapshot import SnapshotHeader
from replicator.errors import OperatorError
from replicator.events import Op
from replicator.position import Lsn

__all__ = [
    "LATEST", "PLAN_FORMAT", "At", "ReplayPlan", "ReplayRefused", "SchemaMark", "SnapshotName",
    "TablePlan", "check_fresh", "manifest_key", "parse_at", "parse_manifest_key",
    "parse_snapshot_key",
    "plan", "resolve_time", "select_tables", "snapshot_key", "tables_of",
    "transaction_segments_for",
]

LATEST: Final = "latest"
PLAN_FORMAT: Final = 1
At = Lsn | datetime | Literal["latest"]
BaseKind = Literal["archive-start", "snapshot", "resnapshot", "recreated"]
Listing = Iterable[str | ObjectInfo]
Header = SegmentHeader | PartHeader | SnapshotHeader

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_LSN_TEXT: Final = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")


class ReplayRefused(OperatorError):
    """The replay cannot be done as asked. `nearest` is the restorable point the message
    suggests (None when there is none); `tables`, when the refusal is about some tables only
    (no restorable state at the point), names them."""

    def __init__(self, message: str, *, nearest: Lsn | None = None,
                 tables: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.nearest = nearest
        self.tables = tables


@dataclass(frozen=True, slots=True)
class SchemaMark:
    """What one archived schema document (`schemas/<table>/<lsn>.json`) says of the table's
    history: from *lsn* on it is dropped (or renamed away), or its rows were rewritten by a
    DDL the changes do not show (exact again only from its next snapshot boundary)."""

    lsn: Lsn
    dropped: bool = False
    resnapshot: bool = False
    renamed_to: str | None = None
    command: str | None = None
    born: bool = False  # the table's first document: created (or renamed to this name) here

    def gone(self, table: str) -> str:
        if self.born:
            return f"table {table} was created at {self.lsn}, after the point"
        how = f"renamed to {self.renamed_to}" if self.renamed_to else "dropped"
        return f"table {table} was {how} at {self.lsn}"


_NEVER: Final = Lsn(2**64 - 1)


@dataclass(slots=True)
class _History:
    """The schema history's verdicts at a target, for the selected tables."""

    left_out: dict[str, str] = field(default_factory=dict)  # whole-archive plan: dropped
    refused: dict[str, SchemaMark] = field(default_factory=dict)  # asked for, and dropped
    drops: dict[str, Lsn] = field(default_factory=dict)  # dropped, then created again
    # table -> (rewrite LSN, its re-snapshot boundary or None, command), for every rewrite
    rewrites: dict[str, list[tuple[Lsn, Lsn | None, str | None]]] = field(default_factory=dict)


def _read_history(history: Mapping[str, Sequence[SchemaMark]], selected: Sequence[str],
                  target: Lsn, whole: bool, snapshots: Mapping[str, Sequence[int]] | None
                  ) -> _History:
    found = _History()
    for table in selected:
        marks = sorted(history.get(table, ()), key=lambda m: m.lsn)
        below = [m for m in marks if m.lsn <= target]
        if marks and marks[0].born and marks[0].lsn > target:  # not there yet
            if whole:
                found.left_out[table] = marks[0].gone(table)
            else:
                found.refused[table] = marks[0]
            continue
        if below and below[-1].dropped:
            if whole:
                found.left_out[table] = below[-1].gone(table)
            else:
                found.refused[table] = below[-1]
            continue
        drop = max((m.lsn for m in below if m.dropped), default=None)
        if drop is not None:
            found.drops[table] = drop
        boundaries = sorted((snapshots or {}).get(table, ()))
        for mark in marks:
            if mark.resnapshot and (drop is None or mark.lsn > drop):
                again = next((Lsn(b) for b in boundaries if b >= mark.lsn), None)
                found.rewrites.setdefault(table, []).append((mark.lsn, again, mark.command))
    return found


# --- time cuts -------------------------------------------------------------------------------


def _epoch_us(moment: datetime) -> int:
    if not isinstance(moment, datetime):
        raise TypeError(f"a moment is a datetime, not {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()} has no time zone: give one (e.g. +00:00 or Z)")
    return (moment - _EPOCH) // _MICROSECOND


def _format_us(us: int) -> str:
    return (_EPOCH + timedelta(microseconds=us)).isoformat()


class Commit(Protocol):
    """What a time cut reads of a transaction record (`TransactionRecord`, `Point`)."""

    @property
    def commit_lsn(self) -> int: ...

    @property
    def commit_ts_us(self) -> int: ...


def resolve_time(transactions: Iterable[Commit], moment: datetime) -> Lsn:
    """The commit LSN of the last transaction (in commit order) committed at or before
    *moment*: cut there, a restore holds every transaction up to it and none after it.

    The records may come in any order and repeat (segments overlap after a redelivery).
    The commit LSN, not the end LSN, is the cut: the next transaction's commit record can
    start exactly at a transaction's end LSN, and a cut there would take it in; and a
    snapshot's boundary record has an end LSN below its own. Raises `ReplayRefused` when no
    transaction committed at or before *moment*.
    """
    limit = _epoch_us(moment)
    best: Lsn | None = None
    earliest: Commit | None = None
    for record in transactions:
        if record.commit_ts_us <= limit:
            if best is None or record.commit_lsn > best:
                best = Lsn(record.commit_lsn)
        elif earliest is None or (record.commit_ts_us, record.commit_lsn) < (
                earliest.commit_ts_us, earliest.commit_lsn):
            earliest = record
    if best is None:
        after = (f"; the earliest is at {_format_us(earliest.commit_ts_us)} "
                 f"(LSN {Lsn(earliest.commit_lsn)})" if earliest is not None else "")
        raise ReplayRefused(f"no archived transaction committed at or before "
                            f"{moment.isoformat()}{after}")
    return Lsn(best)


def check_fresh(transactions: Iterable[Commit], moment: datetime, checkpoint: Lsn,
                heartbeat_s: float) -> None:
    """Refuse *moment* when it is later than the newest archived commit below *checkpoint* by
    more than *heartbeat_s*: a quiet database still commits a heartbeat that often, so the
    archive is behind, and a restore there would silently be older than asked."""
    limit = _epoch_us(moment)
    newest = max(((r.commit_ts_us, r.commit_lsn) for r in transactions
                  if r.commit_lsn < checkpoint), default=None)
    if newest is None or limit <= newest[0] + heartbeat_s * 1e6:
        return
    raise ReplayRefused(
        f"{moment.isoformat()} is later than the newest archived commit "
        f"({_format_us(newest[0])}, LSN {Lsn(newest[1])}) by more than the heartbeat interval "
        f"({heartbeat_s:g} s): the archive is behind, and the restore would be older than "
        f"asked; restore at LSN {Lsn(newest[1])}, or give --allow-stale",
        nearest=Lsn(newest[1]))


def transaction_segments_for(listing: Listing, moment: datetime,
                             headers: Mapping[str, SegmentHeader] | None = None
                             ) -> tuple[str, ...]:
    """The transaction segments whose records `resolve_time` needs for *moment*, in name
    order: all of them, less those whose header proves they cannot hold the answer: every
    record committed after *moment*, or every record below a commit LSN that another
    header proves is at or below the answer (a header whose commit times start at or before
    *moment* holds such a record at or after its first LSN, and at its last LSN when they
    also end by then)."""
    limit = _epoch_us(moment)
    known = headers or {}
    segments: list[tuple[str, Lsn]] = []
    for name in _names(listing):
        if name.startswith(TRANSACTIONS):
            key = _parse_segment(name, SegmentKind.TRANSACTIONS)
            _check_header(name, known.get(name), SegmentKind.TRANSACTIONS, "", key.first,
                          key.last)
            segments.append((name, key.last))
    segments.sort()
    bound = max(((h.last if h.max_commit_ts_us <= limit else h.first).commit_lsn
                 for name, _ in segments
                 if (h := known.get(name)) is not None and h.min_commit_ts_us <= limit),
                default=None)
    return tuple(name for name, last in segments
                 if not ((h := known.get(name)) is not None and h.min_commit_ts_us > limit)
                 and (bound is None or last >= bound))


def parse_at(text: str) -> At:
    """`--at` as given: `latest`, an LSN (`16/B374D848`), or an ISO 8601 time with a time
    zone (`2025-06-14T15:30:00+02:00`, `...Z`)."""
    text = text.strip()
    if text.lower() == LATEST:
        return LATEST
    if _LSN_TEXT.fullmatch(text):
        return Lsn.parse(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--at {text!r} is not 'latest', an LSN like 16/B374D848, or an ISO "
                         "8601 time like 2025-06-14T15:30:00+02:00") from None
    _epoch_us(moment)  # refuses a time without a zone
    return moment


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TablePlan:
    """One table: where it starts from, and the objects to read in order."""

    table: str
    base_kind: BaseKind  # archive-start: the table's first segment; snapshot: a compaction
    #                      snapshot; resnapshot: the snapshot taken at a recorded gap's end;
    #                      recreated: empty at `base`, where the table was dropped
    base: Lsn | None  # the LSN of the full state it starts from (None for archive-start)
    parts: tuple[str, ...]  # snapshot parts, in part order
    segments: tuple[str, ...]  # change segments, in position order
    skipped_for_wedding: int = 0

    @property
    def apply_after(self) -> Lsn | None:
        """Segment records at or below this are not applied (the base holds them)."""
        if self.base is None:
            return None
        return self.base if self.base_kind in ("snapshot", "recreated") else Lsn(self.base - 1)

    @property
    def objects(self) -> tuple[str, ...]:
        return self.parts + self.segments

    def to_dict(self) -> dict[str, Any]:
        after = self.apply_after
        return {
            "base": {"kind": self.base_kind, "lsn": _lsn(self.base)},
            "apply_after": _lsn(after),
            "objects": list(self.objects),
            "parts": len(self.parts),
            "segments": len(self.segments),
            "skipped_for_wedding": self.skipped_for_wedding,
        }


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """What `replay` reads, table by table, to restore the state at `target` (module
    docstring). `to_json()` is the `--dry-run --json` document; its keys are sorted."""

    requested: str  # `at` as asked: "latest", an LSN, or an ISO time
    target: Lsn  # every change with commit LSN <= target, nothing after it
    checkpoint: Lsn  # the destination's checkpoint the plan was checked against
    latest: Lsn  # the latest recoverable point: checkpoint - 1
    oldest: Lsn  # the oldest point restorable for every planned table
    wedding: str | None
    tables: tuple[TablePlan, ...]  # sorted by table name
    bytes: int | None = None  # total size of the objects, when the listing had sizes
    gaps: tuple[tuple[Lsn, Lsn], ...] = ()  # the recorded gaps (from, to) it planned around
    # Tables of a whole-archive plan left out because they were dropped (or renamed away) at
    # or before the target: (table, why), sorted.
    left_out: tuple[tuple[str, str], ...] = ()

    @property
    def count(self) -> int:
        return sum(len(t.objects) for t in self.tables)

    @property
    def objects(self) -> dict[str, tuple[str, ...]]:
        return {t.table: t.objects for t in self.tables}

    def table(self, name: str) -> TablePlan:
        for table in self.tables:
            if table.table == name:
                return table
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "at": self.requested,
            "target": str(self.target),
            "checkpoint": str(self.checkpoint),
            "latest": str(self.latest),
            "oldest": str(self.oldest),
            "wedding": self.wedding,
            "objects": self.count,
            "bytes": self.bytes,
            "gaps": [[str(start), str(end)] for start, end in self.gaps],
            "tables": {t.table: t.to_dict() for t in self.tables},
            # only when some table was dropped: the document stays as it was otherwise
            **({"left_out": dict(self.left_out)} if self.left_out else {}),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, ensure_ascii=False)


def _lsn(lsn: Lsn | None) -> str | None:
    return None if lsn is None else str(lsn)


class _Segment(NamedTuple):
    name: str
    first: Lsn
    last: Lsn


@dataclass(slots=True)
class _Archive:
    """One table's objects in the listing."""

    segments: list[_Segment]
    snapshots: dict[Lsn, dict[int, str]]  # compaction snapshots' parts, by LSN and number
    manifests: dict[Lsn, int] = field(default_factory=dict)  # complete ones: LSN -> parts


def _names(listing: Listing) -> Iterable[str]:
    for item in listing:
        yield item if isinstance(item, str) else item.key


def _parse_segment(name: str, kind: SegmentKind) -> SegmentKey:
    try:
        key = parse_segment_key(name)
    except ValueError as exc:
        raise ReplayRefused(f"cannot plan: object {name} is not a valid segment name ({exc})"
                            ) from None
    if key.kind is not kind:
        raise ReplayRefused(f"cannot plan: object {name} is not a {kind} segment")
    return key


def _check_header(name: str, header: Header | None, kind: SegmentKind, table: str,
                  first: Lsn, last: Lsn) -> None:
    if header is None:
        return
    if isinstance(header, PartHeader | SnapshotHeader):
        raise ReplayRefused(f"the header given for {name} is a snapshot part's")
    if (header.kind is not kind or header.table != table
            or header.first.commit_lsn != first or header.last.commit_lsn != last):
        raise ReplayRefused(f"the header given for {name} does not match its name (it "
                            f"describes {header.kind} of {header.table or 'transactions'} "
                            f"{header.first}-{header.last})")


def _read_listing(listing: Listing, headers: Mapping[str, Header]
                  ) -> tuple[dict[str, _Archive], dict[str, int | None]]:
    tables: dict[str, _Archive] = {}
    sizes: dict[str, int | None] = {}
    for item in listing:
        name = item if isinstance(item, str) else item.key
        size = None if isinstance(item, str) else item.size
        if name in sizes:
            sizes[name] = sizes[name] if size is None else size
            continue
        if name.startswith(SEGMENTS):
            key = _parse_segment(name, SegmentKind.CHANGES)
            _check_header(name, headers.get(name), SegmentKind.CHANGES, key.table, key.first,
                          key.last)
            tables.setdefault(key.table, _Archive([], {})).segments.append(
                _Segment(name, key.first, key.last))
        elif is_part_key(name):
            try:
                rows = parse_part_key(name)
            except ValueError as exc:
                raise ReplayRefused(f"cannot plan: object {name} is not a valid snapshot part "
                                    f"name ({exc})") from None
            tables.setdefault(rows.table, _Archive([], {})).segments.append(
                _Segment(name, rows.lsn, rows.lsn))
        elif is_snapshot_key(name) or is_manifest_key(name):
            try:
                found = (parse_snapshot_key(name) if is_snapshot_key(name)
                         else parse_manifest_key(name))
            except ValueError as exc:
                raise ReplayRefused(f"cannot plan: object {name} is not a valid snapshot object "
                                    f"name ({exc})") from None
            header = headers.get(name)
            if header is not None and header.table != found.table:
                raise ReplayRefused(f"the header given for {name} describes "
                                    f"{header.table or 'transactions'}, not {found.table}")
            archive = tables.setdefault(found.table, _Archive([], {}))
            if is_snapshot_key(name):
                archive.snapshots.setdefault(found.lsn, {})[found.number] = name
            else:
                archive.manifests[found.lsn] = found.number
        elif name.startswith(SNAPSHOTS):
            raise ReplayRefused(f"cannot plan: object {name} is not a valid snapshot object "
                                "name (snapshots/<table>/<lsn>/ rows-*.part, part-<n>.snap or "
                                "manifest-<parts>.json)")
        else:
            continue  # checkpoints/, transactions/, anything else: not table data
        sizes[name] = size
    for archive in tables.values():
        archive.segments.sort(key=lambda s: (s.first, s.last, s.name))
    return tables, sizes


def tables_of(listing: Listing) -> list[str]:
    """The tables whose data the listing holds, sorted."""
    return sorted(_read_listing(listing, {})[0])


def select_tables(known: Sequence[str], tables: Iterable[str] | None) -> list[str]:
    """*tables* (qualified, or unqualified when unambiguous) among *known*, qualified."""
    if not known:
        raise ReplayRefused("the archive holds no table data (no segments/ or snapshots/ "
                            "objects)")
    if tables is None:
        return list(known)
    chosen: set[str] = set()
    asked = list(tables)
    if not asked:
        raise ReplayRefused("no tables were selected")
    for name in asked:
        if name in known:
            chosen.add(name)
            continue
        matches = [k for k in known if k.endswith("." + name)]
        if len(matches) == 1:
            chosen.add(matches[0])
            continue
        what = (f"{name} is ambiguous ({', '.join(matches)})" if matches
                else f"the archive holds no table {name}")
        raise ReplayRefused(f"{what}; its tables are: {', '.join(known)}")
    return sorted(chosen)


def _oldest(archive: _Archive, headers: Mapping[str, Header],
            snapshots: Sequence[int] | None) -> Lsn | None:
    candidates = [min(archive.manifests)] if archive.manifests else []
    if snapshots is not None:  # the boundary records say where complete snapshots are
        return min([*candidates, *(Lsn(s) for s in snapshots)], default=None)
    for segment in archive.segments:
        header = headers.get(segment.name)
        if (header is None or isinstance(header, PartHeader | SnapshotHeader)
                or header.ops.get(Op.READ.value, 0) > 0):
            candidates.append(segment.first)
            break
    return min(candidates, default=None)


def _matters_to(header: Header | None, wedding: str) -> bool:
    if header is None:
        return True
    if isinstance(header, PartHeader | SnapshotHeader):
        return header.may_hold_wedding(wedding)
    unknown_deletes = (header.ops.get(Op.DELETE.value, 0) if header.unknown_deletes is None
                       else header.unknown_deletes)
    return (header.may_hold_wedding(wedding) or header.ops.get(Op.TRUNCATE.value, 0) > 0
            or unknown_deletes > 0)


def _parts(table: str, lsn: Lsn, parts: Mapping[int, str], count: int) -> tuple[str, ...]:
    for n in range(count):
        if n not in parts:
            raise ReplayRefused(f"the snapshot of {table} at {lsn} is missing its part "
                                f"{snapshot_key(table, lsn, n)} (its manifest "
                                f"{manifest_key(table, lsn, count)} names {count} parts)")
    return tuple(parts[n] for n in range(count))


def _table_plan(table: str, archive: _Archive, target: Lsn, gap_ends: Sequence[Lsn],
                wedding: str | None, headers: Mapping[str, Header],
                drop: Lsn | None = None) -> TablePlan:
    snapshot = max((lsn for lsn in archive.manifests if lsn <= target), default=None)
    resnapshot = max((end for end in gap_ends if end <= target), default=None)
    kind: BaseKind
    parts: tuple[str, ...] = ()
    if (drop is not None and (snapshot is None or drop >= snapshot)
            and (resnapshot is None or drop >= resnapshot)):
        kind, base, after = "recreated", drop, drop  # the old table's rows are gone
    elif resnapshot is not None and (snapshot is None or resnapshot > snapshot):
        kind, base, after = "resnapshot", resnapshot, Lsn(resnapshot - 1)
    elif snapshot is not None:
        kind, base, after = "snapshot", snapshot, snapshot
        parts = _parts(table, snapshot, archive.snapshots.get(snapshot, {}),
                       archive.manifests[snapshot])
    else:
        kind, base, after = "archive-start", None, None
    # The segments holding a change in (after, target]: none when the base is the target.
    segments = tuple(s.name for s in archive.segments
                     if s.first <= target and (after is None or after < min(target, s.last)))
    skipped = 0
    if wedding is not None:
        kept_parts = tuple(p for p in parts if _matters_to(headers.get(p), wedding))
        kept = tuple(s for s in segments if _matters_to(headers.get(s), wedding))
        skipped = len(parts) - len(kept_parts) + len(segments) - len(kept)
        parts, segments = kept_parts, kept
    return TablePlan(table, kind, base, parts, segments, skipped)


def _gaps(gaps: Iterable[tuple[int, int]]) -> list[tuple[Lsn, Lsn]]:
    checked = []
    for start, end in gaps:
        if end <= start:
            raise ValueError(f"gap {Lsn(start)}-{Lsn(end)} ends before it starts")
        checked.append((Lsn(start), Lsn(end)))
    return sorted(set(checked))


def plan(listing: Listing, *, at: At, checkpoint: Lsn,
         tables: Iterable[str] | None = None, wedding: str | None = None,
         gaps: Iterable[tuple[int, int]] = (),
         headers: Mapping[str, Header] | None = None,
         resolver: Callable[[datetime], Lsn] | None = None,
         snapshots: Mapping[str, Sequence[int]] | None = None,
         history: Mapping[str, Sequence[SchemaMark]] | None = None) -> ReplayPlan:
    """Plan a replay of the destination whose objects *listing* names (relative to its root,
    as `store.list("")` gives them: names, or `ObjectInfo`s, which add sizes).

    *at* is an `Lsn`, `"latest"` (the latest recoverable point) or an aware `datetime`, which
    *resolver* turns into an LSN (`functools.partial(resolve_time, records)`). *checkpoint*
    is the destination's overall checkpoint; *gaps* the recorded gaps `(from, to)`;
    *tables* a subset (qualified, or unqualified when unambiguous); *wedding* a wedding id;
    *headers* the headers already fetched, by object name (first segments: where a table's
    snapshot starts; any: which segments a wedding restore can skip). *history*: table ->
    what its archived schema documents say (`SchemaMark`): a table dropped at or before the
    target is left out of a whole-archive plan and refused when asked for; one dropped and
    created again starts empty at its drop; one rewritten at `L` is refused at points from
    `L` up to its next snapshot boundary.

    Raises `ReplayRefused` for a point past the checkpoint, inside a gap or before the
    oldest restorable point, for an unknown table, and for an object the plan cannot use.
    """
    known_headers = headers or {}
    archives, sizes = _read_listing(listing, known_headers)
    for table in snapshots or {}:  # a table empty at its snapshot and never changed since
        archives.setdefault(table, _Archive([], {}))
    selected = select_tables(sorted(archives), tables)
    gap_list = _gaps(gaps)
    latest = Lsn(checkpoint - 1) if checkpoint > 0 else None

    requested: str
    if isinstance(at, datetime):
        if resolver is None:
            raise ValueError("a cut by time needs a resolver (resolve_time over the "
                             "transaction records); or give an LSN")
        _epoch_us(at)
        requested = at.isoformat()
        target = Lsn(resolver(at))
        what = f"{requested} (LSN {target})"
    elif isinstance(at, str):
        if at != LATEST:
            raise ValueError(f"at={at!r}: give an Lsn, a datetime or 'latest' (parse_at reads "
                             "the text forms)")
        if latest is None:
            raise ReplayRefused(f"nothing is recoverable yet: the destination's checkpoint is "
                                f"{checkpoint}")
        requested, target = LATEST, latest
        what = f"the latest point (LSN {target})"
    elif isinstance(at, int):
        target = Lsn(at)  # refuses a bool
        requested = str(target)
        what = f"LSN {target}"
    else:
        raise TypeError(f"at must be an Lsn, a datetime or 'latest', not {type(at).__name__}")

    found = _read_history(history or {}, selected, target, tables is None, snapshots)
    # A rewrite's window [L, re-snapshot) is, for the nearest points suggested, like a gap.
    windows = [(Lsn(lsn - 1), again if again is not None else _NEVER)
               for t, marks in found.rewrites.items() for lsn, again, _ in marks if lsn > 0]
    if found.refused:
        table, mark = sorted(found.refused.items())[0]
        before = Lsn(mark.lsn - 1)
        own = _oldest(archives[table], known_headers,
                      None if snapshots is None else snapshots.get(table, ()))
        if mark.born:  # not created yet at the point: its first restorable state is later
            nearest = own
            for start, end in sorted(set(gap_list) | set(windows)):
                if nearest is not None and start < nearest < end:
                    nearest = end if end != _NEVER else None
            hint = (f"; restore at {nearest} or later, or leave it out (--tables)"
                    if nearest is not None else "; leave it out (--tables)")
        else:
            nearest = before if own is not None and own <= before else None
            for start, end in sorted(set(gap_list) | set(windows), reverse=True):
                if nearest is not None and start < nearest < end:
                    nearest = start if own is not None and start >= own else None
            hint = f"; restore at {nearest} or earlier" if nearest is not None else ""
        raise ReplayRefused(f"{mark.gone(table)}: it does not exist at {what}{hint}",
                            nearest=nearest, tables=(table,))
    selected = [t for t in selected if t not in found.left_out]
    if not selected:
        raise ReplayRefused(f"every table of the archive was dropped at or before {what}: "
                            + "; ".join(found.left_out.values()))

    oldest_by_table = {t: _oldest(archives[t], known_headers,
                                  None if snapshots is None else snapshots.get(t, ()))
                       for t in selected}
    never = [t for t, lsn in oldest_by_table.items() if lsn is None]
    if never:
        raise ReplayRefused(f"no restorable state of {', '.join(never)}: the archive holds "
                            "no snapshot of it (its first segments hold no snapshot rows)",
                            tables=tuple(never))
    oldest = max(lsn for lsn in oldest_by_table.values() if lsn is not None)

    def out_of_gaps(point: Lsn, later: bool) -> Lsn:
        """*point* moved to the edge (start, or end if *later*) of every gap it is inside."""
        moved = True
        while moved:
            moved = False
            for start, end in [*gap_list, *windows]:
                if start < point < end:
                    point, moved = (end if later else start), True
        return point

    def at_or_before(point: Lsn) -> Lsn | None:
        point = out_of_gaps(point, later=False)
        return point if point >= oldest else None

    def at_or_after(point: Lsn) -> Lsn | None:
        point = out_of_gaps(point, later=True)
        return point if latest is not None and point <= latest else None

    def suggest(point: Lsn | None, label: str) -> str:
        return (f"; the {label} is {point}" if point is not None
                else "; no earlier point is restorable")

    if latest is None or target > latest:
        nearest = at_or_before(latest) if latest is not None else None
        limit = (f"covers commits below {checkpoint}" if latest is not None
                 else "covers nothing yet")
        raise ReplayRefused(f"{what} is past the destination's durable checkpoint (it "
                            f"{limit}){suggest(nearest, 'latest recoverable point')}",
                            nearest=nearest)
    # Rewrite windows before the oldest point: a table created or renamed at L is also older
    # than its first snapshot there, and the window says why.
    rewritten = [(t, lsn, again, command) for t, marks in sorted(found.rewrites.items())
                 for lsn, again, command in marks if lsn <= target
                 and (again is None or again > target)]
    if rewritten:
        nearest = at_or_before(Lsn(min(lsn for _, lsn, _, _ in rewritten) - 1))
        reasons = [f"table {t} was rewritten by {command or 'a DDL'} at {lsn}; its rows are "
                   + (f"restorable again from {again} (its re-snapshot)" if again is not None
                      else "restorable again once its re-snapshot is archived")
                   for t, lsn, again, command in rewritten]
        raise ReplayRefused(f"{what} cannot be restored exactly: {'; '.join(reasons)}"
                            + (suggest(nearest, "nearest restorable earlier point")
                               if nearest is not None else ""),
                            nearest=nearest, tables=tuple(sorted({r[0] for r in rewritten})))

    if target < oldest:
        late = sorted(t for t, lsn in oldest_by_table.items() if lsn == oldest)
        nearest = at_or_after(oldest)
        hint = (f"; restore at {nearest} or later" if nearest is not None
                else "; no later point is restorable either")
        leave_out = (f", or leave {', '.join(late)} out with --tables"
                     if len(late) < len(selected) else "")
        raise ReplayRefused(f"{what} is before the oldest restorable point {oldest} of "
                            f"{', '.join(late)} (where its archive starts with a snapshot)"
                            f"{hint}{leave_out}", nearest=nearest, tables=tuple(late))
    for start, end in gap_list:
        if start < target < end:
            nearest = at_or_before(start)
            hint = suggest(nearest, "nearest restorable earlier point")
            raise ReplayRefused(f"{what} is inside the recorded gap {start}-{end}: changes "
                                f"there may be missing{hint}", nearest=nearest)

    gap_ends = [end for _, end in gap_list]
    planned = tuple(_table_plan(t, archives[t], target, gap_ends, wedding, known_headers,
                                found.drops.get(t))
                    for t in selected)
    planned_sizes = [sizes[name] for t in planned for name in t.objects]
    total = (None if any(s is None for s in planned_sizes)
             else sum(s for s in planned_sizes if s is not None))
    return ReplayPlan(requested, target, checkpoint, latest, oldest, wedding, planned, total,
                      tuple(gap_list), tuple(sorted(found.left_out.items())))
