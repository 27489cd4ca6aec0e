"""Capture end to end: real PostgreSQL (15 and 18) -> the capture -> real Kafka."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from replicator.capture import Capture, CaptureFatal
from tests.integration.capture_helpers import (
    holds,
    make_config,
    read_all,
    setup_schema,
    slot_confirmed,
    wait_for,
)


@contextlib.asynccontextmanager
async def running(capture: Capture) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(capture.run())
    try:
        yield task
    finally:
        capture.stop()
        with contextlib.suppress(CaptureFatal):
            await asyncio.wait_for(task, 30)


async def current_lsn(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_current_wal_lsn() - '0/0'")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def data_events(records: list[Any]) -> list[Any]:
    return [r for r in records if not r.topic.endswith(".transactions")]


async def test_snapshot_then_stream_by_tier(pg_dsn: str, kafka_bootstrap: str,
                                            topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO guests VALUES (10, 1, 'Gran', '{\"vegan\": true}', NULL)")
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    capture = Capture(config)
    async with running(capture):
        await wait_for(lambda: holds(capture.stats.snapshot_rows >= 4), what="snapshot")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            with conn.transaction():
                conn.execute("INSERT INTO guests VALUES (11, 1, 'Aunt', NULL, 'x'), "
                             "(12, 2, 'Uncle', NULL, NULL), (13, 999, 'Nobody', NULL, NULL)")
                conn.execute("UPDATE guests SET name = 'Grandma' WHERE id = 10")
            conn.execute("DELETE FROM guests WHERE id = 12")
            conn.execute("INSERT INTO vendors VALUES (1, 'Florist', 1234.50)")
        target = await current_lsn(pg_dsn)

        async def confirmed() -> bool:
            lsn = await slot_confirmed(pg_dsn, config.source.slot)
            return lsn is not None and lsn >= target
        await wait_for(confirmed, what="slot confirmed past the workload")

    records = await read_all(kafka_bootstrap, topic_prefix)
    events = data_events(records)
    snapshot = [r for r in events if r.value["op"] == "r"]
    assert {(r.value["source"]["table"], r.value["after"]["id"]) for r in snapshot} == {
        ("weddings", 1), ("weddings", 2), ("weddings", 3), ("guests", 10)}
    # Across topics, order is restored by position.
    streamed = [(r.value["op"], r.value["source"]["table"], r.value["key"]["id"], r.topic)
                for r in sorted(events, key=lambda r: r.position) if r.value["op"] != "r"]
    p = topic_prefix
    assert streamed == [
        ("c", "guests", 11, f"{p}.critical"), ("c", "guests", 12, f"{p}.normal"),
        ("c", "guests", 13, f"{p}.low"), ("u", "guests", 10, f"{p}.critical"),
        # Under the default replica identity a delete carries only the key, so its wedding
        # is unknown: default tier (REPLICA IDENTITY FULL keeps the link; see docs).
        ("d", "guests", 12, f"{p}.low"), ("c", "vendors", 1, f"{p}.low"),
    ]
    by_id = {(r.value["source"]["table"], r.value["key"]["id"], r.value["op"]): r
             for r in events}
    gran = by_id[("guests", 10, "r")]
    assert gran.value["wedding_id"] == "1" and gran.value["priority"] == "critical"
    assert gran.topic == f"{p}.critical"
    aunt = by_id[("guests", 11, "c")].value
    assert aunt["after"]["name"] == "Aunt" and aunt["source"]["seq"] == 0
    assert by_id[("guests", 13, "c")].value["wedding_id"] == "999"  # unresolved: default tier
    assert capture.calendar.unresolved >= 1
    fee = by_id[("vendors", 1, "c")].value["after"]["fee"]
    assert str(fee) == "1234.50"
    # One boundary record per transaction, counting its changes per table.
    txs = [r.value for r in records if r.topic.endswith(".transactions")]
    assert {"public.guests": 4} in [t["counts"] for t in txs]
    headers = by_id[("guests", 11, "c")].headers
    assert headers["table"] == "public.guests" and headers["op"] == "c"



async def test_restart_resumes_without_losing_or_resnapshotting(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    first = Capture(config)
    async with running(first):
        await wait_for(lambda: holds(first.stats.snapshot_rows >= 3), what="snapshot")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO vendors VALUES (1, 'Cake', 10)")
        await wait_for(lambda: holds(first.stats.events >= 1), what="first change")
    # While capture is down, the database goes on.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for i in range(2, 7):
            conn.execute("INSERT INTO vendors VALUES (%s, 'Band', 20)", (i,))
    second = Capture(config)
    async with running(second):
        await wait_for(lambda: holds(second.stats.events >= 5), what="changes made while down")
    events = data_events(await read_all(kafka_bootstrap, topic_prefix))
    vendor_ids = sorted(r.value["key"]["id"] for r in events
                        if r.value["source"]["table"] == "vendors")
    assert set(vendor_ids) == {1, 2, 3, 4, 5, 6}
    assert sum(1 for r in events if r.value["op"] == "r") == 3  # no second snapshot


async def test_table_without_primary_key_stops_with_a_clear_error(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE seating_notes (wedding_id bigint, note text)")
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    with pytest.raises(CaptureFatal, match=r"seating_notes.*(primary key|REPLICA IDENTITY)"):
        await asyncio.wait_for(Capture(config).run(), 30)


async def test_unknown_type_stops_with_a_clear_error_and_keeps_position(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    capture = Capture(config)
    async with running(capture) as task:
        await wait_for(lambda: holds(capture.stats.snapshot_rows >= 3), what="snapshot")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO vendors VALUES (1, 'Before', 1)")
        await wait_for(lambda: holds(capture.stats.events >= 1), what="first change")
        before = await slot_confirmed(pg_dsn, config.source.slot)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE vendors ADD COLUMN location point")
            conn.execute("INSERT INTO vendors VALUES (2, 'After', 1, '(1,2)')")
        with pytest.raises(CaptureFatal, match=r"vendors.*location"):
            await asyncio.wait_for(asyncio.shield(task), 30)
    after = await slot_confirmed(pg_dsn, config.source.slot)
    assert before is not None and after is not None
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (str(after),)).fetchone()
    assert row is not None and row[0] > 0  # the failing change was never confirmed


async def test_a_lost_slot_is_never_papered_over(pg_dsn: str, kafka_bootstrap: str,
                                                 topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    first = Capture(config)
    async with running(first):
        await wait_for(lambda: holds(first.stats.snapshot_rows >= 3), what="snapshot")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (config.source.slot,))
    with pytest.raises(CaptureFatal, match=r"is gone.*--accept-gap"):
        await asyncio.wait_for(Capture(config).run(), 30)
    again = Capture(config, accept_gap=True)
    async with running(again):
        await wait_for(lambda: holds(again.stats.snapshot_rows >= 3), what="new snapshot")
    assert len(again.state.gaps()) == 1
