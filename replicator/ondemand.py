"""On-demand snapshots: one captured table, or every row of one wedding, published at a fresh
consistent point by a separate process (`replicator snapshot`) while `replicator run` streams.
The rows go to their tier topics as op `r` events and the snapshot is recorded under
`ondemand/...` in the capture's state topic; the capture slot and the initial snapshot's
records are not touched.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import psycopg
from psycopg import sql

from replicator.capture import OPERATOR_ERRORS, Capture, CaptureFatal, SnapshotRecorder
from replicator.position import Lsn
from replicator.priority import WeddingCalendar
from replicator.source import slot as slots
from replicator.source.catalog import load_types, table_info
from replicator.source.snapshot import (
    SnapshotRequestError,
    SnapshotResult,
    check_filter,
    qualified_name,
    wedding_filters,
)
from replicator.transport.kafka import ensure_topics


async def snapshot_on_demand(capture: Capture, *, table: str | None = None,
                             wedding: str | None = None) -> SnapshotResult:
    """Snapshot one captured table, or every row of one wedding, at a fresh consistent
    point, while `replicator run` goes on streaming: publish the rows as op `r` events
    to their tier topics, wait for every acknowledgement, and record the snapshot under
    `ondemand/...` in the state topic. The capture slot and the initial snapshot's records
    are not touched. A wedding snapshot covers the tables linked to a wedding (the others
    are in `skipped`); rows are classified by a calendar warmed inside the snapshot.

    Raises SnapshotRequestError for a table that is not captured or a wedding id the id
    column cannot hold, and CaptureFatal for what `run` would stop on.
    """
    if (table is None) == (wedding is None):
        raise ValueError("give exactly one of table and wedding")
    try:
        captured = await _prepare_on_demand(capture)
        if table is not None:
            name = qualified_name(table)
            if name not in captured:
                raise SnapshotRequestError(
                    f"{name} is not captured: publication "
                    f"{capture.config.source.publication!r} has "
                    f"{', '.join(captured) or 'no tables'}")
            tables, where = [name], None
        else:
            assert wedding is not None
            where = wedding_filters(capture.config.priority, captured, wedding)
            tables = capture._snapshot_order(list(where))
            if not tables:
                raise SnapshotRequestError(
                    f"no captured table leads to a wedding: configure "
                    f"{capture.config.priority.weddings_table} or priority.tables")
        async with await psycopg.AsyncConnection.connect(capture.dsn, autocommit=True) as conn:
            await load_types(conn, capture.registry)
            for name in tables:
                capture.tables[name] = await table_info(conn, name)
                # Before anything is published: the id fits every column it is compared
                # with, and the configured link columns exist.
                await check_filter(conn, capture.tables[name], (where or {}).get(name),
                                   wedding=wedding)
        await capture.producer.start()
        result = await capture.snapshot_with_temporary_slot(
            tables, where, record=_ondemand_recorder(capture, where, wedding),
            calendar=WeddingCalendar(capture.config.priority, today=capture.calendar.today))
        result.table = tables[0] if table is not None else None
        result.wedding = wedding
        if wedding is not None:
            result.skipped = tuple(t for t in captured if t not in tables)
        return result
    except OPERATOR_ERRORS as exc:
        raise CaptureFatal(str(exc)) from exc
    finally:
        await capture.producer.stop()
        await capture.state.close()
        if capture.claims is not None:
            await capture.claims.close()

async def _prepare_on_demand(capture: Capture) -> list[str]:
    """Check the server can create the temporary slot, read the publication's tables
    (never creating it: the tables are the ones `run` captures), create missing topics."""
    src, kafka = capture.config.source, capture.config.kafka
    info = await slots.check_server(capture.dsn)
    capture.server_version = info.version_num
    async with await psycopg.AsyncConnection.connect(capture.dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                                 (src.publication,))
        exists = await cur.fetchone() is not None
    if not exists:
        raise SnapshotRequestError(
            f"publication {src.publication!r} does not exist, so no table is captured yet: "
            f"start `replicator run` first")
    published = await slots.ensure_publication(capture.dsn, src.publication, src.tables)
    await ensure_topics(kafka.bootstrap_servers, kafka.topic_prefix, kafka.partitions,
                        kafka.replication_factor, max_message_bytes=kafka.max_message_bytes)
    return list(published)

def _ondemand_recorder(capture: Capture, where: Mapping[str, sql.Composable] | None,
                       wedding: str | None) -> SnapshotRecorder:
    async def record(table: str, lsn: Lsn, rows: int) -> None:
        key = f"ondemand/{lsn.hex_key()}/{table}" + (
            f"/wedding/{wedding}" if wedding is not None else "")
        condition = (where or {}).get(table)
        await capture.state.put(key, {
            "table": table, "lsn": int(lsn), "rows": rows, "wedding": wedding,
            "where": condition.as_string() if condition is not None else None,
            "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return record
