"""Where restored rows go: a Postgres database (COPY), files (JSONL, CSV, Parquet), or a hash.

Every target works in two steps, so that a failed replay leaves nothing half-done:
`open_table` / `write` / `close_table` for each table (tables in parallel), then `commit()`
once every table succeeded, or `abort()`.

- Postgres: each table gets its own connection and transaction: `CREATE TABLE` from the
  archived schema (types, NOT NULL), `COPY ... FROM STDIN` in text format, then the primary
  key (built once over the loaded rows, which is faster than maintaining it, and which refuses
  duplicate keys). The transactions commit together at the end. A table that already exists
  is refused up front, unless `replace_existing`, which drops it inside the same transaction:
  a failed replay leaves the old table in place.
- Files: `<directory>/<schema.table>.<jsonl|csv|parquet>`, written as `.<name>.partial` and
  renamed at the end; existing files are refused unless `replace_existing`.
  JSONL: one object per row (`render.json_value`: numeric as exact text, json columns as
  documents). CSV: a header line, Postgres's text forms, NULL as an empty unquoted field and
  the empty string as `""` (what `COPY ... CSV` reads back). Parquet: typed columns where the
  type maps (integers, floats, booleans, bytea, date, timestamp[tz] in microseconds), the
  Postgres text otherwise (numeric keeps its exact text); an infinite date or timestamp,
  which Parquet cannot hold, is written as null.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, Final, Protocol

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
from replicator.replay.plan import ReplayRefused
from replicator.replay.table import TableSchema

__all__ = ["FORMATS", "FileTarget", "HashTarget", "PostgresTarget", "Target", "is_dsn"]

FORMATS: Final = ("jsonl", "csv", "parquet")
log = logging.getLogger("replicator.replay")


def is_dsn(to: str) -> bool:
    """A Postgres connection string (URI or `key=value` form), as opposed to a directory."""
    return to.startswith(("postgresql://", "postgres://")) or "=" in to


class TableWriter(Protocol):
    async def write(self, rows: list[list[Any]]) -> None: ...


class Target(Protocol):
    bytes_written: int

    async def prepare(self, schemas: Sequence[TableSchema]) -> None: ...
    def table(self, schema: TableSchema) -> contextlib.AbstractAsyncContextManager[TableWriter]: ...
    async def commit(self) -> None: ...
    async def abort(self) -> None: ...


# --- Postgres --------------------------------------------------------------------------------


class PostgresTarget:
    """*override_reason*: replace tables of a live database on a wedding day anyway (below);
    the reason is logged."""

    def __init__(self, dsn: str, *, replace_existing: bool = False,
                 override_reason: str | None = None) -> None:
        self.dsn = dsn
        self.replace_existing = replace_existing
        self.override_reason = override_reason
        self.bytes_written = 0
        self._open: list[Any] = []  # connections holding a table's open transaction

    async def _connect(self) -> Any:
        import psycopg

        try:
            return await psycopg.AsyncConnection.connect(self.dsn)
        except psycopg.OperationalError as exc:
            raise ReplayFailed(f"cannot connect to the target database: {_first_line(exc)}"
                               ) from None

    async def prepare(self, schemas: Sequence[TableSchema]) -> None:
        conn = await self._connect()
        try:
            existing = []
            for schema in schemas:
                cur = await conn.execute("SELECT to_regclass(%s)", (_quoted(schema.table),))
                row = await cur.fetchone()
                if row is not None and row[0] is not None:
                    existing.append(schema.table)
            if existing and not self.replace_existing:
                raise ReplayRefused(
                    f"the target database already has {', '.join(existing)}: restore into an "
                    "empty database, or give --replace-existing to drop and replace them "
                    "(inside the restore's transaction: a failed replay keeps them)")
            if existing:
                await self._wedding_day_guard(conn, existing)
        finally:
            await conn.close()

    async def _wedding_day_guard(self, conn: Any, existing: Sequence[str]) -> None:
        """Replacing tables of a *live* database (one a logical replication slot reads) is
        refused on a Saturday and when a wedding in `public.weddings` is today or tomorrow
        (the server's date), unless overridden with a reason, which is logged."""
        cur = await conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database() "
            "AND slot_type = 'logical'")
        row = await cur.fetchone()
        if not row or not row[0]:
            return
        cur = await conn.execute("SELECT extract(isodow FROM current_date) = 6, "
                                 "to_regclass('public.weddings') IS NOT NULL")
        saturday, has_weddings = await cur.fetchone()
        soon = 0
        if has_weddings:
            cur = await conn.execute(
                "SELECT count(*) FROM public.weddings "
                "WHERE wedding_date BETWEEN current_date AND current_date + 1")
            soon = int((await cur.fetchone())[0])
        if not saturday and not soon:
            return
        why = " and ".join(([] if not saturday else ["it is Saturday"])
                           + ([] if not soon else
                              [f"{soon} wedding(s) in public.weddings are today or tomorrow"]))
        if not self.override_reason:
            raise ReplayRefused(
                f"replacing {', '.join(existing)} in a live database (it has a logical "
                f"replication slot) is refused: {why}. Restore into another database, or give "
                "--override-reason '<why>' (it is logged)")
        log.warning("wedding-day protection overridden (%s): replacing %s in a live database; "
                    "reason: %s", why, ", ".join(existing), self.override_reason)

    @contextlib.asynccontextmanager
    async def table(self, schema: TableSchema):  # type: ignore[no-untyped-def]
        from psycopg import sql

        conn = await self._connect()
        self._open.append(conn)
        name = _identifier(schema.table)
        try:
            if self.replace_existing:
                await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
            namespace = schema.table.split(".", 1)[0]
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(namespace)))
            columns = sql.SQL(", ").join(
                sql.SQL("{} {}{}").format(sql.Identifier(c.name), sql.SQL(c.type),
                                          sql.SQL(" NOT NULL" if c.not_null else ""))
                for c in schema.columns)
            await conn.execute(sql.SQL("CREATE TABLE {} ({})").format(name, columns))
            writer = _CopyWriter(self, conn, schema)
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
        except Exception as exc:
            import psycopg

            if isinstance(exc, psycopg.Error):
                raise ReplayFailed(f"restoring {schema.table} into the target database failed: "
                                   f"{_first_line(exc)}") from None
            raise

    async def commit(self) -> None:
        for conn in self._open:
            await conn.commit()
        await self._close()

    async def abort(self) -> None:
        for conn in self._open:
            with contextlib.suppress(Exception):
                await conn.rollback()
        await self._close()

    async def _close(self) -> None:
        for conn in self._open:
            with contextlib.suppress(Exception):
                await conn.close()
        self._open = []


class _CopyWriter:
    """One table's rows into its new table, by `COPY ... FROM STDIN` (opened at the first
    write); `remove_keys` ends the COPY and removes rows, and the next write opens another."""

    def __init__(self, target: PostgresTarget, conn: Any, schema: TableSchema) -> None:
        from psycopg import sql

        self._target, self._conn, self._schema = target, conn, schema
        self._name = _identifier(schema.table)
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
    schema, _, name = table.partition(".")
    return '"' + schema.replace('"', '""') + '"."' + name.replace('"', '""') + '"'


def _identifier(table: str) -> Any:
    from psycopg import sql

    schema, _, name = table.partition(".")
    return sql.Identifier(schema, name)


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
        return self.directory / f"{table}.{self.format}"

    async def prepare(self, schemas: Sequence[TableSchema]) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise ReplayFailed(f"--to {self.directory} exists and is not a directory")
        existing = [str(self.path(s.table)) for s in schemas if self.path(s.table).exists()]
        if existing and not self.replace_existing:
            raise ReplayRefused(f"{', '.join(existing)} already exist(s): choose an empty "
                                "directory, or give --replace-existing")
        self.directory.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def table(self, schema: TableSchema):  # type: ignore[no-untyped-def]
        final = self.path(schema.table)
        partial = final.with_name(f".{final.name}.partial")
        self._partial.append((partial, final))
        writer: _FileWriter
        if self.format == "parquet":
            writer = _ParquetWriter(partial, schema)
        else:
            writer = _TextWriter(partial, schema, self.format)
        try:
            yield writer
        finally:
            writer.close()
        self.bytes_written += partial.stat().st_size

    async def commit(self) -> None:
        for partial, final in self._partial:
            partial.replace(final)
        self._partial = []

    async def abort(self) -> None:
        for partial, _ in self._partial:
            partial.unlink(missing_ok=True)
        self._partial = []


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
    def __init__(self, path: Path, schema: TableSchema, format: str) -> None:
        self._file = path.open("w", encoding="utf-8", newline="")
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

    async def prepare(self, schemas: Sequence[TableSchema]) -> None:
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

