"""What the capture needs to know from the catalog, read once at start-up.

- the database's own types (enums, domains, their arrays, text-like extension types), so
  the decoder can convert them; pgoutput's Type messages give only a name;
- each captured table's primary key, which stays the row's identity (the Kafka key) even
  when the replica identity is FULL;
- each table's columns and types, for the snapshot's COPY.

A table is found by its (schema, table) pair (`events.split_qualified` of its text form) and
read by OID, so any name Postgres allows (dots, quotes, spaces, upper case, non-ASCII) works;
nothing is quoted into SQL text by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from replicator.errors import OperatorError
from replicator.events import join_qualified, split_qualified
from replicator.source.values import TypeRegistry

_TYPES = """
SELECT t.oid, n.nspname || '.' || t.typname, t.typtype, t.typcategory, t.typbasetype, t.typelem
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.oid >= 16384 AND t.typtype IN ('b', 'd', 'e')
"""

_RELATION = """
SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""

_COLUMNS = """
SELECT a.attname, a.atttypid
FROM pg_attribute a
WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_PK_ORDER = """
SELECT a.attname
FROM pg_index i
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s::oid AND i.indisprimary
ORDER BY k.ord
"""


class UnknownTable(OperatorError, LookupError):
    """A table named in the configuration or a request that the source database lacks."""


@dataclass(frozen=True)
class TableInfo:
    qualified: str  # `events.join_qualified(schema, name)`
    columns: tuple[tuple[str, int], ...]  # (name, type OID)
    primary_key: tuple[str, ...]
    schema: str
    name: str
    oid: int


async def load_types(conn: psycopg.AsyncConnection[Any], registry: TypeRegistry) -> None:
    """Register every user-defined type the converters can handle."""
    cur = await conn.execute(_TYPES)
    rows = await cur.fetchall()
    # Arrays can name element types registered later in the same listing: two passes.
    for oid, name, typtype, category, base, elem in sorted(rows, key=lambda r: r[3] == "A"):
        registry.register_catalog_type(oid, name, typtype, category, base, elem)


async def table_oid(conn: psycopg.AsyncConnection[Any], qualified: str) -> tuple[str, str, int]:
    """(schema, name, OID) of the table *qualified* names; UnknownTable when there is none."""
    try:
        schema, name = split_qualified(qualified)
    except ValueError as exc:
        raise UnknownTable(str(exc)) from None
    cur = await conn.execute(_RELATION, (schema, name))
    row = await cur.fetchone()
    if row is None:
        raise UnknownTable(f"table {qualified} does not exist in database "
                           f"{conn.info.dbname!r}")
    return schema, name, int(row[0])


async def table_info(conn: psycopg.AsyncConnection[Any], qualified: str) -> TableInfo:
    schema, name, oid = await table_oid(conn, qualified)
    cur = await conn.execute(_COLUMNS, (oid,))
    columns = tuple((r[0], r[1]) for r in await cur.fetchall())
    cur = await conn.execute(_PK_ORDER, (oid,))
    pk = tuple(r[0] for r in await cur.fetchall())
    return TableInfo(join_qualified(schema, name), columns, pk, schema, name, oid)


_SCHEMA = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid::int, a.attnotnull
FROM pg_attribute a
WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


async def table_schema(conn: psycopg.AsyncConnection[Any], qualified: str,
                       lsn: int) -> dict[str, Any]:
    """The table's schema as the catalog shows it now, as archived for replay: columns in
    order with their SQL type (`numeric(12,2)`), type OID and NOT NULL, and the primary key.
    Recorded at *lsn*: the position from which changes use it."""
    info = await table_info(conn, qualified)
    cur = await conn.execute(_SCHEMA, (info.oid,))
    columns = [{"name": n, "type": t, "type_oid": oid, "not_null": bool(nn)}
               for n, t, oid, nn in await cur.fetchall()]
    return {"table": info.qualified, "lsn": int(lsn), "columns": columns,
            "primary_key": list(info.primary_key)}
