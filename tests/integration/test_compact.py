"""Compaction end to end: an archive written by the real pipeline (PostgreSQL, Kafka, the sinks)
into every store kind is compacted at a recorded point; restores before, at and after it
equal the exact table states recorded at those points, a wedding restore reads one snapshot
part per table, damage to a compaction snapshot is named or passed over, and the service
compacts on its schedule."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from connectors.registry import open_store
from replicator.archive.layout import manifest_key, snapshot_key
from replicator.archive.reader import ReplayFailed
from replicator.config import CompactionConfig
from replicator.ops.metrics import PipelineCollector
from replicator.position import Lsn
from replicator.replay.compact import CompactSummary, compact
from replicator.replay.plan import LATEST, At, ReplayRefused
from replicator.replay.run import prepare
from replicator.replay.targets import FileTarget, PostgresTarget
from replicator.replay.verify import verify
from replicator.sink.compaction import Compactor
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import destinations, keyring, sink_environ
from tests.integration.capture_helpers import holds, wait_for
from tests.integration.replay_helpers import (
    TABLES,
    Point,
    archive_config,
    build_archive,
    of_wedding,
    random_workload,
    record_point,
    restore_db,
    restored_state,
    run_replay,
    seed,
    seeded_archive,
    snapshotted,
    table_state,
    wait_durable,
)

REPLICATOR = str(Path(sys.executable).parent / "replicator")


async def run_compact(url: str, at: At = LATEST, **options: object) -> CompactSummary:
    store = open_store(url, sink_environ())
    try:
        return await compact(store, keyring(), at=at, **options)  # type: ignore[arg-type]
    finally:
        await store.close()


async def base_kinds(url: str, at: At) -> dict[str, str]:
    store = open_store(url, sink_environ())
    try:
        prepared = await prepare(store, keyring(), at=at)
        return {t.table: t.base_kind for t in prepared.plan.tables}
    finally:
        await store.close()


async def test_compaction_in_every_store_restores_every_point(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path, s3_target: StoreTarget, azure_target: StoreTarget,
        gcs_target: StoreTarget) -> None:
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        s3_target, azure_target, gcs_target, pause=0.03)
    middle = Lsn(points[1].lsn)
    for d in dests:
        summary = await run_compact(d.url, middle)
        assert summary.target == middle
        done = {t.table: t for t in summary.tables}
        assert set(done) == set(TABLES) and all(t.done for t in done.values()), summary
        assert done["public.guests"].rows == len(points[1].state["public.guests"])
        assert done["public.guests"].changes > 0
        # The plan now starts from the snapshot at the middle point and after it, not before.
        assert await base_kinds(d.url, middle) == {t: "snapshot" for t in TABLES}
        assert set((await base_kinds(d.url, Lsn(points[0].lsn))).values()) != {"snapshot"}
    local = tmp_path / "archive" / "snapshots" / "public.guests" / middle.hex_key()
    assert sorted(p.name for p in local.iterdir()) == ["manifest-1.json", "part-0.snap"]

    # Every recorded point, from every store: before the snapshot (segments as before), at
    # it (the snapshot only) and after it (the snapshot and the changes after it).
    for point in points:
        for d in dests:
            with restore_db(pg_server_dsn) as target_dsn:
                result = await run_replay(d.url, PostgresTarget(target_dsn), Lsn(point.lsn))
                assert restored_state(target_dsn) == point.state, (d.name, point.lsn)
                assert result.rows == sum(len(rows) for rows in point.state.values())
                if point.lsn == middle:  # one part per table, no segment
                    assert {t: s.segments for t, s in result.tables.items()} == dict.fromkeys(
                        TABLES, 1), d.name
    # One wedding after the snapshot, and into files.
    with restore_db(pg_server_dsn) as target_dsn:
        await run_replay(dests[1].url, PostgresTarget(target_dsn), Lsn(points[2].lsn),
                         wedding="2")
        assert restored_state(target_dsn) == of_wedding(points[2].state, 2)
    out = tmp_path / "files"
    await run_replay(dests[0].url, FileTarget(out, "jsonl"), middle)
    ids = sorted(int(r.split(",", 1)[0].strip("(")) for r in points[1].state["public.guests"])
    rows = [json.loads(line) for line in (out / "public.guests.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ids

    # Verify starts from the snapshot too, and checks the changes after it (and restores into
    # a scratch database, hashed back).
    store = open_store(dests[2].url, sink_environ())
    try:
        report = await verify(store, keyring(), at=LATEST, scratch_dsn=pg_server_dsn)
    finally:
        await store.close()
    assert report.ok, report.to_dict()

    # Compacting again at the same point passes over; with --min-changes above what changed
    # since, too; at the latest point it folds the rest.
    again = await run_compact(dests[0].url, middle)
    assert {t.reason for t in again.tables} == {"its snapshot is already at this point"}
    fewer = await run_compact(dests[0].url, LATEST, min_changes=10**6)
    assert not any(t.done for t in fewer.tables)
    assert all("fewer than the 1000000 asked" in (t.reason or "") for t in fewer.tables)
    # ... or than a fraction of the rows at the snapshot (the manifest counts them).
    rows = len(points[1].state["public.guests"])
    ratio = await run_compact(dests[0].url, LATEST, tables=["public.guests"],
                              min_changes_ratio=100)
    assert f"fewer than the {rows * 100} asked" in (ratio.tables[0].reason or "")
    latest = await run_compact(dests[0].url, LATEST)
    assert any(t.done for t in latest.tables)
    with restore_db(pg_server_dsn) as target_dsn:
        await run_replay(dests[0].url, PostgresTarget(target_dsn), LATEST)
        with psycopg.connect(pg_dsn) as live:
            assert restored_state(target_dsn) == {t: table_state(live, t) for t in TABLES}


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True)
async def test_a_damaged_or_unfinished_snapshot(pg_dsn: str, pg_server_dsn: str,
                                                kafka_bootstrap: str, topic_prefix: str,
                                                tmp_path: Path) -> None:
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        transactions=30, points_at=(12, 29))
    url = dests[0].url
    at = Lsn(points[1].lsn)
    folder = tmp_path / "archive" / "snapshots" / "public.guests" / at.hex_key()

    # The command: JSON summary, exit 0.
    done = await asyncio.to_thread(
        subprocess.run, [REPLICATOR, "compact", "--from", url, "--at", str(at), "--json"],
        env=sink_environ(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["target"] == str(at) and doc["tables"]["public.guests"]["done"] is True

    # A compaction cut short (parts, no manifest) is passed over: the restore is as before.
    # Compacting at that point again is refused (another run may be writing those parts).
    manifest = folder / "manifest-1.json"
    saved = manifest.read_bytes()
    manifest.unlink()
    assert (await base_kinds(url, at))["public.guests"] != "snapshot"
    with restore_db(pg_server_dsn) as target_dsn:
        await run_replay(url, PostgresTarget(target_dsn), at)
        assert restored_state(target_dsn) == points[1].state
    redo = await run_compact(url, at, tables=["public.guests"])
    assert not redo.tables[0].done
    assert "1 part(s) of a compaction at this point have no manifest" in (
        redo.tables[0].reason or "")
    assert sorted(p.name for p in folder.iterdir()) == ["part-0.snap"]
    manifest.write_bytes(saved)
    assert (await base_kinds(url, at))["public.guests"] == "snapshot"

    # A tampered part stops the replay, naming it; nothing is committed.
    part = folder / "part-0.snap"
    original = part.read_bytes()
    spoiled = bytearray(original)
    spoiled[len(spoiled) // 2] ^= 0x01
    part.write_bytes(bytes(spoiled))
    with restore_db(pg_server_dsn) as target_dsn:
        with pytest.raises(ReplayFailed, match=r"object snapshots/public\.guests/"
                                               rf"{at.hex_key()}/part-0\.snap cannot be "
                                               "decrypted") as failed:
            await run_replay(url, PostgresTarget(target_dsn), at)
        assert failed.value.object == snapshot_key("public.guests", at, 0)
        with psycopg.connect(target_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                                ).fetchone() == (0,)
    # A missing part of a complete snapshot is refused, naming it and its manifest.
    part.unlink()
    with pytest.raises(ReplayRefused, match=r"missing its part snapshots/public\.guests/"
                                            rf"{at.hex_key()}/part-0\.snap"):
        await run_replay(url, FileTarget(tmp_path / "never", "jsonl"), at)
    assert manifest_key("public.guests", at, 1).endswith("manifest-1.json")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True)
async def test_changes_after_a_snapshot_taken_by_the_running_service(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    # Compaction while the pipeline runs; then a truncate, re-inserted rows, a key change and
    # updates leaving TOASTed notes alone: the restore loads the snapshot, removes the rows
    # those changes replace (all of them after the truncate) and adds their new versions.
    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    url = dests[0].url
    async with snapshotted(config):
        first = await asyncio.to_thread(random_workload, pg_dsn, rng=random.Random(11),
                                        transactions=15, points_at=(14,), add_column_at=99)
        await wait_durable(dests, first[-1].lsn)
        summary = await run_compact(url, LATEST)
        assert all(t.done for t in summary.tables)

        def after_the_snapshot() -> Point:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("CREATE TEMP TABLE kept AS SELECT * FROM vendors WHERE id <= 3")
                conn.execute("TRUNCATE vendors")
                conn.execute("INSERT INTO vendors SELECT * FROM kept")
                conn.execute("UPDATE vendors SET fee = fee + 1 WHERE id = 2")
                ids = [r[0] for r in conn.execute("SELECT id FROM guests ORDER BY id LIMIT 3")]
                conn.execute("UPDATE guests SET name = 'after' WHERE id = %s", (ids[0],))
                conn.execute("UPDATE guests SET id = 99999 WHERE id = %s", (ids[1],))
                conn.execute("DELETE FROM guests WHERE id = %s", (ids[2],))
                point = record_point(conn)
                conn.execute("UPDATE weddings SET couple = couple || '!' WHERE id = 1")
            return point

        point = await asyncio.to_thread(after_the_snapshot)
        await wait_durable(dests, point.lsn)
    assert (await base_kinds(url, Lsn(point.lsn))) == {t: "snapshot" for t in TABLES}
    with restore_db(pg_server_dsn) as target_dsn:
        result = await run_replay(url, PostgresTarget(target_dsn), Lsn(point.lsn))
        assert restored_state(target_dsn) == point.state
        assert result.rows == sum(len(rows) for rows in point.state.values())
    # The same from the in-memory path (no rows removed from a database): verify's hashes.
    store = open_store(url, sink_environ())
    try:
        report = await verify(store, keyring(), at=Lsn(point.lsn), scratch_dsn=pg_server_dsn)
    finally:
        await store.close()
    assert report.ok, report.to_dict()


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True)
async def test_the_service_compacts_on_its_schedule(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    seed(pg_dsn)
    # The timer is an hour away: the snapshot comes from the early check a burst of rows
    # starts (the initial snapshot's, then the workload's).
    schedule = CompactionConfig(check_every_s=3600.0, min_changes=5, min_changes_ratio=0.0,
                                min_interval_s=0.0)
    dests = tuple(d.model_copy(update={"compaction": schedule})
                  for d in destinations(tmp_path))
    config = archive_config(pg_dsn, kafka_bootstrap, topic_prefix, dests)
    guests = tmp_path / "archive" / "snapshots" / "public.guests"

    def manifests() -> list[Path]:
        return sorted(guests.glob("*/manifest-*.json")) if guests.exists() else []

    async with snapshotted(config):
        await asyncio.to_thread(random_workload, pg_dsn, rng=random.Random(3),
                                transactions=20, points_at=(19,), add_column_at=99)
        await wait_for(lambda: holds(bool(manifests())), within=60,
                       what="a compaction snapshot written by the service")
    # The newest snapshot is the base of a restore at the latest point, which equals the
    # source.
    url = dests[0].url
    assert (await base_kinds(url, LATEST))["public.guests"] == "snapshot"
    with restore_db(pg_server_dsn) as target_dsn:
        await run_replay(url, PostgresTarget(target_dsn), LATEST)
        with psycopg.connect(pg_dsn) as live:
            assert restored_state(target_dsn) == {t: table_state(live, t) for t in TABLES}
    # One run by hand: nothing new to fold, a success; its figures reach the metrics.
    compactor = Compactor(dests[0], sink_environ())
    assert await compactor.run_once()
    assert compactor.stats.runs == 1 and compactor.stats.last_success_at > 0
    # A store that cannot be read is a failure; an archive with nothing to compact yet (no
    # checkpoint: a first start) is not.
    broken = Compactor(dests[0].model_copy(update={"url": f"file://{tmp_path / 'nothing'}"}),
                       sink_environ())
    assert not await broken.run_once()
    assert broken.stats.failures == 1
    (tmp_path / "empty").mkdir()
    empty = Compactor(dests[0].model_copy(update={"url": f"file://{tmp_path / 'empty'}"}),
                      sink_environ())
    assert await empty.run_once()
    assert empty.stats.failures == 0 and empty.stats.last_success_at == 0
    registry = CollectorRegistry()
    registry.register(PipelineCollector(lambda: None, dict,
                                        lambda: {"local": compactor.stats,
                                                 "broken": broken.stats}))
    scraped = generate_latest(registry).decode()
    assert 'wedsync_compaction_runs_total{destination="local"} 1.0' in scraped
    assert 'wedsync_compaction_failures_total{destination="broken"} 1.0' in scraped
    assert 'wedsync_compaction_last_success_timestamp_seconds{destination="local"}' in scraped


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True)
async def test_a_table_with_no_snapshot_yet_is_passed_over(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    # A table created after the capture's snapshot, with the DDL triggers not firing
    # (session_replication_role = replica), so it is not re-snapshotted: only its changes are
    # in the archive (no snapshot to start from); compaction folds the others and names it.
    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    async with snapshotted(config):

        def late_table() -> Point:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("SET session_replication_role = replica")
                conn.execute("CREATE TABLE seating (id bigint PRIMARY KEY, wedding_id bigint)")
                conn.execute("RESET session_replication_role")
                conn.execute("INSERT INTO seating SELECT g, 1 FROM generate_series(1, 5) g")
                conn.execute("UPDATE guests SET name = 'late' WHERE id = 1")
                point = record_point(conn)
                conn.execute("UPDATE weddings SET couple = couple || '!' WHERE id = 1")
            return point

        point = await asyncio.to_thread(late_table)
        await wait_durable(dests, point.lsn)
    summary = await run_compact(dests[0].url, LATEST)
    by_table = {t.table: t for t in summary.tables}
    assert {t for t, c in by_table.items() if c.done} == set(TABLES)
    assert "no restorable state of public.seating" in (by_table["public.seating"].reason or "")
    # Asking for that table alone is refused, naming it.
    with pytest.raises(ReplayRefused, match=r"no restorable state of public\.seating"):
        await run_compact(dests[0].url, LATEST, tables=["seating"])
