"""A gap the capture recorded (a lost slot replaced with `--accept-gap`) reaches the archive
(`gaps/<from>-<to>.json`), and a replay from the store alone plans around it: a point inside
is refused, a point after it starts from the capture's new snapshot (rows deleted while no slot
was reading do not come back), and a point before it is restored as ever."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from connectors.registry import open_store
from replicator.archive.reader import recorded_gaps
from replicator.position import Lsn
from replicator.replay.plan import ReplayRefused
from replicator.replay.run import prepare
from replicator.replay.targets import PostgresTarget
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import keyring, sink_environ
from tests.integration.replay_helpers import (
    TABLES,
    pipeline,
    record_point,
    restore_db,
    restored_state,
    run_replay,
    seeded_archive,
    snapshot_done,
    snapshotted,
    wait_durable,
)


async def test_a_recorded_gap_is_archived_and_planned_around(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path, s3_target: StoreTarget) -> None:
    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path, s3_target)
    async with snapshotted(config) as capture:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE guests SET name = 'before the gap' WHERE id <= 10")
            before = record_point(conn)
        await wait_durable(dests, before.lsn)

    # The slot is lost while nothing reads it: these changes never reach Kafka.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (config.source.slot,))
        conn.execute("DELETE FROM guests WHERE id BETWEEN 11 AND 30")
        conn.execute("UPDATE vendors SET name = 'during the gap' WHERE id <= 5")
        conn.execute("INSERT INTO vendors VALUES (99, 'added during the gap', 1, NULL)")

    async with pipeline(config, accept_gap=True) as capture:
        await snapshot_done(capture, 126)  # every table again, at the new slot's start
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE guests SET name = 'after the gap' WHERE id BETWEEN 31 AND 35")
            conn.execute("DELETE FROM guests WHERE id = 36")
            after = record_point(conn)
        await wait_durable(dests, after.lsn)
        [(start, end)] = capture.state.gaps()

    for dest in dests:
        store = open_store(dest.url, sink_environ())
        try:
            assert await recorded_gaps(store, keyring()) == [(start, end)], dest.name
            planned = (await prepare(store, keyring(), at=after.lsn)).plan
            assert planned.gaps == ((start, end),)
            assert {t.base_kind for t in planned.tables} == {"resnapshot"}
        finally:
            await store.close()
        with restore_db(pg_server_dsn) as target_dsn:
            # After the gap: from the new snapshot on; the rows deleted during the gap stay
            # deleted, the rows changed during it have their new values.
            await run_replay(dest.url, PostgresTarget(target_dsn), after.lsn)
            assert restored_state(target_dsn) == after.state, dest.name
        with restore_db(pg_server_dsn) as target_dsn:
            # At the gap's start: the state before it, from the first snapshot.
            await run_replay(dest.url, PostgresTarget(target_dsn), start)
            assert restored_state(target_dsn) == before.state, dest.name
        # Inside the gap: refused, pointing at the last point before it.
        with restore_db(pg_server_dsn) as target_dsn, \
                pytest.raises(ReplayRefused, match="inside the recorded gap") as refused:
            await run_replay(dest.url, PostgresTarget(target_dsn), Lsn(start + 1))
        assert refused.value.nearest is not None and refused.value.nearest <= start
        assert f"{start}-{end}" in str(refused.value)
    assert set(after.state) == set(TABLES)
