"""Where restored rows go: a Postgres database (COPY), files (JSONL, CSV, Parquet), or a hash.

Every target works in two steps, so that a failed replay leaves nothing half-done:
`open_table` / `write` / `close_table` for each table (tables in parallel), then `commit()`
once every table succeeded, or `abort()`.

- Postgres: each table gets its own connection and transaction, into a staging schema
  `replicator_restore_<run>_<n>` (one per namespace): `CREATE TABLE` from the archived schema
  (types, NOT NULL, and each column's DEFAULT as the schema document gives it, each in a
  savepoint: a default the target cannot create, such as `nextval('x_seq'::regclass)` of a
  sequence it lacks, is left out with a warning and recorded in `skipped_defaults`),
  `COPY ... FROM STDIN` in text format, then the primary key (built once
  over the loaded rows, which is faster than maintaining it, and which refuses duplicate
  keys), committed there. `commit()` then puts every table in place in one transaction
  (`swap.Swap`) and drops the staging schemas; `abort()` drops them. So a failed replay
  changes nothing in the target's tables, whatever table failed when. A run holds an
  advisory lock while its staging schemas exist; the next replay into the database drops
  the staging schemas of runs whose lock nobody holds (a replay killed with -9 cannot clean
  up after itself), with a warning. A table that already
  exists is refused up front, unless `replace_existing`, which replaces its rows in place
  (`swap`), after the wedding-day guard. A database that does not exist is refused
  (`TargetMissing`), unless `create_database`.
- Files: `<directory>/<table>.<jsonl|csv|parquet>`, the qualified name percent-encoded as in
  the archive's object names (a leading `.` too) and checked to resolve inside the
  directory; written 0600 as `.<name>.partial`, fsynced, renamed at the end, and the
  directory fsynced; a directory the replay creates is 0700. Existing files are refused
  unless `replace_existing`.
  JSONL: one object per row (`render.json_value`: numeric as exact text, json columns as
  documents). CSV: a header line, Postgres's text forms, NULL as an empty unquoted field and
  the empty string as `""` (what `COPY ... CSV` reads back). Parquet: typed columns where the
  type maps (integers, floats, booleans, bytea, date, timestamp[tz] in microseconds), the
  Postgres text otherwise (numeric keeps its exact text); an infinite date or timestamp,
  which Parquet cannot hold, is written as null.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final, Protocol, TextIO
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from replicator.archive.reader import ReplayFailed
from replicator.archive.render import (
    FLOAT_TYPES,
    INT_TYPES,
    TableHash,
    copy_line,
    json_value,
    text,
    typed,
)
from replicator.config import PriorityConfig
from replicator.errors import ReplicatorError
from replicator.events import RESTORE_STAGING_PREFIX, split_qualified
from replicator.replay.plan import ReplayRefused
from replicator.replay.swap import (
    Override,
    Swap,
    fk_order,
    guard,
    missing_columns,
    relations,
    wedding_equals,
    write_audit_row,
)
from replicator.replay.table import TableSchema

__all__ = ["FORMATS", "CommitUnknown", "FileTarget", "HashTarget", "PostgresTarget", "Target",
           "TargetMissing", "is_dsn"]

FORMATS: Final = ("jsonl", "csv", "parquet")
log = logging.getLogger("replicator.replay")

#: The advisory-lock class of replay runs (with the run's hash): held while a run's staging
#: schemas exist.
_RUN_LOCK = 0x57454453
_STAGING_PATTERN = f"^{RESTORE_STAGING_PREFIX}[0-9a-f]{{10}}_[0-9]+$"


def is_dsn(to: str) -> bool:
    """A Postgres connection string (a `postgres[ql]://` URI, or `key=value` pairs libpq
    accepts), as opposed to a directory (which may hold a `=`: `out/a=b`)."""
    if to.startswith(("postgresql://", "postgres://")):
        return True
    if "=" not in to:
        return False
    import psycopg

    try:
        conninfo_to_dict(to)
    except psycopg.ProgrammingError:
        return False
    return True


class TargetMissing(ReplayRefused):
    """The target database does not exist (exit 2)."""


class CommitUnknown(ReplicatorError):
    """The final commit was sent and not confirmed: whether the restore took effect is
    unknown."""


class TableWriter(Protocol):
    async def write(self, rows: list[list[Any]]) -> None: ...


class Target(Protocol):
    bytes_written: int

    async def prepare(self, schemas: Sequence[TableSchema], *, wedding: str | None = None,
                      point: str | None = None) -> None: ...
    def table(self, schema: TableSchema) -> contextlib.AbstractAsyncContextManager[TableWriter]: ...
    async def commit(self) -> None: ...
    async def abort(self) -> None: ...


# --- Postgres --------------------------------------------------------------------------------


class PostgresTarget:
    """Rows into a Postgres database (module docstring). *calendar*: where the target's
    weddings and their dates are, and how each table's rows lead to their wedding (the
    configuration's `[priority]` section); *override_reason*: change existing tables on a
    wedding day anyway (recorded, `guard`); *create_database*: create a missing database."""

    def __init__(self, dsn: str, *, replace_existing: bool = False,
                 override_reason: str | None = None, calendar: PriorityConfig | None = None,
                 create_database: bool = False) -> None:
        self.dsn = dsn
        self.replace_existing = replace_existing
        self.override_reason = override_reason
        self.calendar = calendar or PriorityConfig()
        self.create_database = create_database
        self.override: Override | None = None  # set by prepare when the guard was overridden
        self.bytes_written = 0
        self._open: list[Any] = []  # connections holding a table's open transaction
        self._run = uuid.uuid4().hex[:10]
        self._staging: dict[str, str] = {}  # namespace -> its staging schema
        self._holder: Any = None  # the connection holding this run's advisory lock
        self._plan: Swap | None = None
        # table -> column -> the default expression the target could not create
        self.skipped_defaults: dict[str, dict[str, str]] = {}

    @property
    def database(self) -> str:
        return str(conninfo_to_dict(self.dsn).get("dbname") or "(default)")

    async def _connect(self, *, autocommit: bool = False) -> Any:
        import psycopg

        try:
            return await psycopg.AsyncConnection.connect(self.dsn, autocommit=autocommit)
        except psycopg.OperationalError as exc:
            message = _first_line(exc)
            if f'database "{self.database}" does not exist' in message:
                if self.create_database:
                    await self._create_database()
                    return await self._connect(autocommit=autocommit)
                raise TargetMissing(f"the target database {self.database} does not exist: "
                                    "create it, or give --create-database") from None
            raise ReplayFailed(f"cannot connect to the target database: {message}") from None

    async def _create_database(self) -> None:
        import psycopg
        from psycopg import sql

        self.create_database = False
        server = make_conninfo(self.dsn, dbname="postgres")
        try:
            async with await psycopg.AsyncConnection.connect(server, autocommit=True) as conn:
                await conn.execute(sql.SQL("CREATE DATABASE {}").format(
                    sql.Identifier(self.database)))
        except psycopg.Error as exc:
            raise ReplayFailed(f"cannot create the target database {self.database}: "
                               f"{_first_line(exc)}") from None
        log.warning("created the target database %s", self.database)

    async def prepare(self, schemas: Sequence[TableSchema], *, wedding: str | None = None,
                      point: str | None = None) -> None:
        """Check the target (tables that exist, their columns and keys, foreign keys, the
        wedding-day guard); record an override; then create the staging schemas."""
        from psycopg import sql

        conn = await self._connect(autocommit=True)
        try:
            swap, oids = await self._inspect(conn, schemas, wedding)
            if oids and not self.replace_existing:
                raise ReplayRefused(
                    f"the target database already has {', '.join(sorted(oids.values()))}: "
                    "restore into an empty database, or give --replace-existing to replace "
                    + ("the wedding's rows in them" if wedding is not None else "their rows")
                    + " (in one transaction at the end: a failed replay changes nothing)")
            for oid, table in oids.items():
                swap.missing[table] = await missing_columns(conn, oid, swap.schemas[table])
            swap.changed = fk_order(sorted(oids.values()), await relations(conn, oids))
            await self._checked(conn, swap)
            if swap.changed:
                why = await self._guard(conn, swap)
                if why is not None:
                    assert self.override_reason is not None
                    self.override = Override(self.override_reason, why, tuple(swap.changed),
                                             wedding, point, self.database)
                    await write_audit_row(conn, self.override)
            await self._hold_run()
            await self._clear_abandoned(conn)
            namespaces = sorted({split_qualified(s.table)[0] for s in schemas})
            for n, namespace in enumerate(namespaces):
                staging = f"{RESTORE_STAGING_PREFIX}{self._run}_{n}"
                await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(staging)))
                self._staging[namespace] = staging
            self._plan = swap
        finally:
            await conn.close()

    async def _checked(self, conn: Any, swap: Swap) -> None:
        """What a kind of restore checks or prepares in the target once its tables are
        known, on prepare's connection (autocommit); nothing for a restore."""

    async def _guard(self, conn: Any, swap: Swap) -> str | None:
        """The wedding-day guard before changing existing tables (`swap.guard`)."""
        return await guard(conn, self.calendar, swap.changed, self.override_reason)

    async def _hold_run(self) -> None:
        """Hold this run's advisory lock on a connection of its own until the run ends: a
        replay that was killed leaves its staging schemas, and the lock, gone with its
        connection, tells the next replay they are abandoned (`_clear_abandoned`)."""
        self._holder = await self._connect(autocommit=True)
        await self._holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))",
                                   (_RUN_LOCK, self._run))

    async def _clear_abandoned(self, conn: Any) -> None:
        """Drop the staging schemas of replays that ended without cleaning up (killed, or
        their connection lost): those whose run's advisory lock nobody holds."""
        from psycopg import sql

        rows = await (await conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname ~ %s ORDER BY nspname",
            (_STAGING_PATTERN,))).fetchall()
        runs: dict[str, list[str]] = {}
        for (name,) in rows:
            runs.setdefault(name.split("_")[2], []).append(name)
        for run, names in runs.items():
            if run == self._run:
                continue
            locked = await (await conn.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_RUN_LOCK, run))).fetchone()
            if not locked[0]:
                continue  # a replay that is running
            try:
                for name in names:
                    await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                        sql.Identifier(name)))
                log.warning("dropped the staging schemas %s, left by a replay that did not "
                            "finish", ", ".join(names))
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))",
                                   (_RUN_LOCK, run))

    async def _release_run(self) -> None:
        holder, self._holder = self._holder, None
        if holder is not None:
            with contextlib.suppress(Exception):
                await holder.close()

    async def _inspect(self, conn: Any, schemas: Sequence[TableSchema], wedding: str | None
                       ) -> tuple[Swap, dict[int, str]]:
        """What the final transaction will do, and the existing tables it changes (oid ->
        name)."""
        swap = Swap(wedding, {s.table: s for s in schemas})
        oids: dict[int, str] = {}
        for schema in schemas:
            cur = await conn.execute("SELECT to_regclass(%s)::oid", (_quoted(schema.table),))
            row = await cur.fetchone()
            if row is None or row[0] is None:
                continue
            swap.existing.add(schema.table)
            if wedding is not None:
                where = await self._wedding_rows(conn, schema.table, wedding)
                if where is None:
                    swap.unlinked.add(schema.table)
                    continue
                swap.filters[schema.table] = where
            oids[int(row[0])] = schema.table
        return swap, oids

    async def _wedding_rows(self, conn: Any, table: str, wedding: str) -> Any:
        """The condition on `t` that picks the wedding's rows of *table* in the target (the
        wedding id is the one parameter), or None when the calendar names no link. The id is
        compared in the column's type where that picks the same rows (`swap.wedding_equals`):
        the column's index then serves every statement of the final transaction."""
        from psycopg import sql

        c = self.calendar
        if table == c.weddings_table:
            return await wedding_equals(conn, "t", table, c.wedding_id_column, wedding)
        link = c.tables.get(table)
        if link is None:
            return None
        if link.parent is None:
            return await wedding_equals(conn, "t", table, link.column, wedding)
        return sql.SQL("t.{} IN (SELECT p.{} FROM {} p WHERE {})").format(
            sql.Identifier(link.column), sql.Identifier(link.parent_key),
            _identifier(link.parent),
            await wedding_equals(conn, "p", link.parent, link.parent_wedding_column, wedding))

    def _staged(self, table: str) -> Any:
        from psycopg import sql

        namespace, name = split_qualified(table)
        return sql.Identifier(self._staging[namespace], name)

    @contextlib.asynccontextmanager
    async def table(self, schema: TableSchema):  # type: ignore[no-untyped-def]
        """The table's rows into its staging table, committed there when done."""
        from psycopg import sql

        conn = await self._connect()
        self._open.append(conn)
        name = self._staged(schema.table)
        try:
            columns = sql.SQL(", ").join(
                sql.SQL("{} {}{}").format(sql.Identifier(c.name), sql.SQL(c.type),
                                          sql.SQL(" NOT NULL" if c.not_null else ""))
                for c in schema.columns)
            # The staging table of an existing table is UNLOGGED: its rows reach the table by
            # the final transaction, and logical decoding (a live database's capture) never
            # sees them twice.
            unlogged = self._plan is not None and schema.table in self._plan.existing
            await conn.execute(sql.SQL("CREATE {}TABLE {} ({})").format(
                sql.SQL("UNLOGGED " if unlogged else ""), name, columns))
            if not unlogged:  # an existing table keeps its own definitions
                await self._set_defaults(conn, schema, name)
            writer = _CopyWriter(self, conn, schema, name)
            try:
                yield writer
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await writer.finish(exc)
                raise
            await writer.finish()
            if schema.primary_key:
                await conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
                    name, sql.SQL(", ").join(sql.Identifier(c) for c in schema.primary_key)))
            if unlogged:
                # Statistics for the final transaction's joins with the live table: without
                # them the planner guesses a thousand rows and reads the whole live table.
                await conn.execute(sql.SQL("ANALYZE {}").format(name))
            await conn.commit()  # into the staging schema: the target's tables are untouched
        except Exception as exc:
            import psycopg

            if isinstance(exc, psycopg.Error):
                raise ReplayFailed(f"restoring {schema.table} into the target database failed: "
                                   f"{_first_line(exc)}") from None
            raise

    async def _set_defaults(self, conn: Any, schema: TableSchema, name: Any) -> None:
        """Each column's default from the schema document, each in a savepoint: one the
        target cannot create is skipped with a warning (module docstring)."""
        import psycopg
        from psycopg import sql

        for column in schema.columns:
            if column.default is None:
                continue
            await conn.execute("SAVEPOINT replay_default")
            try:
                await conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}").format(
                    name, sql.Identifier(column.name), sql.SQL(column.default)))
            except psycopg.Error as exc:
                await conn.execute("ROLLBACK TO SAVEPOINT replay_default")
                self.skipped_defaults.setdefault(schema.table, {})[column.name] = column.default
                log.warning("%s: column %s is restored without its default %s, which the "
                            "target cannot create (%s)", schema.table, column.name,
                            column.default, _first_line(exc))
            else:
                await conn.execute("RELEASE SAVEPOINT replay_default")

    async def commit(self) -> None:
        """Move every staged table into place in one transaction (module docstring)."""
        assert self._plan is not None, "prepare() first"
        await self._final(functools.partial(self._plan.run, staged=self._staged))

    async def _final(self, work: Callable[[Any], Awaitable[None]]) -> None:
        """*work* on one connection, the staging schemas dropped, and one commit: the final
        transaction every Postgres restore ends with (a replay, a tiered step, a rollback).
        On a failure nothing of it stays, and the staging schemas are dropped."""
        import psycopg
        from psycopg import sql

        await self._close()
        conn = await self._connect()
        try:
            try:
                if self._plan is not None and self._plan.wedding is not None:
                    # One wedding's rows: parallel workers cost more to start (milliseconds
                    # each, on a busy server) than the statements take.
                    await conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
                await work(conn)
                for name in self._staging.values():
                    await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                        sql.Identifier(name)))
            except psycopg.Error as exc:
                raise ReplayFailed(f"moving the restored rows into place failed: "
                                   f"{_first_line(exc)}") from None
            try:
                await conn.commit()
            except psycopg.OperationalError as exc:
                raise CommitUnknown(
                    f"the target database did not confirm the final commit "
                    f"({_first_line(exc)}): whether the restore took effect is unknown; check "
                    f"the target, and drop the schemas replicator_restore_{self._run}_* if "
                    "they are left") from None
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.rollback()
            await conn.close()
            await self._drop_staging()
            await self._release_run()
            raise
        await conn.close()
        self._staging = {}
        await self._release_run()

    async def abort(self) -> None:
        for conn in self._open:
            with contextlib.suppress(Exception):
                await conn.rollback()
        await self._close()
        await self._drop_staging()
        await self._release_run()

    async def _drop_staging(self) -> None:
        from psycopg import sql

        if not self._staging:
            return
        try:
            conn = await self._connect(autocommit=True)
            try:
                for staging in self._staging.values():
                    await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                        sql.Identifier(staging)))
            finally:
                await conn.close()
        except Exception as exc:  # the restore's own error matters more
            log.warning("could not drop the staging schemas %s: %s",
                        ", ".join(self._staging.values()), _first_line(exc))
        self._staging = {}

    async def _close(self) -> None:
        for conn in self._open:
            with contextlib.suppress(Exception):
                await conn.close()
        self._open = []


class _CopyWriter:
    """One table's rows into its new table, by `COPY ... FROM STDIN` (opened at the first
    write); `remove_keys` ends the COPY and removes rows, and the next write opens another."""

    def __init__(self, target: PostgresTarget, conn: Any, schema: TableSchema,
                 name: Any) -> None:
        from psycopg import sql

        self._target, self._conn, self._schema = target, conn, schema
        self._name = name  # the table's staging table
        self._copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
            self._name, sql.SQL(", ").join(sql.Identifier(c.name) for c in schema.columns))
        self._cursor: Any = None
        self._context: Any = None  # the cursor's copy() context, while a COPY is open
        self._copy: Any = None

    async def _started(self) -> Any:
        if self._copy is None:
            self._cursor = self._conn.cursor()
            self._context = self._cursor.copy(self._copy_sql)
            self._copy = await self._context.__aenter__()
        return self._copy

    async def finish(self, exc: BaseException | None = None) -> None:
        """End the open COPY: done, or (*exc*) failed, which the server is told."""
        context, self._context, self._copy = self._context, None, None
        if context is not None:
            try:
                await context.__aexit__(None if exc is None else type(exc), exc,
                                        None if exc is None else exc.__traceback__)
            finally:
                await self._cursor.close()

    async def write(self, rows: list[list[Any]]) -> None:
        data = "".join([copy_line(row) for row in rows]).encode()
        self._target.bytes_written += len(data)
        await (await self._started()).write(data)

    async def write_copy(self, text: str | bytes, rows: int) -> None:
        """Rows already in COPY text format, in the table's column order."""
        data = text.encode() if isinstance(text, str) else text
        self._target.bytes_written += len(data)
        await (await self._started()).write(data)

    @property
    def remover(self) -> _CopyWriter:
        """This writer can remove rows it loaded (`engine.Remover`)."""
        return self

    async def remove_keys(self, keys: list[str]) -> list[list[str | None]]:
        """Delete the rows loaded so far whose key text (COPY-escaped, key columns joined by
        U+001F) is in *keys*; their columns as text. The keys go to a temporary table and
        one hash join deletes the rows (the table has no index yet)."""
        from psycopg import sql

        await self.finish()
        conn, schema = self._conn, self._schema
        key_columns = sql.SQL(", ").join(sql.Identifier(c) for c in schema.primary_key)
        await conn.execute(sql.SQL(
            "CREATE TEMPORARY TABLE replay_removed_keys ON COMMIT DROP AS "
            "SELECT {} FROM {} WITH NO DATA").format(key_columns, self._name))
        async with conn.cursor() as cur, cur.copy("COPY replay_removed_keys FROM STDIN") as copy:
            for start in range(0, len(keys), 10_000):
                lines = "\n".join(keys[start:start + 10_000]).replace("\x1f", "\t") + "\n"
                await copy.write(lines.encode())
        await conn.execute("ANALYZE replay_removed_keys")
        await conn.execute("SET LOCAL enable_nestloop = off")
        match = sql.SQL(" AND ").join(
            sql.SQL("t.{0} = k.{0}").format(sql.Identifier(c)) for c in schema.primary_key)
        returning = sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(c.name))
                                       for c in schema.columns)
        async with conn.cursor() as cur:
            await cur.execute(sql.SQL("DELETE FROM {} AS t USING replay_removed_keys AS k "
                                      "WHERE {} RETURNING {}").format(
                                          self._name, match, returning))
            rows = await cur.fetchall()
        await conn.execute("RESET enable_nestloop")
        await conn.execute("DROP TABLE replay_removed_keys")
        return [list(row) for row in rows]

    async def remove_all(self) -> None:
        from psycopg import sql

        await self.finish()
        await self._conn.execute(sql.SQL("TRUNCATE {}").format(self._name))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _quoted(table: str) -> str:
    schema, name = split_qualified(table)
    return '"' + schema.replace('"', '""') + '"."' + name.replace('"', '""') + '"'


def _identifier(table: str) -> Any:
    from psycopg import sql

    return sql.Identifier(*split_qualified(table))


# --- files -----------------------------------------------------------------------------------


class FileTarget:
    def __init__(self, directory: str | os.PathLike[str], format: str, *,
                 replace_existing: bool = False) -> None:
        if format not in FORMATS:
            raise ValueError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
        self.directory = Path(directory)
        self.format = format
        self.replace_existing = replace_existing
        self.bytes_written = 0
        self._partial: list[tuple[Path, Path]] = []

    def path(self, table: str) -> Path:
        """`<directory>/<table, percent-encoded>.<format>`, checked to stay in the directory."""
        name = quote(table, safe="")
        if name.startswith("."):
            name = "%2E" + name[1:]
        path = self.directory / f"{name}.{self.format}"
        if os.path.dirname(os.path.realpath(path)) != os.path.realpath(self.directory):
            raise ReplayRefused(f"the file name of table {table!r} would leave --to "
                                f"{self.directory}")
        return path

    async def prepare(self, schemas: Sequence[TableSchema], *, wedding: str | None = None,
                      point: str | None = None) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise ReplayRefused(f"--to {self.directory} exists and is not a directory")
        existing = [str(self.path(s.table)) for s in schemas if self.path(s.table).exists()]
        if existing and not self.replace_existing:
            raise ReplayRefused(f"{', '.join(existing)} already exist(s): choose an empty "
                                "directory, or give --replace-existing")
        if not self.directory.exists():
            try:
                self.directory.mkdir(parents=True, mode=0o700)
                self.directory.chmod(0o700)
            except OSError as exc:
                raise ReplayRefused(f"--to {self.directory}: cannot create it "
                                    f"({exc.strerror})") from None

    @contextlib.asynccontextmanager
    async def table(self, schema: TableSchema):  # type: ignore[no-untyped-def]
        final = self.path(schema.table)
        partial = final.with_name(f".{final.name}.partial")
        self._partial.append((partial, final))
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        writer: _FileWriter
        if self.format == "parquet":
            os.close(fd)
            writer = _ParquetWriter(partial, schema)
        else:
            writer = _TextWriter(os.fdopen(fd, "w", encoding="utf-8", newline=""), schema,
                                 self.format)
        try:
            yield writer
        finally:
            writer.close()
        _fsync(partial)
        self.bytes_written += partial.stat().st_size

    async def commit(self) -> None:
        for partial, final in self._partial:
            partial.replace(final)
        _fsync(self.directory)
        self._partial = []

    async def abort(self) -> None:
        for partial, _ in self._partial:
            partial.unlink(missing_ok=True)
        self._partial = []


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileWriter(Protocol):
    async def write(self, rows: list[list[Any]]) -> None: ...
    def close(self) -> None: ...


def _csv_field(value: Any) -> str:
    rendered = text(value)
    if rendered is None:
        return ""
    if rendered == "" or any(ch in rendered for ch in ',"\n\r'):
        return '"' + rendered.replace('"', '""') + '"'
    return rendered


class _TextWriter:
    def __init__(self, file: TextIO, schema: TableSchema, format: str) -> None:
        self._file = file
        self._names = schema.names
        self._types = [c.type for c in schema.columns]
        self._format = format
        if format == "csv":
            self._file.write(",".join(_csv_field(n) for n in self._names) + "\n")

    async def write(self, rows: list[list[Any]]) -> None:
        if self._format == "csv":
            self._file.write("".join(",".join([_csv_field(v) for v in row]) + "\n"
                                     for row in rows))
            return
        names, types = self._names, self._types
        lines = []
        for row in rows:
            lines.append(json.dumps({n: json_value(typed(v, t))
                                     for n, v, t in zip(names, row, types, strict=True)},
                                    ensure_ascii=False, separators=(",", ":")))
        self._file.write("\n".join(lines) + "\n")

    def close(self) -> None:
        self._file.close()


_EPOCH: Final = datetime(1970, 1, 1)
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()


def _arrow_type(type_name: str) -> Any:
    import pyarrow as pa

    if type_name in INT_TYPES:
        return pa.int64()
    if type_name in FLOAT_TYPES:
        return pa.float64()
    if type_name == "boolean":
        return pa.bool_()
    if type_name == "bytea":
        return pa.binary()
    if type_name == "date":
        return pa.date32()
    if type_name.startswith("timestamp") and type_name.endswith("with time zone"):
        return pa.timestamp("us", tz="UTC")
    if type_name.startswith("timestamp"):
        return pa.timestamp("us")
    return pa.string()


def _arrow_value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "string":
        return text(value)
    if type(value) is tuple:
        fields = value[1]
        if "days" in fields:
            days = fields["days"]
            return None if abs(days) >= 2**31 - 1 else date.fromordinal(days + _EPOCH_ORDINAL)
        if "micros" in fields:
            micros = fields["micros"]
            return None if abs(micros) >= 2**63 - 1 else micros
    return value


class _ParquetWriter:
    def __init__(self, path: Path, schema: TableSchema) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._sql_types = [c.type for c in schema.columns]
        self._types = [_arrow_type(c.type) for c in schema.columns]
        self._kinds = ["string" if t == pa.string() else str(t) for t in self._types]
        self._schema = pa.schema([pa.field(c.name, t) for c, t in
                                  zip(schema.columns, self._types, strict=True)])
        self._writer = pq.ParquetWriter(str(path), self._schema, compression="zstd")

    async def write(self, rows: list[list[Any]]) -> None:
        import pyarrow as pa

        arrays = []
        for i, (kind, type_) in enumerate(zip(self._kinds, self._types, strict=True)):
            sql_type = self._sql_types[i]
            values = [_arrow_value(typed(row[i], sql_type), kind) for row in rows]
            arrays.append(pa.array(values, type=type_))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self._schema))

    def close(self) -> None:
        self._writer.close()


# --- a hash, for verify ----------------------------------------------------------------------


class HashTarget:
    """Restores into nothing but a per-table count and content hash (`render.TableHash`)."""

    def __init__(self) -> None:
        self.bytes_written = 0
        self.hashes: dict[str, TableHash] = {}

    async def prepare(self, schemas: Sequence[TableSchema], *, wedding: str | None = None,
                      point: str | None = None) -> None:
        return None

    @contextlib.asynccontextmanager
    async def table(self, schema: TableSchema):  # type: ignore[no-untyped-def]
        digest = self.hashes[schema.table] = TableHash()
        yield _HashWriter(digest)

    async def commit(self) -> None:
        return None

    async def abort(self) -> None:
        return None


class _HashWriter:
    def __init__(self, digest: TableHash) -> None:
        self._digest = digest

    async def write(self, rows: list[list[Any]]) -> None:
        for row in rows:
            self._digest.add(row)

