"""A replay from end to end: read the archive's facts, plan, restore every table in parallel.

`prepare()` does the reading a plan needs (the listing, the destination's checkpoint, the
transaction records, the table schemas, and for a wedding the segments' headers) and turns
the plan into one `TableJob` per table; `apply()` runs the jobs into a target and commits only
when every table succeeded. `replay()` is both, as the command runs them.

Choices (Debezium/pgBackRest users would expect them; docs/ARCHITECTURE.md, "Replay"):
- The schema of a restored table is its newest archived schema at or before the target; rows
  archived before a column was added get the column's missing value there (`attmissingval`,
  which the capture's DDL documents carry), NULL when the document has none.
- A table whose newest schema at the target says it was dropped (or renamed away) is left out
  of a whole-archive restore (the summary says so) and refused when asked for; one dropped
  and created again starts empty at its drop. A table rewritten by a DDL (`resnapshot`) is
  refused from the DDL until its next snapshot boundary (`plan`).
- The cut is by commit LSN (`plan`); `--at <time>` resolves to the last commit at or before it.
- Tables restore concurrently (`jobs` at once), each in its own transaction; the target
  makes them take effect together at the end (Postgres: staging tables moved or merged into
  place in one transaction, `targets`), or not at all.
- A time later than the newest archived commit by more than the capture's heartbeat interval
  is refused unless `allow_stale`; a wedding with no rows at the point is refused, nothing
  written.
- An override of the wedding-day guard is written to the archive (`audit/`, encrypted)
  before any table is restored.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from connectors.base import ObjectInfo, ObjectStore, run_bounded
from replicator.archive.layout import (
    RETENTION_FLOORS,
    SEGMENTS,
    SNAPSHOTS,
    audit_key,
    checkpoints_prefix,
    is_part_key,
    is_snapshot_key,
    parse_retention_floor,
    schemas_prefix,
)
from replicator.archive.merge import ConflictPolicy
from replicator.archive.part import PartCorrupt, read_part_header
from replicator.archive.reader import (
    Archive,
    ReplayFailed,
    current_rss_mb,
    dead_letters,
    destinations,
    recorded_gaps,
    schema_versions,
)
from replicator.archive.reader import checkpoint as archive_checkpoint
from replicator.archive.render import utc_text
from replicator.archive.segment import SegmentError, read_header
from replicator.archive.snapshot import read_snapshot_header
from replicator.crypto import Keyring, decrypt_stream, encrypt
from replicator.position import Lsn
from replicator.replay.engine import restore_table
from replicator.replay.plan import (
    At,
    Header,
    ReplayPlan,
    ReplayRefused,
    SchemaMark,
    check_fresh,
    plan,
    resolve_time,
    select_tables,
    tables_of,
)
from replicator.replay.swap import Override
from replicator.replay.table import TableJob, TableSchema, TableStats
from replicator.replay.targets import Target
from replicator.replay.wedding import restore_wedding

__all__ = ["Prepared", "ReplaySummary", "apply", "prepare", "replay"]

HEADER_FETCH_BYTES = 2 << 20  # enough for the first encrypted chunk (1 MiB) and its header
log = logging.getLogger("replicator.replay")
SchemaDocs = dict[str, list[tuple[Lsn, dict[str, Any]]]]


@dataclass(slots=True)
class Prepared:
    plan: ReplayPlan
    archive: Archive
    jobs: list[TableJob]
    destination: str
    schemas: dict[str, TableSchema]
    read_s: float = 0.0
    sizes: dict[str, int] = field(default_factory=dict)  # object name -> bytes, as listed
    facts: ArchiveFacts | None = None  # what was read to plan: `prepare(..., facts=)` again


@dataclass(slots=True)
class ArchiveFacts:
    """What `prepare` reads of a destination before it plans, kept so that further plans of
    the same restore (the steps of a tiered restore) read none of it again."""

    destination: str
    checkpoint: Lsn
    listing: list[ObjectInfo]
    parked: list[str]
    gaps: list[tuple[Lsn, Lsn]]
    archive: Archive
    docs: SchemaDocs
    headers: dict[str, Header] = field(default_factory=dict)  # fetched so far, by object


@dataclass(slots=True)
class ReplaySummary:
    target: Lsn
    target_time: str | None
    destination: str
    wedding: str | None
    tables: dict[str, TableStats] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    objects_read: int = 0
    objects_skipped: int = 0  # a wedding restore: objects whose header proved them irrelevant
    peak_rss_mb: float = 0.0  # sampled after every object and batch (engine.Archive)
    left_out: dict[str, str] = field(default_factory=dict)  # dropped tables, and why

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": str(self.target),
            "target_time": self.target_time,
            "destination": self.destination,
            "wedding": self.wedding,
            "rows": self.rows,
            "tables": {name: {"rows": s.rows, "base_rows": s.base_rows, "changes": s.changes,
                              "changed_keys": s.changed_keys, "segments": s.segments,
                              "segments_skipped": s.segments_skipped,
                              "duplicates": s.duplicates}
                       for name, s in sorted(self.tables.items())},
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / self.seconds) if self.seconds else None,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "objects_read": self.objects_read,
            "objects_skipped": self.objects_skipped,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "left_out": dict(sorted(self.left_out.items())),
        }

    def line(self) -> str:
        rate = f"{self.rows / self.seconds:,.0f} rows/s" if self.seconds else "-"
        what = f"wedding {self.wedding}" if self.wedding is not None else \
            f"{len(self.tables)} table(s)"
        when = f" (committed {self.target_time})" if self.target_time else ""
        return (f"restored {what} as of LSN {self.target}{when}: {self.rows:,} rows, "
                f"{self.bytes_read / 1e6:,.1f} MB read in {self.objects_read} objects"
                + (f" ({self.objects_skipped} skipped)" if self.objects_skipped else "")
                + ", "
                f"{self.bytes_written / 1e6:,.1f} MB written, {self.seconds:.2f} s, {rate}, "
                f"peak RSS {self.peak_rss_mb:,.0f} MB"
                + "".join(f"; left out {t}: {why}" for t, why in sorted(self.left_out.items())))


async def find_destination(store: ObjectStore, asked: str | None) -> str:
    names = await destinations(store)
    if asked is not None:
        if asked not in names:
            raise ReplayRefused(f"the store holds no checkpoint of destination {asked!r}"
                                f" (it has: {', '.join(sorted(names)) or 'none'})")
        return asked
    if not names:
        raise ReplayRefused(f"the store holds no checkpoint ({checkpoints_prefix()}"
                            "<destination>/): nothing in it is known to be complete yet, or "
                            "it is not an archive root")
    if len(names) > 1:
        raise ReplayRefused(f"the store holds checkpoints of several destinations "
                            f"({', '.join(sorted(names))}): choose one with --destination")
    return names.pop()


async def schema_documents(archive: Archive, tables: Sequence[str]) -> SchemaDocs:
    """Every archived schema document of *tables*: table -> [(from LSN, document)], oldest
    first."""
    versions = await run_bounded([partial(schema_versions, archive.store, t) for t in tables],
                                 16)
    keys = [(table, lsn, key) for table, found in zip(tables, versions, strict=True)
            for lsn, key in found]
    texts = await run_bounded([partial(archive.fetch, key) for _, _, key in keys], 16)
    docs: SchemaDocs = {t: [] for t in tables}
    for (table, lsn, _), data in zip(keys, texts, strict=True):
        docs[table].append((lsn, json.loads(data)))
    return docs


def schema_history(docs: SchemaDocs) -> dict[str, list[SchemaMark]]:
    """What the documents say of each table's drops and rewrites (`plan.SchemaMark`)."""
    out = {}
    for table, found in docs.items():
        ordered = sorted(found, key=lambda d: d[0])
        marks = [SchemaMark(lsn, bool(doc.get("dropped")), bool(doc.get("resnapshot")),
                            doc.get("renamed_to"), doc.get("command"))
                 for lsn, doc in ordered if doc.get("dropped") or doc.get("resnapshot")]
        if ordered and (ordered[0][1].get("created") or ordered[0][1].get("renamed_from")):
            marks.insert(0, SchemaMark(ordered[0][0], born=True))  # did not exist before
        out[table] = marks
    return out


def schema_at(docs: SchemaDocs, table: str, target: Lsn) -> TableSchema:
    """The table's newest archived schema at or below *target* (its oldest when none is)."""
    found = docs.get(table) or []
    if not found:
        where = schemas_prefix(table)
        raise ReplayFailed(f"the archive holds no schema of {table} ({where}): it was written "
                           "by a sink that did not archive schemas", object=where)
    chosen = [d for d in found if d[0] <= target] or found[:1]
    schema = TableSchema.from_json(chosen[-1][1])
    reborn = reborn_columns([TableSchema.from_json(doc) for _, doc in chosen])
    return dataclasses.replace(schema, reborn=reborn) if reborn else schema


def reborn_columns(history: Sequence[TableSchema]) -> dict[str, Lsn]:
    """The columns of the newest of *history* (a table's schemas, oldest first) that were
    dropped and added again under the same name, each with the LSN of the schema its
    present incarnation first appears in. A row image older than that holds the dropped
    column's value under the name (`TableSchema.reborn`). A column is followed back through
    its earlier names (renames); a schema that lacks it, with an older one that has it,
    makes it reborn. Without the capture's DDL documents the drop may not be archived as a
    schema of its own, and then it is not seen here."""
    if len(history) < 3:
        return {}
    current = history[-1]
    out: dict[str, Lsn] = {}
    for column in current.names:
        names = {column, *current.previous.get(column, ())}
        for i in range(len(history) - 2, -1, -1):
            if history[i].dropped:
                break  # the table was dropped there: what came before is another table
            if names & set(history[i].names):
                continue
            start = max((n + 1 for n in range(i) if history[n].dropped), default=0)
            if any(names & set(older.names) for older in history[start:i]):
                out[column] = history[i + 1].lsn
            break
    return out


async def _header(archive: Archive, key: str) -> Header:
    """A segment's or part's header from its first bytes: one ranged read, the first chunk
    decrypted."""
    try:
        data = await archive.store.get(key, end=HEADER_FETCH_BYTES)
        plain = next(decrypt_stream((data,), name=key, keyring=archive.keyring))
    except Exception:
        plain = await archive.fetch(key)
    try:
        if is_part_key(key):
            return read_part_header(plain)[0]
        if is_snapshot_key(key):
            return read_snapshot_header(plain)[0]
        return read_header(plain)
    except (SegmentError, PartCorrupt) as exc:
        raise ReplayFailed(f"object {key} has an unreadable header: {exc}", object=key) from None


def _naming_dead_letters(refused: ReplayRefused, parked: list[str], at: At, checkpoint: Lsn,
                         resolver: Callable[[datetime], Lsn] | None) -> ReplayRefused:
    """*refused*, naming the records parked as dead letters when the point asked is past the
    checkpoint: a parked record holds the checkpoint below its transaction (`sink.worker`)."""
    if not parked or isinstance(at, str):
        return refused  # the latest point is below the checkpoint
    if isinstance(at, datetime):
        if resolver is None:
            return refused
        try:
            target = Lsn(resolver(at))
        except (ReplayRefused, ValueError):
            return refused
    else:
        target = Lsn(at)
    if target < checkpoint:
        return refused
    shown = ", ".join(parked[:5]) + (f" and {len(parked) - 5} more" if len(parked) > 5 else "")
    return ReplayRefused(f"{refused}; the checkpoint is held back by records the sink could "
                         f"not decode, parked as dead letters: {shown}",
                         nearest=refused.nearest, tables=refused.tables)


async def prepare(store: ObjectStore, keyring: Keyring, *, at: At,
                  tables: Sequence[str] | None = None, wedding: str | None = None,
                  destination: str | None = None, allow_stale: bool = False,
                  heartbeat_s: float = 10.0, weddings: frozenset[str] | None = None,
                  label: str | None = None, facts: ArchiveFacts | None = None,
                  policies: Mapping[str, ConflictPolicy] | None = None) -> Prepared:
    """Read what the plan needs and plan. A time later than the newest archived commit by
    more than *heartbeat_s* is refused unless *allow_stale* (`plan.check_fresh`).
    *weddings*: restore the rows of these weddings (a `tiered` step; *label* names them),
    reading only the objects whose header says one of them may be inside. *facts*: an
    earlier `Prepared.facts` of the same destination, read again from nothing (its archive,
    the timeline and the counters included, is shared). *policies*: the conflict rules
    (`[conflicts]`) by table; a table without one: the latest commit wins across origins."""
    started = time.perf_counter()
    tables = None if tables is None else list(tables)  # read twice: for schemas, and by plan
    if facts is None:
        facts = await _read_facts(store, keyring, destination)
    dest, checkpoint, listing = facts.destination, facts.checkpoint, facts.listing
    parked, gaps, archive = facts.parked, facts.gaps, facts.archive
    timeline = archive.timeline
    resolver = partial(resolve_time, timeline.points) if isinstance(at, datetime) else None
    if isinstance(at, datetime) and not allow_stale:
        check_fresh(timeline.points, at, checkpoint, heartbeat_s)

    known = sorted(set(tables_of(listing)) | set(timeline.snapshots))
    chosen = select_tables(known, tables) if known else []
    wanted = [t for t in chosen if t not in facts.docs]
    if wanted:
        facts.docs.update(await schema_documents(archive, wanted))
    docs = {t: facts.docs[t] for t in chosen if t in facts.docs}
    history = schema_history(docs)
    headers: dict[str, Header] = {}
    try:
        if wedding is not None or weddings is not None:
            # Plan once without headers to learn which segments are in range, then read theirs.
            rough = plan(listing, at=at, checkpoint=checkpoint, tables=tables,
                         resolver=resolver, snapshots=timeline.snapshots, gaps=gaps,
                         history=history)
            keys = [k for t in rough.tables for k in t.objects if k not in facts.headers]
            fetched = await run_bounded([partial(_header, archive, k) for k in keys], 16)
            facts.headers.update(zip(keys, fetched, strict=True))
            headers = {k: facts.headers[k] for t in rough.tables for k in t.objects}
        the_plan = plan(listing, at=at, checkpoint=checkpoint, tables=tables, wedding=wedding,
                        headers=headers, resolver=resolver, snapshots=timeline.snapshots,
                        gaps=gaps, history=history)
    except ReplayRefused as exc:
        raise _naming_dead_letters(exc, parked, at, checkpoint, resolver) from None
    target = the_plan.target
    floor = max((f for f in (parse_retention_floor(i.key) for i in listing) if f is not None),
                default=Lsn(0))
    if target < floor:
        raise ReplayRefused(f"LSN {target} is before the oldest restorable point of this "
                            f"archive, {floor}: retention deleted what earlier points needed; "
                            f"restore at {floor} or later", nearest=floor)
    for table, why in the_plan.left_out:
        log.warning("%s is left out of the restore at %s: %s", table, target, why)

    bases: dict[str, Lsn] = {}
    for table_plan in the_plan.tables:
        if table_plan.base_kind in ("snapshot", "recreated") and table_plan.base is not None:
            bases[table_plan.table] = table_plan.base  # a compaction snapshot, or a drop
            continue
        after = table_plan.apply_after
        base = timeline.base(table_plan.table, at_or_after=0 if after is None else after + 1,
                             target=target)
        if base is None:
            snapshots = timeline.snapshots.get(table_plan.table, [])
            later = [Lsn(s) for s in snapshots if s > target]
            hint = (f"; restore at {later[0]} or later" if later
                    else "; the archive holds no complete snapshot of it")
            raise ReplayRefused(f"LSN {target} is before the oldest restorable point of "
                                f"{table_plan.table} (its first complete snapshot){hint}",
                                nearest=later[0] if later else None,
                                tables=(table_plan.table,))
        bases[table_plan.table] = base
    timeline.oldest = max([floor, *bases.values()])

    schemas = {t.table: schema_at(docs, t.table, target) for t in the_plan.tables}
    jobs = [TableJob(t.table, schemas[t.table], t.objects, bases[t.table], target,
                     wedding if weddings is None else (label or "the weddings"),
                     check_counts=wedding is None and weddings is None, headers=headers,
                     compacted=t.base_kind == "snapshot", cleared=t.base_kind == "recreated",
                     weddings=weddings, policy=(policies or {}).get(t.table))
            for t in the_plan.tables]
    return Prepared(the_plan, archive, jobs, dest, schemas, time.perf_counter() - started,
                    {info.key: info.size for info in listing}, facts)


async def _read_facts(store: ObjectStore, keyring: Keyring, destination: str | None
                      ) -> ArchiveFacts:
    dest = await find_destination(store, destination)
    checkpoint = await archive_checkpoint(store, dest, keyring=keyring)
    listing: list[ObjectInfo] = [info async for info in store.list(SEGMENTS)]
    listing += [info async for info in store.list(SNAPSHOTS)]
    listing += [info async for info in store.list(RETENTION_FLOORS)]  # what retention left
    parked = await dead_letters(store)
    try:
        gaps = await recorded_gaps(store, keyring)
    except ValueError as exc:
        raise ReplayRefused(f"cannot plan: {exc}") from None
    archive = Archive(store, keyring)
    await archive.read_timeline()
    return ArchiveFacts(dest, checkpoint, listing, parked, gaps, archive, {})


class Progress:
    """A one-line progress bar on a terminal: objects read, rows, throughput."""

    def __init__(self, archive: Archive, total_objects: int,
                 write: Callable[[str], None] | None) -> None:
        self.archive = archive
        self.total = max(total_objects, 1)
        self.rows = 0
        self.started = time.perf_counter()
        self._write = write
        self._shown = 0.0

    def add(self, rows: int) -> None:
        self.rows += rows
        now = time.perf_counter()
        if self._write is not None and now - self._shown >= 0.2:
            self._shown = now
            self.show()

    def show(self, end: str = "") -> None:
        if self._write is None:
            return
        done = min(self.archive.objects_read / self.total, 1.0)
        bar = "#" * int(done * 30)
        rate = self.rows / max(time.perf_counter() - self.started, 1e-9)
        self._write(f"\r[{bar:<30}] {self.archive.objects_read}/{self.total} objects "
                    f"{self.rows:,} rows {self.archive.bytes_read / 1e6:,.1f} MB "
                    f"{rate:,.0f} rows/s{end}")


async def apply(prepared: Prepared, target: Target, *, jobs: int = 4,
                progress: Callable[[str], None] | None = None,
                memory_budget_mb: float | None = None) -> ReplaySummary:
    """Restore every planned table into *target*; commit only if all succeed. With
    *memory_budget_mb*, stop (nothing committed) once the process's resident memory exceeds
    it while changed keys accumulate."""
    started = time.perf_counter()
    the_plan = prepared.plan
    archive = prepared.archive
    archive.memory_budget_mb = memory_budget_mb
    summary = ReplaySummary(the_plan.target, None, prepared.destination, the_plan.wedding,
                            left_out=dict(the_plan.left_out))
    ts = archive.timeline.times.get(int(the_plan.target))
    summary.target_time = utc_text(ts) if ts is not None else None
    await target.prepare([prepared.schemas[j.table] for j in prepared.jobs],
                         wedding=the_plan.wedding, point=str(the_plan.target))
    bar = Progress(archive, the_plan.count, progress)
    limit = asyncio.Semaphore(max(1, jobs))

    async def one(job: TableJob) -> TableStats:
        async with limit, target.table(job.schema) as writer:
            if job.wedding is not None:
                return await restore_wedding(archive, job, writer.write, bar.add,
                                             getattr(writer, "write_copy", None))
            return await restore_table(archive, job, writer.write, bar.add,
                                       getattr(writer, "write_copy", None),
                                       remover=getattr(writer, "remover", None))

    try:
        override = getattr(target, "override", None)
        if override is not None:  # recorded before anything changes
            await _record_override(archive, override)
        results = await asyncio.gather(*(one(job) for job in prepared.jobs))
        if the_plan.wedding is not None and not any(s.rows for s in results):
            raise ReplayRefused(f"wedding {the_plan.wedding} has no rows in the archive as of "
                                f"LSN {the_plan.target}: check the id (nothing was restored)")
    except BaseException:
        await target.abort()
        raise
    await target.commit()
    bar.show(end="\n")
    summary.tables = {s.table: s for s in results}
    summary.seconds = time.perf_counter() - started + prepared.read_s
    summary.bytes_read = archive.bytes_read
    summary.objects_read = archive.objects_read
    summary.objects_skipped = (sum(t.skipped_for_wedding for t in the_plan.tables)
                               + sum(s.segments_skipped for s in results))
    summary.bytes_written = target.bytes_written
    summary.peak_rss_mb = max(archive.peak_rss_mb, current_rss_mb())
    return summary


async def _record_override(archive: Archive, override: Override) -> None:
    """An override of the wedding-day guard as an `audit/` object of the archive."""
    key = audit_key(int(override.at.timestamp() * 1_000_000), override.id)
    await archive.store.put(key, encrypt(override.json(), key, archive.keyring))


async def replay(store: ObjectStore, keyring: Keyring, target: Target, *, at: At,
                 tables: Sequence[str] | None = None, wedding: str | None = None,
                 destination: str | None = None, jobs: int = 4,
                 progress: Callable[[str], None] | None = None,
                 memory_budget_mb: float | None = None, allow_stale: bool = False,
                 heartbeat_s: float = 10.0,
                 policies: Mapping[str, ConflictPolicy] | None = None) -> ReplaySummary:
    prepared = await prepare(store, keyring, at=at, tables=tables, wedding=wedding,
                             destination=destination, allow_stale=allow_stale,
                             heartbeat_s=heartbeat_s, policies=policies)
    return await apply(prepared, target, jobs=jobs, progress=progress,
                       memory_budget_mb=memory_budget_mb)


def plan_document(prepared: Prepared) -> dict[str, Any]:
    """`--dry-run --json`: the plan, with each table's base snapshot and schema."""
    doc = prepared.plan.to_dict()
    doc["destination"] = prepared.destination
    times = prepared.archive.timeline.times
    ts = times.get(int(prepared.plan.target))
    doc["target_time"] = utc_text(ts) if ts is not None else None
    for job in prepared.jobs:
        entry = doc["tables"][job.table]
        entry["base_snapshot"] = str(job.base)
        entry["schema_lsn"] = str(job.schema.lsn)
        entry["columns"] = [c.name for c in job.schema.columns]
        if job.schema.missing:
            entry["missing"] = dict(job.schema.missing)
    return doc

