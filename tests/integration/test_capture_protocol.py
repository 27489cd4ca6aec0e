"""Protocol corners of capture against real PostgreSQL 15 and 18: two-phase transactions
(with a restart between PREPARE and COMMIT PREPARED), and the heartbeat that keeps a quiet
slot moving while other tables are busy."""

from __future__ import annotations

import psycopg

from replicator.capture import Capture
from tests.integration.capture_helpers import (
    holds,
    make_config,
    read_all,
    setup_schema,
    slot_confirmed,
    wait_for,
)
from tests.integration.test_capture import current_lsn, data_events, running


async def test_two_phase_commit_prepared_survives_a_restart(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix, two_phase=True)
    first = Capture(config)
    async with running(first):
        await wait_for(lambda: holds(first.stats.snapshot_rows >= 3), what="snapshot")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO vendors VALUES (1, 'Prepared florist', 10)")
            conn.execute("PREPARE TRANSACTION 'florist'")
            conn.execute("BEGIN")
            conn.execute("INSERT INTO vendors VALUES (2, 'Never', 10)")
            conn.execute("PREPARE TRANSACTION 'never'")
            conn.execute("INSERT INTO vendors VALUES (3, 'Plain', 10)")
        await wait_for(lambda: holds(first.stats.events >= 1), what="the plain insert")
        # Heartbeats pass; the slot must still not be confirmed past the open PREPAREs.
        await wait_for(lambda: holds(first.stats.last_heartbeat_rtt_s is not None),
                       what="a heartbeat")
    # Restarted between PREPARE and COMMIT PREPARED: the prepared changes must come again.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("COMMIT PREPARED 'florist'")
        conn.execute("ROLLBACK PREPARED 'never'")
    target = await current_lsn(pg_dsn)
    second = Capture(config)
    async with running(second):
        async def confirmed() -> bool:
            lsn = await slot_confirmed(pg_dsn, config.source.slot)
            return lsn is not None and lsn >= target
        await wait_for(confirmed, what="confirmed past COMMIT PREPARED")
    events = data_events(await read_all(kafka_bootstrap, topic_prefix))
    vendors = {r.value["key"]["id"]: r.value for r in events
               if r.value["source"]["table"] == "vendors"}
    assert set(vendors) == {1, 3}
    assert vendors[1]["after"]["name"] == "Prepared florist"


async def test_quiet_slot_advances_while_other_tables_are_busy(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE audit_log (id bigserial PRIMARY KEY, line text)")
    tables = ("public.weddings", "public.guests", "public.vendors")  # audit_log not captured
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix, tables=tables)
    capture = Capture(config)
    async with running(capture):
        await wait_for(lambda: holds(capture.stats.snapshot_rows >= 3), what="snapshot")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for _ in range(20):
                conn.execute("INSERT INTO audit_log (line) SELECT repeat('x', 500) "
                             "FROM generate_series(1, 200)")
        busy_until = await current_lsn(pg_dsn)

        async def advanced() -> bool:
            lsn = await slot_confirmed(pg_dsn, config.source.slot)
            return lsn is not None and lsn >= busy_until
        await wait_for(advanced, what="the slot to pass the neighbours' WAL")
        await wait_for(lambda: holds(capture.stats.last_heartbeat_rtt_s is not None),
                       what="a heartbeat round trip")
    assert capture.stats.events == 0  # nothing of audit_log was published
