"""Compaction: fold each table's base and its changes up to a point into a new snapshot, so
that a restore at or after that point reads the snapshot and only the changes after it
(so the cost of a replay stays bounded however long the archive grows). It is a restore
(`engine.restore_table`, the same merge and checks) whose rows are written back to the store
as a compaction snapshot (`archive.snapshot`) instead of to a database; pgBackRest users know
it as taking a new full backup from the archive.

Steps, per table, in this order (a crash anywhere leaves the archive as it was, plus objects
nothing reads):
1. plan the restore at the point (`--at`, default the latest recoverable point);
2. pass over a table whose snapshot is already at that point, or that has fewer than
   *min_changes* changes (and *min_changes_ratio* of its rows) since its last compaction
   snapshot (little to gain); a table still based on the capture's snapshot is compacted at
   once, whatever its changes;
3. pass over a table with parts but no manifest at that point: another run may be writing
   them (parts of a run cut short are never read; they stay until deleted by hand);
4. restore the table into a `SnapshotWriter` (rows spread over parts by wedding; the number of
   parts from the bytes the restore reads, `part_bytes` each) and put every part;
5. put the manifest, last: from then on replay and verify start from the snapshot.
Nothing older is deleted: retention decides that (a point before the snapshot still needs
the segments).

A table dropped at or before the point, or rewritten by a DDL and not yet re-snapshotted
(`plan`), is passed over with the reason; rows archived before a column was added are
written with the column's missing value (`table.Output`), so the snapshot holds them filled.

A table whose primary key has a column of a type a snapshot cannot key exactly (other than
integers, text, uuid and numeric) is passed over, with the reason in the summary.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from connectors.base import ObjectStore
from replicator.archive.layout import (
    SEGMENTS,
    SNAPSHOTS,
    is_manifest_key,
    is_snapshot_key,
    manifest_key,
    snapshot_key,
    snapshot_prefix,
)
from replicator.archive.merge import ConflictPolicy
from replicator.archive.reader import Archive
from replicator.archive.snapshot import SnapshotHeader, SnapshotWriter, manifest
from replicator.archive.timeline import LsnColumn
from replicator.crypto import Keyring, encrypt
from replicator.position import Lsn
from replicator.replay.engine import restore_table
from replicator.replay.plan import LATEST, At, ReplayRefused, select_tables, tables_of
from replicator.replay.run import Prepared, prepare
from replicator.replay.table import Rows, TableJob, TableSchema

__all__ = ["CompactSummary", "TableCompaction", "compact", "key_kinds"]

logger = logging.getLogger(__name__)

PART_BYTES = 8 << 20  # archive bytes read per snapshot part written
MAX_PARTS = 4096

_KINDS = {"bigint": "long", "integer": "long", "smallint": "long", "int8": "long",
          "int4": "long", "int2": "long", "text": "string", "uuid": "uuid"}


def key_kinds(schema: TableSchema) -> tuple[str, ...] | None:
    """How each primary-key column's values are archived (`archive.snapshot.KEY_KINDS`), or
    None when one is of a type a snapshot cannot key exactly."""
    types = {c.name: c.type.lower() for c in schema.columns}
    kinds = []
    for name in schema.primary_key:
        type_ = types.get(name, "")
        kind = _KINDS.get(type_)
        if kind is None and type_.startswith(("character varying", "varchar", "character(",
                                              "char(")):
            kind = "string"
        if kind is None and type_.startswith("numeric"):
            kind = "numeric"
        if kind is None:
            return None
        kinds.append(kind)
    return tuple(kinds) if kinds else None


@dataclass(slots=True)
class TableCompaction:
    table: str
    lsn: Lsn
    done: bool = False
    reason: str | None = None  # why it was passed over
    rows: int = 0
    changes: int = 0  # changes folded in since the table's previous base
    parts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"lsn": str(self.lsn), "done": self.done, "reason": self.reason,
                "rows": self.rows, "changes": self.changes, "parts": self.parts,
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "seconds": round(self.seconds, 3)}


@dataclass(slots=True)
class CompactSummary:
    target: Lsn
    destination: str
    tables: list[TableCompaction] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"target": str(self.target), "destination": self.destination,
                "seconds": round(self.seconds, 3),
                "tables": {t.table: t.to_dict() for t in self.tables}}

    def line(self) -> str:
        done = [t for t in self.tables if t.done]
        rows = sum(t.rows for t in done)
        written = sum(t.bytes_written for t in done)
        return (f"compacted {len(done)} of {len(self.tables)} table(s) at LSN {self.target}: "
                f"{rows:,} rows in {sum(t.parts for t in done)} part(s), "
                f"{written / 1e6:,.1f} MB written, {self.seconds:.2f} s")


async def compact(store: ObjectStore, keyring: Keyring, *, at: At = LATEST,
                  tables: Sequence[str] | None = None, destination: str | None = None,
                  min_changes: int = 0, min_changes_ratio: float = 0.0,
                  part_bytes: int = PART_BYTES,
                  policies: Mapping[str, ConflictPolicy] | None = None) -> CompactSummary:
    """Write a compaction snapshot of each table at *at* (module docstring); a table with
    fewer changes since its base than *min_changes*, or than *min_changes_ratio* times its
    rows at the base, is passed over. *policies*: the conflict rules by table, as a restore
    applies them (`run.prepare`). Raises what `replay` raises (`ReplayRefused`,
    `ReplayFailed`) for the archive's problems."""
    started = time.perf_counter()
    prepared, unrestorable = await _prepare(store, keyring, at, tables, destination, policies)
    target = prepared.plan.target
    summary = CompactSummary(target, prepared.destination)
    archive = prepared.archive
    unrestorable.update(prepared.plan.left_out)  # dropped at or before the point
    for table, why in sorted(unrestorable.items()):
        summary.tables.append(TableCompaction(table, target, reason=why))
        logger.info("compaction of %s passed over: %s", table, why)
    existing = {key for key in prepared.sizes if key.startswith(SNAPSHOTS)}
    for job, table_plan in zip(prepared.jobs, prepared.plan.tables, strict=True):
        result = TableCompaction(job.table, target)
        summary.tables.append(result)
        counts = archive.timeline.counts.get(job.table) or LsnColumn()
        boundaries = set(archive.timeline.snapshots.get(job.table, ()))
        result.changes = sum(n for lsn, n in counts.between(job.first_change, int(target))
                             if lsn not in boundaries)
        kinds = key_kinds(job.schema)
        # The thresholds count from a compaction snapshot; a table still based on the
        # capture's snapshot gets its first one at once (it then restores, and restores one
        # wedding, much faster: whole COPY text, parts by wedding).
        needed = min_changes if table_plan.base_kind == "snapshot" else 0
        if min_changes_ratio > 0 and table_plan.base_kind == "snapshot" \
                and table_plan.base != target:
            rows = await _base_rows(prepared, job)
            needed = max(needed, math.ceil(min_changes_ratio * rows))
        if table_plan.base_kind == "snapshot" and table_plan.base == target:
            result.reason = "its snapshot is already at this point"
        elif result.changes < needed:
            result.reason = (f"{result.changes} change(s) since its snapshot, fewer than the "
                             f"{needed} asked (--min-changes {min_changes}, "
                             f"--min-changes-ratio {min_changes_ratio:g})")
        elif kinds is None:
            result.reason = ("its primary key has a column of a type a snapshot cannot key "
                             "exactly (only integers, text, varchar, uuid and numeric)")
        elif unfinished := _unfinished(existing, job.table, target):
            result.reason = (f"{unfinished} part(s) of a compaction at this point have no "
                             "manifest: another run may be writing them (or one was cut "
                             "short); compact at another point")
        if result.reason is not None:
            logger.info("compaction of %s passed over: %s", job.table, result.reason)
            continue
        assert kinds is not None
        read = sum(prepared.sizes.get(key, 0) for key in job.segments)
        parts = min(MAX_PARTS, max(1, math.ceil(read / max(part_bytes, 1))))
        table_started = time.perf_counter()
        read_before = archive.bytes_read
        await _compact_table(archive, job, kinds, parts, read, result)
        result.bytes_read = archive.bytes_read - read_before
        result.seconds = time.perf_counter() - table_started
        result.done = True
        logger.info("compacted %s at %s: %d rows in %d part(s), %d changes folded",
                    job.table, target, result.rows, result.parts, result.changes)
    summary.seconds = time.perf_counter() - started
    return summary


async def _prepare(store: ObjectStore, keyring: Keyring, at: At, tables: Sequence[str] | None,
                   destination: str | None, policies: Mapping[str, ConflictPolicy] | None,
                   ) -> tuple[Prepared, dict[str, str]]:
    """`prepare` for the tables that can be restored at *at*; the others (no snapshot of them
    at that point yet), each with the reason. Refused when none can."""
    wanted: list[str] | None = None if tables is None else list(tables)
    unrestorable: dict[str, str] = {}
    while True:
        try:
            prepared = await prepare(store, keyring, at=at, tables=wanted,
                                     destination=destination, policies=policies)
            return prepared, unrestorable
        except ReplayRefused as exc:
            if not exc.tables:
                raise
            if wanted is None or any("." not in name for name in wanted):
                listing = [info.key async for info in store.list(SEGMENTS)]
                listing += [info.key async for info in store.list(SNAPSHOTS)]
                wanted = select_tables(tables_of(listing), wanted)
            remaining = [name for name in wanted if name not in exc.tables]
            if not remaining or len(remaining) == len(wanted):
                raise
            unrestorable.update(dict.fromkeys(exc.tables, str(exc)))
            wanted = remaining


async def _base_rows(prepared: Prepared, job: TableJob) -> int:
    """The table's rows at its compaction snapshot, as its manifest counts them."""
    prefix = snapshot_prefix(job.table, job.base)
    manifests = [k for k in prepared.sizes if k.startswith(prefix) and is_manifest_key(k)]
    if not manifests:
        return 0
    doc = json.loads(await prepared.archive.fetch(manifests[0]))
    return int(doc.get("rows", 0))


def _unfinished(existing: set[str], table: str, lsn: Lsn) -> int:
    """How many parts of a compaction at *lsn* without a manifest the listing holds."""
    prefix = snapshot_prefix(table, lsn)
    mine = [key for key in existing if key.startswith(prefix)]
    if any(is_manifest_key(key) for key in mine):
        return 0
    return sum(1 for key in mine if is_snapshot_key(key))


async def _compact_table(archive: Archive, job: TableJob, kinds: tuple[str, ...],
                         parts: int, folded_bytes: int, result: TableCompaction) -> None:
    store, keyring = archive.store, archive.keyring
    writer = SnapshotWriter(table=job.table, lsn=job.target, columns=job.schema.names,
                            key=job.schema.primary_key, key_kinds=kinds, parts=parts)

    async def refuse(rows: Rows) -> None:
        raise AssertionError("compaction writes lines only")

    async def add(rows: list[str], keys: list[str], weddings: list[str]) -> None:
        writer.add(rows, keys, weddings)

    headers: list[SnapshotHeader] = []
    with writer:
        await restore_table(archive, job, refuse, emit_lines=add)
        for n, data, header in writer.parts():
            key = snapshot_key(job.table, job.target, n)
            sealed = encrypt(data, key, keyring)
            await store.put(key, sealed)
            result.bytes_written += len(sealed)
            headers.append(header)
    result.rows, result.parts = writer.rows, len(headers)
    doc = manifest(table=job.table, lsn=job.target, headers=headers,
                   created_at=datetime.now(UTC).isoformat(), folded_objects=len(job.segments),
                   folded_bytes=folded_bytes)
    key = manifest_key(job.table, job.target, len(headers))
    sealed = encrypt(doc, key, keyring)
    await store.put(key, sealed)
    result.bytes_written += len(sealed)

