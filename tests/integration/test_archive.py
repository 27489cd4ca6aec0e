"""Archive end to end: workload -> PostgreSQL -> capture -> Kafka -> sinks into a local
folder, S3 (moto), Azure Blob (Azurite) and GCS (fake-gcs-server) at once."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import psycopg

from replicator.capture import Capture
from replicator.sink.service import Sinks
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import (
    archived_state,
    destination_checkpoint,
    destinations,
    sink_environ,
    with_destinations,
)
from tests.integration.capture_helpers import make_config, setup_schema, wait_for


def source_rows(dsn: str) -> dict[Any, dict[str, Any]]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute("SELECT id, wedding_id, name, dietary::text AS dietary, notes FROM guests")
        return {row["id"]: row for row in cur.fetchall()}


async def test_every_committed_change_reaches_every_destination(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        s3_target: StoreTarget, azure_target: StoreTarget, gcs_target: StoreTarget) -> None:
    setup_schema(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO guests SELECT g, 1 + g % 3, 'guest ' || g, '{\"a\": 1}', NULL "
                     "FROM generate_series(1, 50) g")
    dests = destinations(tmp_path, s3_target, azure_target, gcs_target)
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), dests)
    capture = Capture(config)
    sinks = Sinks(config, sink_environ())
    await sinks.open()
    tasks = [asyncio.create_task(capture.run()), asyncio.create_task(sinks.run())]
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for i in range(40):
                with conn.transaction():
                    conn.execute("UPDATE guests SET notes = %s WHERE id = %s",
                                 (f"note {i}", 1 + i % 50))
                    conn.execute("INSERT INTO guests VALUES (%s, %s, 'late', NULL, NULL)",
                                 (1000 + i, 1 + i % 3))
                    if i % 5 == 0:
                        conn.execute("DELETE FROM guests WHERE id = %s", (1000 + i,))
                    # Inside the last transaction: its commit lies past this LSN, so a
                    # checkpoint beyond it covers every transaction of the workload.
                    row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
        assert row is not None
        inside = int(row[0])

        async def all_durable() -> bool:
            for d in dests:
                if await destination_checkpoint(d.url, d.name) <= inside:
                    return False
            return True
        await wait_for(all_durable, within=60, what="every destination's checkpoint")
    finally:
        capture.stop()
        sinks.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
    expected = source_rows(pg_dsn)
    for d in dests:
        state = await archived_state(d.url, "public.guests")
        live = {k: v for k, v in state.items() if v is not None}
        assert set(live) == set(expected), d.name
        for key, row in expected.items():
            got = live[key]
            assert (got["name"], got["notes"], got["wedding_id"]) == \
                (row["name"], row["notes"], row["wedding_id"]), (d.name, key)
