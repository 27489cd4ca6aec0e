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
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from replicator.events import ChangeEvent, Op
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
    schema, name = info.qualified.split(".")
    cols = sql.SQL(", ").join(sql.Identifier(c) for c, _ in info.columns)
    query = sql.SQL("SELECT {} FROM {}.{}").format(cols, sql.Identifier(schema),
                                                     sql.Identifier(name))
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
) -> AsyncIterator[list[ChangeEvent]]:
    """Batches of op `r` events for the rows of one table, positioned at `(lsn, n)`.

    `conn` must already be inside the transaction that imported the snapshot.
    """
    schema, table = info.qualified.split(".")
    names = tuple(c for c, _ in info.columns)
    converters: Sequence[Converter] = tuple(
        registry.converter(oid, table=info.qualified, column=c) for c, oid in info.columns)
    key_names = info.primary_key or names
    now_us = time.time_ns() // 1000
    seq = 0
    batch: list[ChangeEvent] = []
    async for raw in copy_rows(conn, select_query(info, where)):
        row = {n: (None if v is None else f(v))
               for n, f, v in zip(names, converters, raw, strict=True)}
        key = {k: row[k] for k in key_names}
        batch.append(ChangeEvent(Op.READ, schema, table, ChangePosition(lsn, seq), now_us, 0,
                                 key, None, row, (), None, db))
        seq += 1
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
