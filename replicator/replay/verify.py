"""`verify`: a restore drill. Restore to a point and prove the result is right.

Checks, table by table:
1. **Against the transaction records.** The restore reads every change of the table up to the
   point; the changes it finds at each commit must be exactly as many as that commit's
   transaction record announced (none missing, none without a record), and their content
   digest (each change re-encoded, BLAKE2b of the Avro body with its `ts_ms` as 0, summed)
   must equal the one the capture recorded for the table (`avro.content_digest`; older
   transaction records cover the whole body, `avro.body_digest`; records written before digests were
   recorded, and changes archived with another envelope schema, are counted only). The
   restore is done in memory and reduced to a row count and an order-independent content
   hash (`render.TableHash`).
2. **Into a scratch database** (`scratch_dsn`, a server where verify may create a database):
   the same restore through `replay`'s Postgres path (CREATE TABLE, COPY, primary key) into
   a new database `replicator_verify_<hex>`, read back, hashed, compared; the database is
   dropped afterwards.
3. **Against the live database** (`against_dsn`): a temporary logical slot's exported snapshot
   shows exactly the transactions committed before its consistent point `C`, so it is the live
   state as of LSN `C - 1`. Verify reads the live tables inside that snapshot, waits (up to
   `wait_s`) until the destination's checkpoint covers `C - 1`, and restores exactly that
   point. `at` must then be `latest` (the live database can only be read as of now).

Both the live database and the scratch database are also checked for their **columns**
(`compare_columns`): each table's columns (name, `format_type` type, NOT NULL, default) must
be the archived schema's at the point; a column on one side only, or a different type, NOT
NULL or default, is a problem naming the column and both sides. Defaults are compared only
when the schema document records them (the capture's DDL documents do); a default the
scratch restore could not create (`PostgresTarget.skipped_defaults`) is a note, not a
problem.

Live rows are read as the capture reads them (COPY text through the capture's converters) and
encoded to archived values (`transport.avro.archived_values`), so both sides hash one form.
A table passes when every check made agrees: counts, hashes, and no archive problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from connectors.base import ObjectStore
from replicator.archive.merge import ConflictPolicy
from replicator.archive.reader import ReplayFailed
from replicator.archive.reader import checkpoint as archive_checkpoint
from replicator.archive.render import TableHash, utc_text
from replicator.crypto import Keyring
from replicator.position import Lsn
from replicator.replay.engine import restore_table
from replicator.replay.plan import LATEST, At, ReplayRefused
from replicator.replay.run import Prepared, find_destination, prepare
from replicator.replay.table import TableSchema
from replicator.replay.targets import HashTarget, PostgresTarget

__all__ = ["LiveColumn", "TableCheck", "VerifyReport", "compare_columns", "live_hashes",
           "read_columns", "verify"]


@dataclass(slots=True)
class TableCheck:
    table: str
    rows: int | None = None
    hash: str | None = None
    scratch_rows: int | None = None
    scratch_hash: str | None = None
    live_rows: int | None = None
    live_hash: str | None = None
    digests_checked: int = 0  # transactions whose content digest matched the archive's
    columns_checked: bool = False  # a database's columns were compared with the schema
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a failure

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": self.rows, "hash": self.hash,
                "scratch_rows": self.scratch_rows, "scratch_hash": self.scratch_hash,
                "live_rows": self.live_rows, "live_hash": self.live_hash,
                "digests_checked": self.digests_checked,
                "columns_checked": self.columns_checked, "problems": list(self.problems),
                "notes": list(self.notes)}


@dataclass(slots=True)
class VerifyReport:
    target: Lsn
    target_time: str | None
    destination: str
    tables: dict[str, TableCheck]
    against: bool = False
    scratch: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables.values())

    @property
    def differing(self) -> list[str]:
        return sorted(name for name, t in self.tables.items() if not t.ok)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "target": str(self.target), "target_time": self.target_time,
                "destination": self.destination, "against_live": self.against,
                "scratch": self.scratch, "differing": self.differing,
                "seconds": round(self.seconds, 3),
                "tables": {n: t.to_dict() for n, t in sorted(self.tables.items())}}

    def lines(self) -> list[str]:
        checks = ["transaction records"] + (["scratch database"] if self.scratch else []) + \
            (["live database"] if self.against else [])
        when = f" (committed {self.target_time})" if self.target_time else ""
        head = (f"verify {'PASSED' if self.ok else 'FAILED'} at LSN {self.target}{when} "
                f"against {', '.join(checks)}; {len(self.tables)} table(s), "
                f"{self.seconds:.2f} s")
        out = [head]
        for name, check in sorted(self.tables.items()):
            state = "ok" if check.ok else "DIFFERS"
            out.append(f"  {name}: {state}, {check.rows if check.rows is not None else '?'} "
                       f"rows, hash {(check.hash or '-')[:16]}, {check.digests_checked} "
                       "transaction digest(s) matched")
            out.extend(f"    - {p}" for p in check.problems)
            out.extend(f"    note: {n}" for n in check.notes)
        return out


# --- reading a database the way the capture does ---------------------------------------------


async def live_hashes(conn: psycopg.AsyncConnection[Any],
                      schemas: Sequence[TableSchema]) -> dict[str, TableHash]:
    """Count and hash *schemas*' tables through *conn* (already inside the transaction whose
    view is wanted), in each schema's column order."""
    from replicator.source.assembler import column_types
    from replicator.source.catalog import load_types, table_info
    from replicator.source.snapshot import snapshot_table
    from replicator.source.values import TypeRegistry
    from replicator.transport.avro import archived_values

    registry = TypeRegistry()
    await load_types(conn, registry)
    out: dict[str, TableHash] = {}
    for schema in schemas:
        info = await table_info(conn, schema.table)
        kinds = column_types(info.columns, registry)
        live = {name for name, _ in info.columns}
        missing = [c for c in schema.names if c not in live]
        if missing:
            raise _Mismatch(f"the live table has no column(s) {', '.join(missing)}")
        digest = out[schema.table] = TableHash()
        names = schema.names
        async for batch in snapshot_table(conn, info, registry, lsn=Lsn(0), db=""):
            for event in batch:
                values = archived_values(event.after or {}, kinds)
                digest.add([values.get(c) for c in names])
    return out


class _Mismatch(Exception):
    pass


@dataclass(frozen=True, slots=True)
class LiveColumn:
    """A column as a database's catalog shows it."""

    name: str
    type: str  # format_type
    not_null: bool
    default: str | None  # pg_get_expr of its default


_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
  AND a.attgenerated = ''
ORDER BY a.attnum
"""


async def read_columns(conn: psycopg.AsyncConnection[Any], table: str
                       ) -> list[LiveColumn] | None:
    """*table*'s columns (generated ones left out, as the capture leaves them out), or None
    when the database has no such table."""
    from replicator.events import split_qualified

    namespace, name = split_qualified(table)
    quoted = sql.Identifier(namespace, name).as_string(conn)
    cur = await conn.execute("SELECT to_regclass(%s)", (quoted,))
    row = await cur.fetchone()
    if row is None or row[0] is None:
        return None
    cur = await conn.execute(_COLUMNS, (quoted,))
    return [LiveColumn(n, t, bool(nn), d) for n, t, nn, d in await cur.fetchall()]


def compare_columns(schema: TableSchema, found: Sequence[LiveColumn] | None, where: str,
                    skipped_defaults: Mapping[str, str] | None = None
                    ) -> tuple[list[str], list[str]]:
    """The differences between *schema* (archived, at `schema.lsn`) and the columns *found*
    in *where* ("the live database", "the scratch database"): (problems, notes). Defaults are
    compared only when the schema document records them; one in *skipped_defaults* (column
    -> expression: the restore could not create it) missing from *where* is a note."""
    archived = f"the archive's schema (at {schema.lsn})"
    if found is None:
        return [f"{where} has no table {schema.table}"], []
    problems: list[str] = []
    notes: list[str] = []
    ours = {c.name: c for c in schema.columns}
    theirs = {c.name: c for c in found}
    for extra in found:
        if extra.name not in ours:
            problems.append(f"column {extra.name} ({extra.type}) is in {where} and not in "
                            f"{archived}")
    skipped = skipped_defaults or {}
    for column in schema.columns:
        other = theirs.get(column.name)
        if other is None:
            problems.append(f"column {column.name} ({column.type}) is in {archived} and not "
                            f"in {where}")
            continue
        if other.type != column.type:
            problems.append(f"column {column.name}: type {other.type} in {where}, "
                            f"{column.type} in {archived}")
        if other.not_null != column.not_null:
            problems.append(f"column {column.name}: {_null(other.not_null)} in {where}, "
                            f"{_null(column.not_null)} in {archived}")
        if not schema.defaults_known or other.default == column.default:
            continue
        if column.name in skipped and other.default is None:
            notes.append(f"column {column.name}: its default {column.default} was not created "
                         f"in {where} (the target could not create it)")
        else:
            problems.append(f"column {column.name}: default {_default(other.default)} in "
                            f"{where}, {_default(column.default)} in {archived}")
    return problems, notes


def _null(not_null: bool) -> str:
    return "NOT NULL" if not_null else "nullable"


def _default(expression: str | None) -> str:
    return "none" if expression is None else expression


@contextlib.asynccontextmanager
async def _live_snapshot(dsn: str) -> AsyncIterator[tuple[Lsn, psycopg.AsyncConnection[Any]]]:
    """A connection showing exactly what committed before a temporary slot's consistent point."""
    from replicator.source.slot import create_slot

    name = f"wedsync_verify_{secrets.token_hex(6)}"
    conn = await psycopg.AsyncConnection.connect(dsn)
    try:
        async with create_slot(dsn, name, temporary=True) as created:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            await conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                sql.Literal(created.snapshot_name)))
        yield created.consistent_point, conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def _scratch_database(server_dsn: str) -> AsyncIterator[str]:
    name = f"replicator_verify_{secrets.token_hex(6)}"
    admin = await psycopg.AsyncConnection.connect(server_dsn, autocommit=True)
    try:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            params = conninfo_to_dict(server_dsn)
            params["dbname"] = name
            yield make_conninfo("", **params)
        finally:
            await admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
    finally:
        await admin.close()


# --- the drill -------------------------------------------------------------------------------


async def _restore_hashes(prepared: Prepared, report: VerifyReport) -> None:
    target = HashTarget()
    for job in prepared.jobs:
        check = report.tables[job.table]
        try:
            async with target.table(job.schema) as writer:
                stats = await restore_table(prepared.archive,
                                            dataclasses.replace(job, check_digests=True),
                                            writer.write)
        except ReplayFailed as exc:
            check.problems.append(f"restore failed: {exc}")
            continue
        check.digests_checked = stats.digests_checked
        digest = target.hashes[job.table]
        check.rows, check.hash = digest.rows, digest.hexdigest()


async def _scratch(prepared: Prepared, scratch_dsn: str, report: VerifyReport) -> None:
    jobs = [j for j in prepared.jobs if report.tables[j.table].ok]
    if not jobs:
        return
    async with _scratch_database(scratch_dsn) as dsn:
        target = PostgresTarget(dsn)
        try:
            await target.prepare([j.schema for j in jobs])
            for job in jobs:
                async with target.table(job.schema) as writer:
                    await restore_table(prepared.archive, job, writer.write)
            await target.commit()
        except ReplayFailed as exc:
            await target.abort()
            for job in jobs:
                report.tables[job.table].problems.append(f"scratch restore failed: {exc}")
            return
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            columns = {j.table: await read_columns(conn, j.table) for j in jobs}
            hashes = await live_hashes(conn, [j.schema for j in jobs])
    for job in jobs:
        check = report.tables[job.table]
        problems, notes = compare_columns(job.schema, columns[job.table],
                                          "the scratch database",
                                          target.skipped_defaults.get(job.table))
        check.columns_checked = True
        check.problems.extend(problems)
        check.notes.extend(notes)
        got = hashes[job.table]
        check.scratch_rows, check.scratch_hash = got.rows, got.hexdigest()
        if (check.scratch_rows, check.scratch_hash) != (check.rows, check.hash):
            check.problems.append(
                f"the scratch database holds {check.scratch_rows} rows (hash "
                f"{check.scratch_hash[:16]}), the restore {check.rows} (hash "
                f"{(check.hash or '')[:16]})")


def _compare_live(check: TableCheck, live: TableHash | None, problem: str | None) -> None:
    if problem is not None:
        check.problems.append(f"live database: {problem}")
        return
    assert live is not None
    check.live_rows, check.live_hash = live.rows, live.hexdigest()
    if (check.live_rows, check.live_hash) != (check.rows, check.hash):
        check.problems.append(
            f"the live database holds {check.live_rows} rows (hash {check.live_hash[:16]}), "
            f"the restore {check.rows} (hash {(check.hash or '')[:16]})")


async def verify(store: ObjectStore, keyring: Keyring, *, at: At = LATEST,
                 tables: Sequence[str] | None = None, destination: str | None = None,
                 scratch_dsn: str | None = None, against_dsn: str | None = None,
                 wait_s: float = 120.0,
                 policies: Mapping[str, ConflictPolicy] | None = None) -> VerifyReport:
    started = time.perf_counter()
    if against_dsn is None:
        prepared = await prepare(store, keyring, at=at, tables=tables, destination=destination,
                                 policies=policies)
        report = _report(prepared)
        await _restore_hashes(prepared, report)
    else:
        if at != LATEST:
            raise ReplayRefused("with --against, verify compares with the live database as of "
                                "now: give --at latest")
        async with _live_snapshot(against_dsn) as (consistent, conn):
            point = Lsn(consistent - 1)
            await _wait_checkpoint(store, keyring, destination, consistent, wait_s)
            prepared = await prepare(store, keyring, at=point, tables=tables,
                                     destination=destination, policies=policies)
            report = _report(prepared)
            report.against = True
            differ: dict[str, list[str]] = {}
            try:
                hashable = []  # the tables lacking none of the archived columns
                for job in prepared.jobs:
                    found = await read_columns(conn, job.table)
                    differ[job.table] = compare_columns(job.schema, found,
                                                        "the live database")[0]
                    if found is not None and set(job.schema.names) <= {c.name for c in found}:
                        hashable.append(job.schema)
                live: dict[str, TableHash] | None = await live_hashes(conn, hashable)
                problem = None
            except (_Mismatch, psycopg.Error) as exc:
                live, problem = None, str(exc).strip().splitlines()[0]
        await _restore_hashes(prepared, report)
        for name, check in report.tables.items():
            if check.ok and (name in (live or {}) or problem is not None):
                _compare_live(check, (live or {}).get(name), problem)
            if name in differ:
                check.columns_checked = True
                check.problems.extend(f"live database: {p}" for p in differ[name])
    if scratch_dsn is not None:
        report.scratch = True
        await _scratch(prepared, scratch_dsn, report)
    report.seconds = time.perf_counter() - started
    return report


def _report(prepared: Prepared) -> VerifyReport:
    ts = prepared.archive.timeline.times.get(int(prepared.plan.target))
    return VerifyReport(prepared.plan.target, utc_text(ts) if ts is not None else None,
                        prepared.destination,
                        {j.table: TableCheck(j.table) for j in prepared.jobs})


async def _wait_checkpoint(store: ObjectStore, keyring: Keyring, destination: str | None,
                           consistent: Lsn,
                           wait_s: float) -> None:
    """Until the destination's checkpoint covers every commit below *consistent*."""
    dest = await find_destination(store, destination)
    deadline = time.monotonic() + wait_s
    while True:
        checkpoint = await archive_checkpoint(store, dest, keyring=keyring)
        if checkpoint >= consistent:
            return
        if time.monotonic() > deadline:
            raise ReplayRefused(
                f"the live database was read as of LSN {Lsn(consistent - 1)}, and destination "
                f"{dest}'s checkpoint is still {checkpoint} after {wait_s:.0f} s: is the "
                f"service running and keeping up?")
        await asyncio.sleep(0.5)
