"""A Postgres restore's final transaction, and what it checks before anything changes.

- **The final transaction** (`Swap`). Every table is restored into a staging schema first
  (`targets.PostgresTarget`); then one transaction puts them in place. A table the target
  lacks is moved in (`ALTER TABLE ... SET SCHEMA`: no copy). An existing one gets the
  restored rows in place, so its indexes, foreign keys, defaults, grants and triggers stay:
  its rows (of the wedding, for a wedding restore) that the restore does not hold are deleted,
  children first, then the restored rows inserted or, by key, updated, parents first; a row
  already equal is left alone (no trigger fires for it). Archived columns it lacks are added
  (nullable); its other columns keep their values. It must have a unique index on the
  archived key. A wedding restore finds the target's rows of the wedding through the
  calendar's links (`[priority]`); a restored row whose key another wedding holds in the
  target now, and rows of the wedding in a table with no link, are refused.
- **The wedding-day guard.** A restore that changes rows of existing tables is refused when
  the target holds upcoming weddings and it is Saturday, or when a wedding in the target is
  today or tomorrow (dates in the calendar's time zone), whether or not a replication slot
  reads the database: a lost slot is the usual reason to restore. The weddings table and its
  date column are the configuration's `[priority]` section (`replay --config`; default: the
  configuration's defaults, `public.weddings.wedding_date`). A target without that table
  holds no weddings the guard can see.
- **The override** (`--override-reason`) is recorded before anything changes: a row in
  `public.replicator_audit` of the target (created if missing, committed on its own) and an
  `audit/` object in the archive (`run.apply`), encrypted like every object.
- **Foreign keys.** The tables a restore changes are ordered parents first (a cycle among
  them is refused); rows are deleted children first and written parents first. A foreign key
  of a table the restore does not replace whose ON DELETE action changes rows (CASCADE, SET
  NULL, SET DEFAULT) is refused: the restore would change that table too.
"""

from __future__ import annotations

import getpass
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from replicator.config import PriorityConfig
from replicator.events import split_qualified
from replicator.priority import wedding_day
from replicator.replay.plan import ReplayRefused
from replicator.replay.table import Column, TableSchema

__all__ = ["Override", "Relation", "Swap", "fk_order", "guard", "missing_columns", "relations",
           "write_audit_row"]

log = logging.getLogger("replicator.replay")

AUDIT_TABLE = ("public", "replicator_audit")


@dataclass(frozen=True, slots=True)
class Override:
    """An override of the wedding-day guard: what it let through, and why."""

    reason: str
    why: str
    tables: tuple[str, ...]
    wedding: str | None
    point: str | None
    database: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    user: str = field(default_factory=getpass.getuser)

    def document(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at.isoformat(), "user": self.user,
                "reason": self.reason, "guard": self.why, "database": self.database,
                "tables": list(self.tables), "wedding": self.wedding,
                "restore_point": self.point}

    def json(self) -> bytes:
        return json.dumps(self.document(), sort_keys=True).encode()


async def guard(conn: Any, calendar: PriorityConfig, changed: Sequence[str],
                reason: str | None) -> str | None:
    """Refuse (ReplayRefused) to change *changed* on a wedding day unless *reason*; the
    guard's finding when it was overridden, else None (module docstring)."""
    import psycopg

    try:
        why = await wedding_day(conn, calendar)
    except psycopg.Error as exc:
        raise ReplayRefused(
            f"cannot read the wedding calendar {calendar.weddings_table}."
            f"{calendar.wedding_date_column} of the target: {first_line(exc)} (name the "
            "weddings table and date column in the [priority] section of --config)") from None
    if why is None:
        return None
    if not reason:
        raise ReplayRefused(
            f"changing {', '.join(changed)} is refused: {why}. Restore into another database, "
            "or give --override-reason '<why>' (it is recorded in the target's "
            "replicator_audit table and in the archive)")
    log.warning("wedding-day protection overridden (%s): changing %s; reason: %s", why,
                ", ".join(changed), reason)
    return why


async def create_audit_table(conn: Any) -> None:
    """`public.replicator_audit`, unless it exists."""
    from psycopg import sql

    await conn.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (id text PRIMARY KEY, at timestamptz NOT NULL, "
        "by_user text NOT NULL, db_user text NOT NULL DEFAULT current_user, "
        "reason text NOT NULL, guard text NOT NULL, tables text[] NOT NULL, wedding text, "
        "restore_point text)").format(sql.Identifier(*AUDIT_TABLE)))


async def write_audit_row(conn: Any, override: Override) -> None:
    """The override as a row of `public.replicator_audit`, committed on its own."""
    from psycopg import sql

    name = sql.Identifier(*AUDIT_TABLE)
    async with conn.transaction():
        await create_audit_table(conn)
        await conn.execute(sql.SQL(
            "INSERT INTO {} (id, at, by_user, reason, guard, tables, wedding, restore_point) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(name),
            (override.id, override.at, override.user, override.reason, override.why,
             list(override.tables), override.wedding, override.point))


@dataclass(frozen=True, slots=True)
class Relation:
    """A foreign key touching the tables a restore changes."""

    name: str
    child: str  # schema.table, as the catalog spells it
    parent: str
    on_delete: str  # pg_constraint.confdeltype: a, r, c, n, d


async def relations(conn: Any, oids: Mapping[int, str]) -> list[Relation]:
    """The foreign keys from or to the tables *oids* (oid -> name)."""
    cur = await conn.execute(
        "SELECT c.conname, c.conrelid::oid, c.confrelid::oid, c.confdeltype, "
        "format('%%s.%%s', cn.nspname, cr.relname), format('%%s.%%s', pn.nspname, pr.relname) "
        "FROM pg_constraint c JOIN pg_class cr ON cr.oid = c.conrelid "
        "JOIN pg_namespace cn ON cn.oid = cr.relnamespace "
        "JOIN pg_class pr ON pr.oid = c.confrelid "
        "JOIN pg_namespace pn ON pn.oid = pr.relnamespace "
        "WHERE c.contype = 'f' AND (c.conrelid = ANY(%s) OR c.confrelid = ANY(%s))",
        (list(oids), list(oids)))
    found = []
    for name, child, parent, action, child_name, parent_name in await cur.fetchall():
        found.append(Relation(name, oids.get(child, child_name), oids.get(parent, parent_name),
                              action))
    return found


def fk_order(tables: Sequence[str], found: Sequence[Relation]) -> list[str]:
    """*tables* parents first; refuses a cycle among them and a cascading foreign key of a
    table outside them."""
    inside = set(tables)
    for rel in found:
        if rel.parent in inside and rel.child not in inside and rel.on_delete in "cnd":
            action = {"c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}[rel.on_delete]
            raise ReplayRefused(
                f"the foreign key {rel.name} of {rel.child} references {rel.parent} ON DELETE "
                f"{action}: deleting rows of {rel.parent} would change {rel.child}, which "
                "this restore does not replace; restore both tables, or change the key")
    parents = {t: {r.parent for r in found if r.child == t and r.parent in inside
                   and r.parent != t} for t in tables}
    ordered: list[str] = []
    while parents:
        ready = sorted(t for t, p in parents.items() if not p - set(ordered))
        if not ready:
            raise ReplayRefused(f"the foreign keys among {', '.join(sorted(parents))} form a "
                                "cycle: no order of deletes and inserts keeps them; restore "
                                "into an empty database")
        ordered += ready
        for t in ready:
            del parents[t]
    return ordered


def quoted(table: str) -> str:
    schema, name = split_qualified(table)
    return '"' + schema.replace('"', '""') + '"."' + name.replace('"', '""') + '"'


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass(slots=True)
class Swap:
    """What the final transaction does: tables that do not exist move in from staging; the
    existing ones (`changed`, parents first) get the staged rows in place."""

    wedding: str | None
    schemas: dict[str, TableSchema]
    changed: list[str] = field(default_factory=list)
    existing: set[str] = field(default_factory=set)
    missing: dict[str, list[Column]] = field(default_factory=dict)  # columns to add
    filters: dict[str, Any] = field(default_factory=dict)  # wedding: the target's rows of it
    unlinked: set[str] = field(default_factory=set)  # wedding: existing, no link: untouched

    async def run(self, conn: Any, *, staged: Callable[[str], Any]) -> None:
        from psycopg import sql

        for table in self.changed:
            for column in self.missing.get(table, ()):
                await conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                    _identifier(table), sql.Identifier(column.name), sql.SQL(column.type)))
        for table in reversed(self.changed):  # children first
            await conn.execute(*self._delete(table, staged(table)))
        for table in self.changed:  # parents first
            await self._upsert(conn, table, staged(table))
        for table in self.unlinked:
            cur = await conn.execute(sql.SQL("SELECT EXISTS (SELECT FROM {})").format(
                staged(table)))
            if (await cur.fetchone())[0]:
                raise ReplayRefused(
                    f"{table} holds rows of wedding {self.wedding} in the archive, but the "
                    "calendar names no link from it to its wedding, so its rows in the target "
                    "cannot be told apart: add it to [priority.tables] in --config")
        moving = [t for t in self.schemas if t not in self.changed and t not in self.unlinked]
        for table in sorted(moving):
            namespace = split_qualified(table)[0]
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(namespace)))
            await conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                staged(table), sql.Identifier(namespace)))

    def _keys_match(self, table: str) -> Any:
        from psycopg import sql

        return sql.SQL(" AND ").join(sql.SQL("s.{0} = t.{0}").format(sql.Identifier(c))
                                     for c in self.schemas[table].primary_key)

    def _delete(self, table: str, source: Any) -> tuple[Any, tuple[str, ...]]:
        """The target's rows (of the wedding) that the restored state does not hold."""
        from psycopg import sql

        where: Any = sql.SQL("TRUE")
        params: tuple[str, ...] = ()
        if self.wedding is not None:
            where, params = self.filters[table], (self.wedding,)
        if not self.schemas[table].primary_key:
            return sql.SQL("DELETE FROM {} t WHERE {}").format(_identifier(table), where), params
        return (sql.SQL("DELETE FROM {} t WHERE ({}) AND NOT EXISTS (SELECT FROM {} s WHERE {})"
                        ).format(_identifier(table), where, source, self._keys_match(table)),
                params)

    async def _upsert(self, conn: Any, table: str, source: Any) -> None:
        """The restored rows into *table*: new keys inserted, changed rows updated (rows
        already equal are left alone, so no trigger fires for them)."""
        from psycopg import sql

        schema = self.schemas[table]
        target = _identifier(table)
        if self.wedding is not None and schema.primary_key:
            cur = await conn.execute(sql.SQL(
                "SELECT count(*) FROM {} s JOIN {} t ON {} WHERE ({}) IS NOT TRUE").format(
                    source, target, self._keys_match(table), self.filters[table]),
                (self.wedding,))
            taken = (await cur.fetchone())[0]
            if taken:
                raise ReplayRefused(
                    f"{taken} row(s) of wedding {self.wedding} in {table} as restored have keys "
                    "that rows of another wedding hold in the target now: replacing them would "
                    "change another wedding; restore into another database")
        names = sql.SQL(", ").join(sql.Identifier(c) for c in schema.names)
        insert = sql.SQL("INSERT INTO {} AS t ({}) SELECT {} FROM {}").format(
            target, names, names, source)
        others = [c for c in schema.names if c not in schema.primary_key]
        if schema.primary_key:
            conflict = sql.SQL(", ").join(sql.Identifier(c) for c in schema.primary_key)
            if others:
                sets = sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(
                    sql.Identifier(c)) for c in others)
                differ = sql.SQL(" OR ").join(
                    sql.SQL("t.{0}::text IS DISTINCT FROM excluded.{0}::text").format(
                        sql.Identifier(c)) for c in others)
                insert += sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {} WHERE {}").format(
                    conflict, sets, differ)
            else:
                insert += sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(conflict)
        await conn.execute(insert)


async def missing_columns(conn: Any, oid: int, schema: TableSchema) -> list[Column]:
    """The archived columns an existing table lacks (the final transaction adds them,
    nullable); refuses a table without a unique index on exactly the archived key, whose
    rows could not be matched with the restored ones."""
    cur = await conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s "
                             "AND attnum > 0 AND NOT attisdropped", (oid,))
    have = {r[0] for r in await cur.fetchall()}
    if schema.primary_key:
        cur = await conn.execute(
            "SELECT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = %s AND i.indisunique "
            "AND i.indpred IS NULL AND i.indexprs IS NULL AND (SELECT array_agg(a.attname "
            "ORDER BY a.attname) FROM pg_attribute a WHERE a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey)) = %s::name[])",
            (oid, sorted(schema.primary_key)))
        row = await cur.fetchone()
        if not row or not row[0]:
            raise ReplayRefused(f"{schema.table} in the target has no unique index on "
                                f"({', '.join(schema.primary_key)}), the archived key: its "
                                "rows cannot be matched with the restored ones")
    return [c for c in schema.columns if c.name not in have]


async def wedding_equals(conn: Any, alias: str, table: str, column: str, wedding: str) -> Any:
    """`alias.column = %s::<its type>` for an integer or uuid column, so that the column's
    index is used (a cast of the column, `alias.column::text = %s`, reads the whole table).
    It picks exactly the rows the text comparison picks: only when *wedding* is the
    canonical text of a value of that type ('7', not '007'; a uuid in lower case), for types
    whose text is canonical. Otherwise, the text comparison."""
    import psycopg
    from psycopg import sql

    as_text = sql.SQL("{}.{}::text = %s").format(sql.Identifier(alias),
                                                 sql.Identifier(column))
    row = await (await conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
        "to_regclass(%s) AND attname = %s AND attnum > 0 AND NOT attisdropped",
        (quoted(table), column))).fetchone()
    if row is None or row[0] not in _CANONICAL_TYPES:
        return as_text
    type_name = sql.SQL(row[0])
    try:
        async with conn.transaction():  # a savepoint: a failed cast leaves the rest
            same = await (await conn.execute(sql.SQL("SELECT %s::{}::text = %s").format(
                type_name), (wedding, wedding))).fetchone()
    except psycopg.DataError:
        return as_text
    if not same[0]:
        return as_text
    return sql.SQL("{}.{} = %s::{}").format(sql.Identifier(alias), sql.Identifier(column),
                                            type_name)


#: Types whose values have one text form each: equal values, equal text.
_CANONICAL_TYPES = frozenset({"smallint", "integer", "bigint", "uuid"})


def _identifier(table: str) -> Any:
    from psycopg import sql

    return sql.Identifier(*split_qualified(table))
