"""Fault injection: `kill -9` of the capture at random moments, and a Kafka broker restart,
under a continuous workload. Afterwards every committed change is in Kafka (duplicates are
allowed and recognisable by position); nothing is missing.

The workload keeps its own ground truth: every committed write sets a unique `version` on
its row, and the test records `(table, id, version)` only after COMMIT returned.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from replicator.devstack.stack import Stack
from tests.integration.capture_helpers import make_config, read_all, setup_schema, slot_confirmed

RUNS_FOR_S = 14.0


def write_config(path: Path, dsn: str, bootstrap: str, prefix: str) -> str:
    config = make_config(dsn, bootstrap, prefix)
    s = config.source
    path.write_text(f"""
[source]
dsn = "{s.dsn}"
slot = "{s.slot}"
publication = "{s.publication}"
heartbeat_interval_s = 0.5
status_interval_s = 0.2

[priority.tables."public.guests"]
column = "wedding_id"

[kafka]
bootstrap_servers = "{bootstrap}"
topic_prefix = "{prefix}"
partitions = 2
linger_ms = 2
""")
    return s.slot


def start_capture(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "replicator", "run", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def workload(dsn: str, truth: set[tuple[str, int, int]], stop: asyncio.Event) -> None:
    rnd = random.Random(7)
    version = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            writes = []
            async with conn.transaction():
                for _ in range(rnd.randint(1, 5)):
                    version += 1
                    gid = rnd.randint(1, 400)
                    await conn.execute(
                        "INSERT INTO guests (id, wedding_id, name, notes) VALUES (%s, %s, %s, %s)"
                        " ON CONFLICT (id) DO UPDATE SET notes = EXCLUDED.notes",
                        (gid, rnd.choice([1, 2, 3]), f"guest {gid}", str(version)))
                    writes.append(("guests", gid, version))
                if rnd.random() < 0.3:
                    version += 1
                    vid = rnd.randint(1, 50)
                    await conn.execute(
                        "INSERT INTO vendors VALUES (%s, %s, 1) ON CONFLICT (id) DO UPDATE "
                        "SET name = EXCLUDED.name", (vid, str(version)))
                    writes.append(("vendors", vid, version))
            truth.update(writes)  # only after COMMIT returned
            await asyncio.sleep(0.01)


def versions_in_kafka(records: list[object]) -> set[tuple[str, int, int]]:
    seen = set()
    for r in records:
        value = r.value  # type: ignore[attr-defined]
        if "op" not in value or value["after"] is None:
            continue
        table = value["source"]["table"]
        after = value["after"]
        column = "notes" if table == "guests" else "name"
        if after.get(column) and str(after[column]).isdigit():
            seen.add((table, after["id"], int(after[column])))
    return seen


@pytest.mark.parametrize("kafka_restart", [False, True], ids=["kill9", "kill9+kafka-restart"])
async def test_nothing_committed_is_lost(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str,
                                         dev_stack: Stack, tmp_path: Path,
                                         kafka_restart: bool) -> None:
    setup_schema(pg_dsn)
    cfg = tmp_path / "replicator.toml"
    slot = write_config(cfg, pg_dsn, kafka_bootstrap, topic_prefix)
    log = tmp_path / "capture.log"
    truth: set[tuple[str, int, int]] = set()
    stop = asyncio.Event()
    rnd = random.Random(11)

    proc = start_capture(cfg, log)
    # Versions overwritten before the slot existed were never capturable one by one (the
    # initial snapshot holds only their last value): the ground truth starts with the slot.
    for _ in range(150):
        if await slot_confirmed(pg_dsn, slot) is not None:
            break
        assert proc.poll() is None, log.read_text()[-3000:]
        await asyncio.sleep(0.1)
    load = asyncio.create_task(workload(pg_dsn, truth, stop))
    kills = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + RUNS_FOR_S
    restarted_kafka = False
    try:
        while loop.time() < end or kills < 3:
            await asyncio.sleep(rnd.uniform(1.5, 3.0))
            if kafka_restart and not restarted_kafka and loop.time() > end - RUNS_FOR_S / 2:
                kafka = dev_stack.services["kafka"]
                assert kafka.managed, "this test restarts the broker: it needs the native one"
                await asyncio.to_thread(kafka.stop)
                await asyncio.sleep(2)
                await kafka.start()
                restarted_kafka = True
                continue
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            kills += 1
            await asyncio.sleep(rnd.uniform(0.1, 1.0))
            proc = start_capture(cfg, log)
        stop.set()
        await load
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
            row = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
        assert row is not None
        from replicator.position import Lsn

        final = Lsn.parse(row[0])
        for _ in range(300):
            confirmed = await slot_confirmed(pg_dsn, slot)
            if confirmed is not None and confirmed >= final:
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"slot never confirmed {final}:\n{log.read_text()[-3000:]}")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()[-3000:]
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert kills >= 3
    assert len(truth) > 200
    seen = versions_in_kafka(await read_all(kafka_bootstrap, topic_prefix))
    missing = truth - seen
    assert not missing, f"{len(missing)} committed changes missing from Kafka, e.g. " \
                        f"{sorted(missing)[:5]}"
