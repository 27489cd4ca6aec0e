"""Server checks, the publication and the slot against real PostgreSQL 15 and 18."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from replicator.position import Lsn
from replicator.source import pgoutput as pg
from replicator.source.slot import (
    SlotExistsError,
    SlotStatus,
    SourceConfigError,
    check_server,
    check_slot_usable,
    create_slot,
    ensure_publication,
    slot_status,
)
from replicator.source.stream import ReplicationStream, SlotInvalidatedError, SlotMismatchError


async def execute(dsn: str, *statements: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement)


def dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


async def server_version(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return conn.info.server_version


# --- server -------------------------------------------------------------------------------


async def test_check_server_reports_the_settings(pg_dsn: str) -> None:
    info = await check_server(pg_dsn)
    assert info.wal_level == "logical"
    assert info.version_num == await server_version(pg_dsn)
    assert info.max_replication_slots >= 10 and info.max_wal_senders >= 10
    assert info.can_replicate


async def test_check_server_names_the_missing_privilege(pg_dsn: str) -> None:
    role = f"r_{dbname(pg_dsn)}"
    await execute(pg_dsn, f"CREATE ROLE {role} LOGIN")
    try:
        dsn = psycopg.conninfo.make_conninfo(pg_dsn, user=role)
        with pytest.raises(SourceConfigError, match=f"ALTER ROLE {role}|ALTER ROLE \"{role}\""):
            await check_server(dsn)
    finally:
        await execute(pg_dsn, f"DROP ROLE {role}")


# --- publication --------------------------------------------------------------------------


async def test_publication_is_created_for_the_tables(pg_dsn: str) -> None:
    await execute(pg_dsn,
                  "CREATE TABLE guest (id int PRIMARY KEY)",
                  "CREATE TABLE vendor (name text)",
                  "ALTER TABLE vendor REPLICA IDENTITY FULL",
                  "CREATE TABLE ignored (id int)")
    tables = await ensure_publication(pg_dsn, "pub", ("guest", "public.vendor"))
    assert tables.replica_identity == {"public.guest": "default", "public.vendor": "full"}
    assert tables == ("public.guest", "public.vendor")
    # Existing: its tables come back, whatever subset is asked for.
    assert await ensure_publication(pg_dsn, "pub", ("guest",)) == tables
    assert await ensure_publication(pg_dsn, "pub", ()) == tables


async def test_publication_for_all_tables_when_none_named(pg_dsn: str) -> None:
    await execute(pg_dsn, "CREATE TABLE guest (id int PRIMARY KEY)",
                  "CREATE TABLE venue (id int PRIMARY KEY)")
    assert await ensure_publication(pg_dsn, "everything", ()) == ("public.guest", "public.venue")


async def test_requested_table_missing_from_publication(pg_dsn: str) -> None:
    await execute(pg_dsn, "CREATE TABLE guest (id int PRIMARY KEY)",
                  "CREATE TABLE venue (id int PRIMARY KEY)",
                  "CREATE PUBLICATION pub FOR TABLE guest")
    with pytest.raises(SourceConfigError,
                       match=r'public\.venue.*ALTER PUBLICATION "pub" ADD TABLE "public"\."venue"'):
        await ensure_publication(pg_dsn, "pub", ("guest", "venue"))


async def test_table_without_primary_key_is_refused_with_the_fix(pg_dsn: str) -> None:
    await execute(pg_dsn, "CREATE TABLE guest (id int PRIMARY KEY)",
                  "CREATE TABLE seating (guest_id int, seat int)")
    with pytest.raises(SourceConfigError, match=r"public\.seating") as caught:
        await ensure_publication(pg_dsn, "pub", ("guest", "seating"))
    message = str(caught.value)
    assert "add a primary key" in message
    assert 'ALTER TABLE "public"."seating" REPLICA IDENTITY FULL' in message
    assert "public.guest" not in message.split("publication")[0]


async def test_publication_that_skips_deletes_is_refused(pg_dsn: str) -> None:
    await execute(pg_dsn, "CREATE TABLE guest (id int PRIMARY KEY)",
                  "CREATE PUBLICATION pub FOR TABLE guest WITH (publish = 'insert, update')")
    with pytest.raises(SourceConfigError, match="SET \\(publish = "):
        await ensure_publication(pg_dsn, "pub", ())


async def test_missing_table_when_creating(pg_dsn: str) -> None:
    with pytest.raises(SourceConfigError, match="nosuch"):
        await ensure_publication(pg_dsn, "pub", ("nosuch",))


# --- slot ---------------------------------------------------------------------------------


async def test_exported_snapshot_matches_the_slot(pg_dsn: str) -> None:
    await execute(pg_dsn, "CREATE TABLE guest (id int PRIMARY KEY, name text)",
                  "CREATE PUBLICATION pub FOR TABLE guest",
                  "INSERT INTO guest VALUES (1, 'before'), (2, 'before')")
    async with create_slot(pg_dsn, "snap_slot", two_phase=False, failover=False) as created:
        assert created.name == "snap_slot" and created.consistent_point > 0
        await execute(pg_dsn, "INSERT INTO guest VALUES (3, 'after')")
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            await conn.execute(f"SET TRANSACTION SNAPSHOT '{created.snapshot_name}'")
            cur = await conn.execute("SELECT id FROM guest ORDER BY id")
            assert [r[0] for r in await cur.fetchall()] == [1, 2]
            await conn.rollback()
    # Leaving the context ended the snapshot but kept the slot.
    status = await slot_status(pg_dsn, "snap_slot")
    assert status is not None and not status.active
    assert status.confirmed_flush_lsn == created.consistent_point
    async with ReplicationStream(pg_dsn, slot="snap_slot", publication="pub",
                                 start_lsn=created.consistent_point, protocol_version=1,
                                 streaming=None) as stream:
        decoder = pg.Decoder(1)
        inserts: list[Any] = []
        async with asyncio.timeout(20):
            while not inserts:
                for m in await stream.read_batch():
                    message = decoder.decode(m.payload)
                    if isinstance(message, pg.Insert):
                        inserts.append(message)
    assert [i.new for i in inserts] == [(b"3", b"after")]


async def test_slot_options_and_status(pg_dsn: str) -> None:
    version = await server_version(pg_dsn)
    async with create_slot(pg_dsn, "opt_slot", two_phase=True, failover=True) as created:
        pass
    status = await slot_status(pg_dsn, "opt_slot")
    assert status is not None
    assert status.slot_name == created.name and status.plugin == "pgoutput"
    assert status.database == dbname(pg_dsn) and status.slot_type == "logical"
    assert status.two_phase is True and not status.temporary
    assert isinstance(status.restart_lsn, Lsn) and status.wal_status == "reserved"
    assert not status.invalidated
    if version >= 170000:
        assert status.failover is True and status.invalidation_reason is None
        assert status.conflicting is False
    else:
        assert status.failover is None
    check_slot_usable(status, "opt_slot", dbname(pg_dsn))
    assert await slot_status(pg_dsn, "nosuch") is None


async def test_creating_an_existing_slot_is_refused(pg_dsn: str) -> None:
    async with create_slot(pg_dsn, "dup_slot"):
        pass
    with pytest.raises(SlotExistsError, match="dup_slot"):
        async with create_slot(pg_dsn, "dup_slot"):
            pass


async def test_temporary_slot_goes_with_its_connection(pg_dsn: str) -> None:
    async with create_slot(pg_dsn, "tmp_slot", temporary=True) as created:
        status = await slot_status(pg_dsn, "tmp_slot")
        assert status is not None and status.temporary and created.snapshot_name
    assert await slot_status(pg_dsn, "tmp_slot") is None


async def test_unusable_slots_are_refused_and_left_alone(pg_dsn: str) -> None:
    await execute(pg_dsn, "SELECT pg_create_logical_replication_slot('td_slot', 'test_decoding')")
    status = await slot_status(pg_dsn, "td_slot")
    assert status is not None
    with pytest.raises(SlotMismatchError, match="test_decoding"):
        check_slot_usable(status, "td_slot", dbname(pg_dsn))
    ours = dataclasses.replace(status, plugin="pgoutput")
    with pytest.raises(SlotMismatchError, match="belongs to database"):
        check_slot_usable(ours, "td_slot", "another_db")
    lost = dataclasses.replace(ours, wal_status="lost")
    assert lost.invalidated
    with pytest.raises(SlotInvalidatedError, match=r"td_slot.*new slot"):
        check_slot_usable(lost, "td_slot", dbname(pg_dsn))
    reason = dataclasses.replace(ours, invalidation_reason="wal_removed")
    with pytest.raises(SlotInvalidatedError, match="wal_removed"):
        check_slot_usable(reason, "td_slot", dbname(pg_dsn))
    assert await slot_status(pg_dsn, "td_slot") == status  # nothing was dropped or changed


def test_slot_status_invalidated_property() -> None:
    base = SlotStatus("s", "pgoutput", "logical", "db", False, False, None, Lsn(1), Lsn(1),
                      "reserved", False, None, None, None)
    assert not base.invalidated
    assert dataclasses.replace(base, wal_status="lost").invalidated
    assert dataclasses.replace(base, invalidation_reason="idle_timeout").invalidated
