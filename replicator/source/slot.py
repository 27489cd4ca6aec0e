"""The server side of capture: server settings, the publication, the replication slot.

Everything here checks or creates; nothing here ever drops a slot or a publication. A user-facing
error names what is wrong and the command that fixes it:

- `check_server`: wal_level, free replication slots and WAL senders, the REPLICATION privilege;
- `ensure_publication`: creates the publication when missing, and checks that every published
  table can be replicated with its key (primary key, or REPLICA IDENTITY FULL / INDEX);
- `create_slot`: a pgoutput slot whose exported snapshot is consistent with its first change,
  valid while the context is open;
- `slot_status` / `check_slot_usable`: what `pg_replication_slots` says about the slot, and
  whether capture may stream from it (not invalidated, right database and plugin).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from replicator.errors import OperatorError
from replicator.events import join_qualified, split_qualified
from replicator.position import Lsn
from replicator.source.stream import (
    SlotError,
    SlotInvalidatedError,
    SlotMismatchError,
    SourceUnavailable,
)

__all__ = [
    "CreatedSlot",
    "PublishedTables",
    "ServerInfo",
    "SlotExistsError",
    "SlotStatus",
    "SourceConfigError",
    "check_server",
    "check_slot_usable",
    "create_slot",
    "ensure_publication",
    "slot_lag",
    "slot_status",
]

logger = logging.getLogger(__name__)

MIN_SERVER_VERSION = 140000


class SourceConfigError(OperatorError, ValueError):
    """The database is not set up for capture; the message says what to change."""


class SlotExistsError(SlotError, OperatorError):
    """`create_slot` found a slot of that name already there."""


#: Refusals at connection time that only the configuration can change (libpq reports no
#: SQLSTATE for them; the server's message says which). Anything else (refused, timed out,
#: starting up, shutting down, not accepting connections, too many clients) is retried.
_REFUSED = re.compile(r'FATAL: +(database "[^"]*" does not exist|role "[^"]*" does not exist|'
                      r'password authentication failed[^\n]*|no pg_hba\.conf entry[^\n]*)')


async def _connect(dsn: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    """A connection; `SourceConfigError` when the server refuses it for a reason of the
    configuration (unknown database or role, bad password), `SourceUnavailable` when it does
    not answer (retried by the caller)."""
    try:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True, **kwargs)
    except psycopg.OperationalError as exc:
        if exc.sqlstate is None:
            refused = _REFUSED.search(str(exc))
            if refused is not None:
                raise SourceConfigError(f"PostgreSQL refused the connection of source.dsn: "
                                        f"{refused.group(1)}; correct source.dsn (or the "
                                        f"password's variable)") from None
            raise SourceUnavailable(f"cannot reach PostgreSQL: {_first_line(exc)}") from exc
        raise


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- the server -------------------------------------------------------------------------


class ServerInfo(NamedTuple):
    version_num: int
    wal_level: str
    max_replication_slots: int
    used_replication_slots: int
    max_wal_senders: int
    used_wal_senders: int
    can_replicate: bool
    user: str


_SERVER = """
SELECT current_setting('server_version_num')::int,
       current_setting('wal_level'),
       current_setting('max_replication_slots')::int,
       (SELECT count(*) FROM pg_replication_slots)::int,
       current_setting('max_wal_senders')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int,
       (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
       current_user,
       EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)
"""


async def check_server(dsn: str, *, slot: str | None = None) -> ServerInfo:
    """Check that the server can serve capture; raise SourceConfigError saying what to change.

    A free replication slot is needed unless `slot` is given and already exists; a free WAL
    sender is always needed.
    """
    async with await _connect(dsn) as conn:
        cur = await conn.execute(_SERVER, (slot,))
        row = await cur.fetchone()
    assert row is not None
    info = ServerInfo(*row[:8])
    slot_exists = bool(row[8])
    problems = []
    if info.version_num < MIN_SERVER_VERSION:
        problems.append(f"PostgreSQL {info.version_num} is too old: capture needs 14 or later")
    if info.wal_level != "logical":
        problems.append(f"wal_level is {info.wal_level!r}: set wal_level = logical in "
                        f"postgresql.conf and restart PostgreSQL")
    if not slot_exists and info.used_replication_slots >= info.max_replication_slots:
        problems.append(
            f"all {info.max_replication_slots} replication slots are in use: raise "
            f"max_replication_slots in postgresql.conf (and restart), or drop an unused slot")
    if info.used_wal_senders >= info.max_wal_senders:
        problems.append(
            f"all {info.max_wal_senders} WAL senders are busy: raise max_wal_senders in "
            f"postgresql.conf and restart PostgreSQL")
    if not info.can_replicate:
        problems.append(f"role {info.user!r} may not replicate: ALTER ROLE "
                        f"{sql.Identifier(info.user).as_string()} WITH REPLICATION")
    if problems:
        raise SourceConfigError("PostgreSQL is not ready for capture: " + "; ".join(problems))
    return info


# --- the publication --------------------------------------------------------------------


class PublishedTables(tuple[str, ...]):
    """The publication's tables as `schema.table` names, with each one's replica identity
    (`default` = primary key, `full`, `index`) in `replica_identity`."""

    replica_identity: Mapping[str, str]

    def __new__(cls, tables: Iterable[str], replica_identity: Mapping[str, str]) -> PublishedTables:
        self = super().__new__(cls, tables)
        self.replica_identity = dict(replica_identity)
        return self


_IDENTITY = {"d": "default", "f": "full", "i": "index", "n": "nothing"}
_PUBLICATION = "SELECT pubinsert, pubupdate, pubdelete, pubtruncate FROM pg_publication " \
               "WHERE pubname = %s"
_PUBLISHED = """
SELECT t.schemaname, t.tablename, c.relreplident,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
FROM pg_publication_tables t
JOIN pg_namespace n ON n.nspname = t.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename
WHERE t.pubname = %s
"""


def _qualified(name: str) -> tuple[str, str]:
    try:
        return split_qualified(name, "public")
    except ValueError as exc:
        raise SourceConfigError(str(exc)) from None


def _table_list(names: Iterable[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(*_qualified(n)) for n in names)


async def ensure_publication(dsn: str, name: str, tables: tuple[str, ...]) -> PublishedTables:
    """Create the publication if missing (FOR TABLE `tables`, or FOR ALL TABLES when empty);
    return its tables, after checking the requested ones are in it and that each published
    table has a key the stream can carry."""
    wanted = [join_qualified(*_qualified(t)) for t in tables]
    async with await _connect(dsn) as conn:
        cur = await conn.execute(_PUBLICATION, (name,))
        flags = await cur.fetchone()
        if flags is None:
            target = sql.SQL("TABLE {}").format(_table_list(wanted)) if wanted \
                else sql.SQL("ALL TABLES")
            try:
                await conn.execute(sql.SQL("CREATE PUBLICATION {} FOR {}").format(
                    sql.Identifier(name), target))
            except psycopg.errors.UndefinedTable as exc:
                raise SourceConfigError(
                    f"cannot create publication {name!r}: {exc.diag.message_primary}; "
                    f"create the table or remove it from source.tables") from exc
            except psycopg.errors.InsufficientPrivilege as exc:
                raise SourceConfigError(
                    f"cannot create publication {name!r}: {exc.diag.message_primary}; create "
                    f"it as a superuser or table owner, then start again") from exc
            logger.info("created publication %s for %s", name,
                        ", ".join(wanted) if wanted else "all tables")
        elif not all(flags):
            raise SourceConfigError(
                f"publication {name!r} does not publish every kind of change, so capture "
                f"would miss some; run ALTER PUBLICATION {sql.Identifier(name).as_string()} "
                f"SET (publish = 'insert, update, delete, truncate')")
        cur = await conn.execute(_PUBLISHED, (name,))
        rows = sorted((join_qualified(schema, table), ident, has_pk)
                      for schema, table, ident, has_pk in await cur.fetchall())
    published = [r[0] for r in rows]
    missing = [t for t in wanted if t not in published]
    if missing:
        raise SourceConfigError(
            f"publication {name!r} does not include {', '.join(missing)}; run ALTER "
            f"PUBLICATION {sql.Identifier(name).as_string()} ADD TABLE "
            f"{_table_list(missing).as_string()}")
    keyless = [table for table, ident, has_pk in rows
               if ident == "n" or (ident == "d" and not has_pk)]
    if keyless:
        fixes = "; ".join(f"ALTER TABLE {sql.Identifier(*_qualified(t)).as_string()} "
                          f"REPLICA IDENTITY FULL" for t in keyless)
        raise SourceConfigError(
            f"table(s) {', '.join(keyless)} in publication {name!r} have no primary key "
            f"(nor replica identity), so their updates and deletes cannot be captured: add a "
            f"primary key, or {fixes}")
    return PublishedTables(published, {table: _IDENTITY[ident] for table, ident, _ in rows})


# --- the slot ---------------------------------------------------------------------------


class CreatedSlot(NamedTuple):
    """A new slot: its first change comes right after `consistent_point`, and the exported
    snapshot `snapshot_name` shows exactly the data committed before it."""

    name: str
    consistent_point: Lsn
    snapshot_name: str


@asynccontextmanager
async def create_slot(dsn: str, slot: str, *, two_phase: bool = False, failover: bool = False,
                      temporary: bool = False) -> AsyncIterator[CreatedSlot]:
    """Create a pgoutput slot with an exported snapshot, valid while the context is open.

    Use the snapshot from another connection (`BEGIN ISOLATION LEVEL REPEATABLE READ;
    SET TRANSACTION SNAPSHOT '<name>'`) inside the context. Leaving it closes the connection
    that created the slot, which ends the snapshot; the slot remains (unless `temporary`, which
    goes with the connection). `failover` is used on PostgreSQL 17+ and ignored before.
    """
    conn = await _connect(dsn, replication="database")
    try:
        version = conn.info.server_version
        options: list[sql.Composable] = []
        tail: sql.Composable
        if version >= 150000:
            options.append(sql.SQL("SNAPSHOT 'export'"))
            if two_phase:
                options.append(sql.SQL("TWO_PHASE true"))
            if failover and version >= 170000:
                options.append(sql.SQL("FAILOVER true"))
            elif failover:
                logger.info("slot %s: failover slots need PostgreSQL 17 (server is %d)",
                            slot, version)
            tail = sql.SQL("({})").format(sql.SQL(", ").join(options))
        elif two_phase:
            raise SourceConfigError("two-phase decoding needs PostgreSQL 15 or later")
        else:
            tail = sql.SQL("EXPORT_SNAPSHOT")
        command = sql.SQL("CREATE_REPLICATION_SLOT {} {}LOGICAL pgoutput {}").format(
            sql.Identifier(slot), sql.SQL("TEMPORARY " if temporary else ""), tail)
        try:
            cur = await conn.execute(command)
        except psycopg.Error as exc:
            raise _creation_error(slot, exc) from exc
        row = await cur.fetchone()
        assert row is not None
        created = CreatedSlot(str(row[0]), Lsn.parse(row[1]), str(row[2]))
        logger.info("created replication slot %s at %s (snapshot %s)", slot,
                    created.consistent_point, created.snapshot_name)
        yield created
    finally:
        await conn.close()


def _creation_error(slot: str, exc: psycopg.Error) -> Exception:
    message = exc.diag.message_primary or str(exc)
    if isinstance(exc, psycopg.errors.DuplicateObject):
        return SlotExistsError(slot, (
            f"replication slot {slot!r} already exists; capture uses it as it is (a new slot "
            f"and snapshot only after the old one is dropped on purpose)"), exc.sqlstate)
    if exc.sqlstate == "53400":
        return SourceConfigError(
            f"cannot create replication slot {slot!r}: {message}; raise max_replication_slots "
            f"in postgresql.conf (and restart), or drop an unused slot")
    if exc.sqlstate == "55000" and "wal_level" in message:
        return SourceConfigError(f"cannot create replication slot {slot!r}: {message}; set "
                                 f"wal_level = logical in postgresql.conf and restart PostgreSQL")
    return exc


@dataclass(frozen=True)
class SlotStatus:
    """One row of `pg_replication_slots` (columns a server version lacks are None)."""

    slot_name: str
    plugin: str | None
    slot_type: str
    database: str | None
    temporary: bool
    active: bool
    active_pid: int | None
    restart_lsn: Lsn | None
    confirmed_flush_lsn: Lsn | None
    wal_status: str | None
    two_phase: bool | None
    conflicting: bool | None  # 16+
    failover: bool | None  # 17+
    invalidation_reason: str | None  # 17+

    @property
    def invalidated(self) -> bool:
        return self.wal_status == "lost" or self.invalidation_reason is not None


async def slot_status(dsn: str, slot: str) -> SlotStatus | None:
    """The slot as `pg_replication_slots` shows it, or None when there is no such slot."""
    async with await _connect(dsn) as conn:
        version = conn.info.server_version
        extra = [
            "conflicting" if version >= 160000 else "NULL",
            "failover" if version >= 170000 else "NULL",
            "invalidation_reason" if version >= 170000 else "NULL",
        ]
        query = (
            "SELECT slot_name::text, plugin::text, slot_type, database::text, temporary, "
            "active, active_pid, restart_lsn::text, confirmed_flush_lsn::text, wal_status, "
            f"two_phase, {', '.join(extra)} FROM pg_replication_slots WHERE slot_name = %s"
        )
        cur = await conn.execute(query, (slot,))
        row = await cur.fetchone()
    if row is None:
        return None
    values = list(row)
    for i in (7, 8):
        values[i] = Lsn.parse(values[i]) if values[i] is not None else None
    return SlotStatus(*values)


_LAG = """
SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn()
        END - confirmed_flush_lsn)::bigint
FROM pg_replication_slots WHERE slot_name = %s
"""


async def slot_lag(conn: psycopg.AsyncConnection[Any], slot: str) -> int | None:
    """The WAL the slot holds back, in bytes: the server's WAL position minus the slot's
    `confirmed_flush_lsn` (None without the slot, or before it confirmed anything)."""
    cur = await conn.execute(_LAG, (slot,))
    row = await cur.fetchone()
    return None if row is None or row[0] is None else max(0, int(row[0]))


def check_slot_usable(status: SlotStatus, slot: str, database: str,
                      plugin: str = "pgoutput") -> None:
    """Raise a SlotError subclass when capture must not stream from this slot as it is.

    Nothing is dropped or changed: an invalidated slot is for an operator to deal with.
    """
    if status.invalidated:
        why = status.invalidation_reason or f"wal_status = {status.wal_status}"
        raise SlotInvalidatedError(slot, (
            f"replication slot {slot!r} was invalidated ({why}): the WAL it needed is gone and "
            f"changes since {status.confirmed_flush_lsn} cannot be captured. Capture stops. "
            f"After an operator confirms, drop the slot, and start again with a new slot and "
            f"snapshot (the archive records the gap)"))
    if status.slot_type != "logical" or status.plugin != plugin:
        kind = f"a {status.slot_type} slot" + (f" of plugin {status.plugin!r}"
                                               if status.plugin else "")
        raise SlotMismatchError(slot, (
            f"replication slot {slot!r} is {kind}, but capture needs a logical {plugin!r} "
            f"slot; configure another slot name (the existing slot is left alone)"))
    if status.database != database:
        raise SlotMismatchError(slot, (
            f"replication slot {slot!r} belongs to database {status.database!r}, not "
            f"{database!r}; configure another slot name, or point capture at "
            f"{status.database!r}"))
