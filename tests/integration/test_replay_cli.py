"""The `replicator replay` and `replicator verify` commands: plans, exit codes, reports."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from replicator.position import Lsn
from tests.integration.archive_helpers import destination_checkpoint, sink_environ
from tests.integration.replay_helpers import (
    random_workload,
    seeded_archive,
    snapshotted,
    wait_durable,
)

REPLICATOR = str(Path(sys.executable).parent / "replicator")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REPLICATOR, *args], env=sink_environ(), capture_output=True,
                          text=True, timeout=300)


async def test_replay_and_verify_commands(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str,
                                          tmp_path: Path) -> None:
    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    async with snapshotted(config):
        points = await asyncio.to_thread(random_workload, pg_dsn, rng=random.Random(5),
                                         transactions=20, points_at=(19,), add_column_at=5,
                                         pause=0.05)
        await wait_durable(dests, points[-1].lsn)
    url = dests[0].url
    checkpoint = Lsn(await destination_checkpoint(url, "local"))

    # --dry-run --json: the plan, and nothing written.
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at", "latest",
                                   "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["latest"] == str(Lsn(checkpoint - 1)) == plan["target"]
    assert set(plan["tables"]) == {"public.guests", "public.vendors", "public.weddings"}
    guests = plan["tables"]["public.guests"]
    assert guests["segments"] > 0 and guests["base_snapshot"] and "seat" in guests["columns"]

    # Past the checkpoint: exit 2, the latest recoverable point named.
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at",
                                   str(Lsn(checkpoint + 10**6)), "--to", str(tmp_path / "x"))
    assert done.returncode == 2
    assert f"the latest recoverable point is {Lsn(checkpoint - 1)}" in done.stderr
    assert not (tmp_path / "x").exists()

    # Into files, by time: a summary line.
    at = points[-1].at.isoformat()
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at", at, "--to",
                                   str(tmp_path / "csv"), "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("restored 3 table(s) as of LSN ")
    lines = (tmp_path / "csv" / "public.guests.csv").read_text().splitlines()
    assert len(lines) == 1 + len(points[-1].state["public.guests"])

    # verify: exit 0 and a report naming every table.
    done = await asyncio.to_thread(cli, "verify", "--from", url, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] and report["differing"] == []
    assert report["tables"]["public.guests"]["rows"] == len(points[-1].state["public.guests"])

    # A damaged segment: verify exits 1 and names the table; replay exits 1, naming it.
    segment = sorted((tmp_path / "archive" / "segments" / "public.vendors").glob("*.seg"))[-1]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    done = await asyncio.to_thread(cli, "verify", "--from", url, "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["differing"] == ["public.vendors"]
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at", "latest", "--to",
                                   str(tmp_path / "y"))
    assert done.returncode == 1 and f"segments/public.vendors/{segment.name}" in done.stderr
    assert "nothing was committed" in done.stderr


async def test_replacing_tables_on_a_wedding_day_needs_a_reason_slot_or_not(
        pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    import psycopg

    from replicator.replay.plan import ReplayRefused
    from replicator.replay.table import Column, TableSchema
    from replicator.replay.targets import PostgresTarget

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE weddings (id bigint PRIMARY KEY, wedding_date date)")
        conn.execute("INSERT INTO weddings VALUES (1, (now() AT TIME ZONE 'UTC')::date + 1)")
        conn.execute("CREATE TABLE guests (id bigint PRIMARY KEY)")
    guests = TableSchema("public.guests", (Column("id", "bigint", True),), ("id",), Lsn(1))
    # No replication slot reads it (the slot lost, the usual reason to restore): refused all
    # the same; and with one.
    for slot in (False, True):
        if slot:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_create_logical_replication_slot('live_guard', "
                             "'pgoutput')")
        with pytest.raises(ReplayRefused, match=r"1 wedding\(s\) in public.weddings are today "
                                                r"or tomorrow.*--override-reason"):
            await PostgresTarget(pg_dsn, replace_existing=True).prepare([guests])
    caplog.set_level("WARNING", logger="replicator.replay")
    target = PostgresTarget(pg_dsn, replace_existing=True,
                            override_reason="restoring guests lost by a bad import")
    await target.prepare([guests], point="0/1")
    await target.abort()
    assert "reason: restoring guests lost by a bad import" in caplog.text
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT reason, tables, restore_point FROM replicator_audit"
                            ).fetchall() == [("restoring guests lost by a bad import",
                                              ["public.guests"], "0/1")]
