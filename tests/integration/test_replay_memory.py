"""Replay memory is bounded by the changed keys, not the table: a table several times larger
than the replay's memory budget restores within it (peak RSS reported by the replay itself)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from replicator.config import DestinationConfig, FlushConfig
from tests.integration.archive_helpers import sink_environ
from tests.integration.replay_helpers import (
    archive_config,
    pipeline,
    restore_db,
    snapshot_done,
    wait_durable,
)

REPLICATOR = str(Path(sys.executable).parent / "replicator")
BUDGET_MB = 160
ROWS = int(os.environ.get("MEMTEST_ROWS", "100000"))
BODY = 3000  # base64 of random bytes: Postgres does not compress it (saves under 25%)


def fill(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE weddings (id bigint PRIMARY KEY, couple text NOT NULL, "
                     "wedding_date date)")
        conn.execute("CREATE TABLE documents (id bigint PRIMARY KEY, wedding_id bigint, "
                      "body text NOT NULL)")
        with conn.cursor().copy("COPY documents FROM STDIN") as copy:
            for i in range(ROWS):
                body = base64.b64encode(os.urandom(BODY * 3 // 4)).decode()
                copy.write_row((i, i % 500, body))


def changes(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(20):
            conn.execute("UPDATE documents SET wedding_id = wedding_id + 1 "
                         "WHERE id BETWEEN %s AND %s", (i * 100, i * 100 + 99))
            conn.execute("DELETE FROM documents WHERE id = %s", (50_000 + i,))
        # The heartbeat's transactions carry the checkpoint past this point.
        row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
    assert row is not None
    return int(row[0])


def checksum(dsn: str) -> tuple[int, int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*), sum(hashtext(t::text)), "
                           "pg_total_relation_size('documents') FROM documents t").fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True)
async def test_a_table_larger_than_the_budget_restores_within_it(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    await asyncio.to_thread(fill, pg_dsn)
    archive = tmp_path / "archive"
    archive.mkdir()
    # Segments of at most 8 MB: what one read holds at a time.
    dests = (DestinationConfig(name="local", url=f"file://{archive}",
                               flush=FlushConfig(critical_s=0.5, high_s=0.8, normal_s=1.0,
                                                 low_s=1.5, max_bytes=8 << 20)),)
    config = archive_config(pg_dsn, kafka_bootstrap, topic_prefix, dests)
    async with pipeline(config) as capture:
        await snapshot_done(capture, ROWS, within=300)
        inside = await asyncio.to_thread(changes, pg_dsn)
        await wait_durable(dests, inside)
    with restore_db(pg_server_dsn) as target:
        done = await asyncio.to_thread(
            subprocess.run,
            [REPLICATOR, "replay", "--from", dests[0].url,
             "--at", "latest", "--to", target, "--tables", "documents",
             "--memory-budget", str(BUDGET_MB), "--json"],
            env=sink_environ(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        restored = await asyncio.to_thread(checksum, target)
    source = await asyncio.to_thread(checksum, pg_dsn)
    assert restored[:2] == source[:2]
    table_mb = restored[2] / 2**20
    print(f"\ntable {table_mb:,.0f} MB restored with peak RSS {summary['peak_rss_mb']} MB "
          f"(budget {BUDGET_MB} MB)")
    assert table_mb > 2 * BUDGET_MB
    assert summary["peak_rss_mb"] <= BUDGET_MB
    assert summary["tables"]["public.documents"]["changed_keys"] == 2020

    # A budget below what the replay needs stops it, and commits nothing.
    with restore_db(pg_server_dsn) as target:
        done = await asyncio.to_thread(
            subprocess.run,
            [REPLICATOR, "replay", "--from", dests[0].url,
             "--at", "latest", "--to", target, "--memory-budget", "40"],
            env=sink_environ(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 1 and "over its memory budget of 40 MB" in done.stderr
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT to_regclass('documents')").fetchone() == (None,)
