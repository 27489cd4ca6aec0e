"""Replay end to end: a randomized workload through the real pipeline (PostgreSQL, Kafka, the
sinks) into every store kind, then restores to recorded commit points compared with the exact
table states recorded at those points."""

from __future__ import annotations

import json
import random
from pathlib import Path

import psycopg
import pytest

from replicator.position import Lsn
from replicator.replay.plan import LATEST, ReplayRefused
from replicator.replay.targets import FileTarget, PostgresTarget
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import destination_checkpoint
from tests.integration.replay_helpers import (
    TABLES,
    build_archive,
    of_wedding,
    pipeline,
    random_workload,
    restore_db,
    restored_state,
    run_replay,
    seeded_archive,
    snapshotted,
    table_state,
    wait_durable,
)


async def test_replay_to_recorded_points_from_every_store(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path, s3_target: StoreTarget, azure_target: StoreTarget,
        gcs_target: StoreTarget) -> None:
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        s3_target, azure_target, gcs_target, pause=0.03)
    # The snapshot's rows were archived as parts (COPY text), the changes as segments.
    assert list((tmp_path / "archive" / "snapshots" / "public.guests").rglob("rows-*.part"))
    assert list((tmp_path / "archive" / "segments" / "public.guests").glob("*.seg"))
    # The workload left TOASTed notes alone in updates, changed a key and added a column.
    assert points[0].columns["public.guests"] == 6 and points[-1].columns["public.guests"] == 7
    for point in points:
        for d in dests:
            with restore_db(pg_server_dsn) as target_dsn:
                summary = await run_replay(d.url, PostgresTarget(target_dsn), Lsn(point.lsn))
                assert restored_state(target_dsn) == point.state, (d.name, point.lsn)
                assert summary.rows == sum(len(v) for v in point.state.values())
    # One wedding, at every point, from every store: the source's rows of that wedding.
    skipped: list[int] = []
    for point in points:
        for d in dests:
            with restore_db(pg_server_dsn) as target_dsn:
                summary = await run_replay(d.url, PostgresTarget(target_dsn), Lsn(point.lsn),
                                           wedding="2")
                assert restored_state(target_dsn) == of_wedding(point.state, 2), d.name
                assert summary.rows == len(of_wedding(point.state, 2)["public.guests"]) + 1
                skipped.append(summary.objects_skipped)
    # Segments whose header proves they hold nothing of the wedding were not read.
    assert max(skipped) > 0, skipped
    # Restored tables carry the archived schema: types, not-null, primary key.
    with restore_db(pg_server_dsn) as target_dsn:
        await run_replay(dests[0].url, PostgresTarget(target_dsn), LATEST)
        with psycopg.connect(target_dsn) as conn:
            cols = conn.execute(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_name = 'guests' ORDER BY ordinal_position").fetchall()
            pk = conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE "
                              "conrelid = 'guests'::regclass AND contype = 'p'").fetchone()
        assert cols[0] == ("id", "bigint", "NO") and cols[1] == ("wedding_id", "bigint", "NO")
        assert cols[3][1] == "jsonb" and cols[-1] == ("seat", "integer", "YES")
        assert pk == ("PRIMARY KEY (id)",)
        with psycopg.connect(pg_dsn) as live:
            assert restored_state(target_dsn) == {t: table_state(live, t) for t in TABLES}


async def test_replay_by_time_into_files_and_refusals(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        transactions=30, points_at=(12, 29))
    url = dests[0].url
    point = points[0]
    # A cut by time is the same transaction-consistent state as the cut by LSN.
    with restore_db(pg_server_dsn) as target_dsn:
        await run_replay(url, PostgresTarget(target_dsn), point.at)
        assert restored_state(target_dsn) == point.state
        # The tables exist now: a second restore is refused, unless asked to replace them.
        with pytest.raises(ReplayRefused, match=r"already has public\.guests"):
            await run_replay(url, PostgresTarget(target_dsn), LATEST)
        await run_replay(url, PostgresTarget(target_dsn, replace_existing=True,
                                              override_reason="the test may run on a Saturday"),
                         Lsn(points[1].lsn))
        assert restored_state(target_dsn) == points[1].state
    # Files: one per table, in each format, with every row.
    for fmt in ("jsonl", "csv", "parquet"):
        out = tmp_path / f"files-{fmt}"
        await run_replay(url, FileTarget(out, fmt), Lsn(point.lsn))
        files = sorted(p.name for p in out.iterdir())
        assert files == sorted(f"{t}.{fmt}" for t in TABLES)
        guests = out / f"public.guests.{fmt}"
        ids = sorted(int(r.split(",", 1)[0].strip("(")) for r in point.state["public.guests"])
        if fmt == "jsonl":
            rows = [json.loads(line) for line in guests.read_text().splitlines()]
            assert sorted(r["id"] for r in rows) == ids
            assert all(isinstance(r["dietary"], dict | None) for r in rows)
        elif fmt == "csv":
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE guests_csv (LIKE guests)")
                conn.execute("ALTER TABLE guests_csv DROP COLUMN seat")
                with conn.cursor().copy("COPY guests_csv FROM STDIN (FORMAT csv, HEADER)") as cp:
                    cp.write(guests.read_bytes())
                got = [r[0] for r in conn.execute(
                    "SELECT t::text FROM guests_csv t ORDER BY id").fetchall()]
            assert got == point.state["public.guests"]
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(guests)
            assert sorted(table.column("id").to_pylist()) == ids
            assert str(table.schema.field("seen_at").type) == "timestamp[us, tz=UTC]"
    # Past the checkpoint: refused, naming the latest recoverable point.
    checkpoint = await destination_checkpoint(url, dests[0].name)
    with pytest.raises(ReplayRefused, match="past the destination's durable checkpoint") as info:
        await run_replay(url, FileTarget(tmp_path / "never", "jsonl"), Lsn(checkpoint + 10**9))
    assert info.value.nearest == Lsn(checkpoint - 1)
    assert not (tmp_path / "never").exists()


async def test_replay_across_a_key_rotation(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    import asyncio
    import base64

    from connectors.registry import open_store
    from replicator.archive.reader import ReplayFailed
    from replicator.crypto import Keyring
    from replicator.replay.run import replay
    from tests.integration.archive_helpers import sink_environ

    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    async with snapshotted(config):  # objects under TEST1
        first = await asyncio.to_thread(random_workload, pg_dsn, rng=random.Random(1),
                                        transactions=10, points_at=(9,), add_column_at=99)
        await wait_durable(dests, first[-1].lsn)
    rotated = sink_environ(REPLICATOR_KEK_TEST2=base64.b64encode(b"r" * 32).decode(),
                           REPLICATOR_KEK_ACTIVE="TEST2")
    async with pipeline(config, rotated):  # new objects under TEST2, old ones left as they are
        second = await asyncio.to_thread(random_workload, pg_dsn, rng=random.Random(2),
                                         transactions=10, points_at=(9,), add_column_at=99,
                                         first_id=5000)
        await wait_durable(dests, second[-1].lsn, rotated)
    url = dests[0].url
    for point in (first[-1], second[-1]):
        with restore_db(pg_server_dsn) as target_dsn:
            store = open_store(url, rotated)
            try:
                await replay(store, Keyring.from_env(rotated), PostgresTarget(target_dsn),
                             at=Lsn(point.lsn))
            finally:
                await store.close()
            assert restored_state(target_dsn) == point.state
    # Without the retired key, the objects written under it cannot be read: named.
    only_new = {k: v for k, v in rotated.items() if k != "REPLICATOR_KEK_TEST1"}
    store = open_store(url, only_new)
    try:
        with pytest.raises(ReplayFailed, match="key 'TEST1', which is not in the keyring"):
            await replay(store, Keyring.from_env(only_new),
                         FileTarget(tmp_path / "x", "jsonl"), at=LATEST)
    finally:
        await store.close()
