"""Snapshots: the full state of a table (or of one wedding's rows) at one LSN, as op `r` events.

A snapshot is read inside a REPEATABLE READ transaction that imports a snapshot exported by
`CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')`. The slot's consistent point is exactly the
LSN the snapshot shows: every transaction committed before it is visible, none after. So the
snapshot's rows are positioned at `(consistent_point, n)`, between the stream's changes before
and after it, and a replay that orders by position is right without any de-duplication.

- The initial snapshot uses the export of the capture's own slot at creation.
- A snapshot taken later (a table whose initial snapshot was cut short by a crash, a table
  added to the publication, an on-demand snapshot of one table or wedding) uses a *temporary*
  slot created only for its export: the capture's stream goes on meanwhile, and the
  temporary slot vanishes with its connection.

Rows are read with `COPY (SELECT ...) TO STDOUT` in text format, which is the same text form
pgoutput sends, so the same converters (`values.py`) apply.

One wedding's rows (`wedding_filter`) are, per table: in the weddings table, the row whose
`wedding_id_column` is the id; in a table linked directly, the rows whose link `column` is the
id; in a table linked through a parent, the rows whose `column` is the key of a parent row of
that wedding (`column IN (SELECT parent_key FROM parent WHERE parent_wedding_column = id)`).
Tables without a link have no rows of a wedding. COPY takes no bind parameters, so the id is
quoted into the statement as an untyped literal (`sql.Literal`), which Postgres reads as the
column's type, and identifiers are quoted (`sql.Identifier`).

Table names are (schema, table) pairs throughout (`TableInfo.schema`/`.name`; configured
names through `events.split_qualified`), never split on a dot or quoted by hand, so any name
Postgres allows works.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import psycopg
from psycopg import sql

from replicator.config import PriorityConfig
from replicator.errors import OperatorError
from replicator.events import (
    ChangeEvent,
    Op,
    Tier,
    TransactionRecord,
    join_qualified,
    split_qualified,
)
from replicator.position import ChangePosition, Lsn
from replicator.source.catalog import TableInfo
from replicator.source.values import Converter, TypeRegistry

_ESCAPE = re.compile(rb"\\(?:[0-7]{1,3}|x[0-9A-Fa-f]{1,2}|.)")
_SIMPLE = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _unescape_match(m: re.Match[bytes]) -> bytes:
    text = m.group(0)[1:]
    if text[:1] == b"x":
        return bytes([int(text[1:], 16)])
    if text[:1].isdigit():
        return bytes([int(text, 8) & 0xFF])
    return _SIMPLE.get(text, text)


def parse_copy_line(line: bytes) -> list[bytes | None]:
    """One line of COPY text format (without its newline) -> raw field values."""
    fields: list[bytes | None] = []
    for field in line.split(b"\t"):
        if field == b"\\N":
            fields.append(None)
        elif b"\\" in field:
            fields.append(_ESCAPE.sub(_unescape_match, field))
        else:
            fields.append(field)
    return fields


async def copy_rows(
    conn: psycopg.AsyncConnection[Any], query: sql.Composable
) -> AsyncIterator[list[bytes | None]]:
    """Raw rows of `COPY (query) TO STDOUT`, streamed in bounded memory."""
    async with conn.cursor() as cur:
        copy_sql = sql.SQL("COPY ({}) TO STDOUT").format(query)
        async with cur.copy(copy_sql) as copy:
            pending = b""
            async for chunk in copy:
                data = pending + bytes(chunk)
                lines = data.split(b"\n")
                pending = lines.pop()
                for line in lines:
                    yield parse_copy_line(line)
            if pending:
                yield parse_copy_line(pending)


def select_query(info: TableInfo, where: sql.Composable | None = None) -> sql.Composable:
    cols = sql.SQL(", ").join(sql.Identifier(c) for c, _ in info.columns)
    query = sql.SQL("SELECT {} FROM {}").format(cols, sql.Identifier(info.schema, info.name))
    if where is not None:
        query = sql.SQL("{} WHERE {}").format(query, where)
    return query


async def snapshot_table(
    conn: psycopg.AsyncConnection[Any],
    info: TableInfo,
    registry: TypeRegistry,
    *,
    lsn: Lsn,
    db: str,
    where: sql.Composable | None = None,
    batch_size: int = 2000,
    first_seq: int = 0,
) -> AsyncIterator[list[ChangeEvent]]:
    """Batches of op `r` events for the rows of one table, positioned at `(lsn, n)` from
    `n = first_seq`: the tables of one snapshot share its LSN, so they number their rows on
    from each other and every position stays unique.

    `conn` must already be inside the transaction that imported the snapshot.
    """
    schema, table, qualified = info.schema, info.name, info.qualified
    names = tuple(c for c, _ in info.columns)
    converters: Sequence[Converter] = tuple(
        registry.converter(oid, table=info.qualified, column=c) for c, oid in info.columns)
    key_names = info.primary_key or names
    now_us = time.time_ns() // 1000
    seq = first_seq
    batch: list[ChangeEvent] = []
    async for raw in copy_rows(conn, select_query(info, where)):
        row = {n: (None if v is None else f(v))
               for n, f, v in zip(names, converters, raw, strict=True)}
        key = {k: row[k] for k in key_names}
        batch.append(ChangeEvent(Op.READ, schema, table, ChangePosition(lsn, seq), now_us, 0,
                                 key, None, row, (), None, db, qualified=qualified))
        seq += 1
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- what to snapshot on demand -------------------------------------------------------------


class SnapshotRequestError(OperatorError, ValueError):
    """An on-demand snapshot cannot be taken as asked (a table that is not captured, a wedding
    id that the id column cannot hold); the message says why. Nothing was published."""


def qualified_name(name: str) -> str:
    """`guests` -> `public.guests`, `public."v1.2"` -> `"public"."v1.2"`: the text form
    (`events.join_qualified`) of a table named as in the configuration; raise
    SnapshotRequestError for a text that names no (schema, table) pair."""
    try:
        return join_qualified(*split_qualified(name.strip(), "public"))
    except ValueError as exc:
        raise SnapshotRequestError(str(exc)) from None


def wedding_filter(priority: PriorityConfig, table: str, wedding_id: str) -> sql.Composable | None:
    """The condition selecting the rows of *table* (`schema.table`) that belong to wedding
    *wedding_id*, or None when the table has no link to a wedding (see the module docstring)."""
    wid = sql.Literal(wedding_id)
    if table == priority.weddings_table:
        return sql.SQL("{} = {}").format(sql.Identifier(priority.wedding_id_column), wid)
    link = priority.tables.get(table)
    if link is None:
        return None
    if link.parent is None:
        return sql.SQL("{} = {}").format(sql.Identifier(link.column), wid)
    return sql.SQL("{} IN (SELECT {} FROM {} WHERE {} = {})").format(
        sql.Identifier(link.column), sql.Identifier(link.parent_key),
        sql.Identifier(*split_qualified(link.parent)), sql.Identifier(link.parent_wedding_column),
        wid)


def wedding_filters(priority: PriorityConfig, tables: Iterable[str],
                    wedding_id: str) -> dict[str, sql.Composable]:
    """`wedding_filter` of each of *tables* that links to a wedding (in the order given)."""
    filters = {}
    for table in tables:
        condition = wedding_filter(priority, table, wedding_id)
        if condition is not None:
            filters[table] = condition
    return filters


async def check_filter(conn: psycopg.AsyncConnection[Any], info: TableInfo,
                       where: sql.Composable | None, *, wedding: str | None = None) -> None:
    """Plan the snapshot's query of *info* without reading a row: raise SnapshotRequestError
    when the wedding id does not fit a column it is compared with, or a configured column or
    parent table does not exist."""
    try:
        await conn.execute(sql.SQL("{} LIMIT 0").format(select_query(info, where)))
    except psycopg.errors.DataError as exc:
        raise SnapshotRequestError(
            f"wedding id {wedding!r} does not fit {info.qualified}: "
            f"{exc.diag.message_primary}") from exc
    except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable) as exc:
        raise SnapshotRequestError(
            f"cannot select the rows of {info.qualified}: {exc.diag.message_primary}; check the "
            f"priority configuration of this table") from exc


def snapshot_record(lsn: Lsn, table: str, tiers: Counter[Tier]) -> TransactionRecord:
    """The boundary record of one table's snapshot rows at *lsn*: xid 0, and an end LSN just
    below *lsn*, so a snapshot never lets a sink's checkpoint reach its own LSN while other
    tables of it may still come; the first streamed transaction after it does."""
    return TransactionRecord(lsn, Lsn(max(0, lsn - 1)), time.time_ns() // 1000, 0,
                             {table: sum(tiers.values())},
                             tier_counts={t.value: n for t, n in tiers.items()})


@dataclass
class SnapshotResult:
    """What one snapshot published, all at `lsn`: rows per table (in the order taken) and
    per tier; for an on-demand snapshot also what was asked and the tables left out."""

    lsn: Lsn
    rows: dict[str, int] = dataclass_field(default_factory=dict)
    tiers: Counter[Tier] = dataclass_field(default_factory=Counter)
    table: str | None = None
    wedding: str | None = None
    skipped: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.rows.values())
