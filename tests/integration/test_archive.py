"""Archive end to end: workload -> PostgreSQL -> capture -> Kafka -> sinks into a local
folder, S3 (moto), Azure Blob (Azurite) and GCS (fake-gcs-server) at once."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
from pathlib import Path
from typing import Any

import psycopg

from replicator.capture import Capture
from replicator.ops.metrics import MetricsServer, PipelineCollector
from replicator.sink.service import Sinks
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import (
    archived_schemas,
    archived_state,
    destination_checkpoint,
    destinations,
    sink_environ,
    with_destinations,
)
from tests.integration.capture_helpers import holds, make_config, setup_schema, wait_for


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()



def workload(dsn: str) -> int:
    """Streamed changes after the snapshot; returns an LSN inside the last transaction."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(40):
            if i == 20:  # a schema change mid-stream: archived for replay
                conn.execute("ALTER TABLE guests ADD COLUMN seat int")
            with conn.transaction():
                conn.execute("UPDATE guests SET notes = %s WHERE id = %s",
                             (f"note {i}", 1 + i % 50))
                conn.execute("INSERT INTO guests VALUES (%s, %s, 'late', NULL, NULL)",
                             (1000 + i, 1 + i % 3))
                if i % 5 == 0:
                    conn.execute("DELETE FROM guests WHERE id = %s", (1000 + i,))
                row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
    assert row is not None
    return int(row[0])


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
    metrics = MetricsServer("127.0.0.1:0", PipelineCollector(lambda: capture, lambda: sinks.stats),
                            ready=lambda: not any(t.done() for t in tasks))
    await metrics.start()
    try:
        await wait_for(lambda: holds(capture.stats.snapshot_rows >= 53), what="the snapshot")
        # Inside the last transaction: its commit lies past this LSN, so a checkpoint
        # beyond it covers every transaction of the workload.
        inside = await asyncio.to_thread(workload, pg_dsn)

        async def all_durable() -> bool:
            for d in dests:
                if await destination_checkpoint(d.url, d.name) <= inside:
                    return False
            return True
        await wait_for(all_durable, within=60, what="every destination's checkpoint")
        scraped = await asyncio.to_thread(http_get, metrics.port, "/metrics")
        assert await asyncio.to_thread(http_get, metrics.port, "/readyz") == "ready\n"
    finally:
        await metrics.stop()
        capture.stop()
        sinks.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
    # The endpoint shows each stage's position and progress.
    for d in dests:
        line = f'wedsync_sink_checkpoint_lsn{{destination="{d.name}",tier="all"}}'
        assert line in scraped and float(scraped.split(line)[1].split()[0]) > inside
    assert 'wedsync_capture_events_total{tier="low"}' in scraped
    assert "wedsync_capture_confirmed_lsn" in scraped
    # Where a sink's memory goes, beside the process's own figures.
    for d in dests:
        for what in ("buffered_rows", "buffered_bytes", "uncommitted_runs",
                     "tracked_transactions", "transaction_records"):
            assert f'wedsync_sink_held{{destination="{d.name}",what="{what}"}}' in scraped
    resident = scraped.split("\nprocess_resident_memory_bytes ")[1].split()[0]
    assert float(resident) > 20e6
    expected = source_rows(pg_dsn)
    for d in dests:
        history = await archived_schemas(d.url, "public.guests")
        assert len(history) >= 2, d.name
        first, last = history[0], history[-1]
        assert [c["name"] for c in first["columns"]] == ["id", "wedding_id", "name", "dietary",
                                                         "notes"]
        # The document carries the column's default (none here) and type modifier beside it.
        assert last["columns"][-1] == {"name": "seat", "type": "integer", "type_oid": 23,
                                       "type_modifier": -1, "not_null": False, "default": None}
        assert first["columns"][0]["type"] == "bigint" and first["columns"][0]["not_null"]
        assert first["columns"][3]["type"] == "jsonb"
        assert first["primary_key"] == ["id"] and first["lsn"] < last["lsn"]
    for d in dests:
        state = await archived_state(d.url, "public.guests")
        live = {k: v for k, v in state.items() if v is not None}
        assert set(live) == set(expected), d.name
        for key, row in expected.items():
            got = live[key]
            assert (got["name"], got["notes"], got["wedding_id"]) == \
                (row["name"], row["notes"], row["wedding_id"]), (d.name, key)
