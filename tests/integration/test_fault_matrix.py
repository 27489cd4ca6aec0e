"""The fault matrix: `replicator run` as a real process under a ground-truth workload, its
Postgres source and its store destination reached through Toxiproxy, while a seeded schedule
injects faults: added latency and connection resets on the store, a 20 s store outage (with
a `kill -9` of the service inside it), a cut of the Postgres connection, and `kill -9` of the
service at random moments, restarted each time.

The workload logs every change it committed, after COMMIT returned: `(table, key, xid,
version)` (the version is the value the change wrote, none for a delete) with the insert LSN
read inside its transaction, a lower bound of its commit LSN. Afterwards every one of them is
in the archive (read back object by object, decrypted and checked) at a commit LSN at or
above that bound, `replicator replay --at latest` equals the source table by table, and no
process wrote a traceback.

The default schedule is one round against S3 (about two minutes);
`REPLICATOR_FAULT_SCHEDULE=long` runs five rounds against each store (S3, Azure, GCS).
Kafka is reached directly: faults in front of a broker need a broker of their own
(`faults.kafka_through`, exercised below).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError

from connectors.registry import open_store
from replicator.devstack.stack import Stack
from replicator.position import Lsn
from replicator.transport.avro import to_python
from tests.conftest import StoreTarget, unique
from tests.integration import archive_readers as archive
from tests.integration.archive_helpers import destination_checkpoint, keyring, sink_environ
from tests.integration.capture_helpers import setup_schema, slot_confirmed, wait_for
from tests.integration.faults import (
    Proxy,
    Toxiproxy,
    kafka_through,
    postgres_through,
    store_through,
    toxiproxy,
)
from tests.integration.replay_helpers import restore_db, table_state

LONG = os.environ.get("REPLICATOR_FAULT_SCHEDULE", "short") == "long"
ROUNDS = 5 if LONG else 1
STORES = ("s3", "azure", "gcs") if LONG else ("s3",)
TABLES = ("public.guests", "public.vendors", "public.weddings")
REPLICATOR = str(Path(sys.executable).parent / "replicator")

Change = tuple[str, int, int, int | None]  # (table, id, xid, version; None for a delete)


# --- the workload -----------------------------------------------------------------------------


@dataclass
class Workload:
    """Upserts into guests (three weddings, so three tiers) and vendors, each writing a unique
    version, and deletes of guests. `truth` grows only after COMMIT returned."""

    dsn: str
    seed: int = 7
    truth: dict[Change, int] = field(default_factory=dict)  # change -> LSN inside its tx
    last_lsn: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        rnd = random.Random(self.seed)
        version = 0
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while not stop.is_set():
                writes: list[tuple[str, int, int | None]] = []
                async with conn.transaction():
                    for _ in range(rnd.randint(1, 4)):
                        version += 1
                        gid = rnd.randint(1, 300)
                        await conn.execute(
                            "INSERT INTO guests (id, wedding_id, name, notes) VALUES "
                            "(%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET notes = "
                            "EXCLUDED.notes", (gid, 1 + gid % 3, f"guest {gid}", str(version)))
                        writes.append(("guests", gid, version))
                    if rnd.random() < 0.4:
                        version += 1
                        vid = rnd.randint(1, 40)
                        await conn.execute(
                            "INSERT INTO vendors VALUES (%s, %s, 1) ON CONFLICT (id) DO UPDATE "
                            "SET name = EXCLUDED.name", (vid, str(version)))
                        writes.append(("vendors", vid, version))
                    if rnd.random() < 0.15:
                        cur = await conn.execute("DELETE FROM guests WHERE id = %s RETURNING id",
                                                 (rnd.randint(1, 300),))
                        writes += [("guests", row[0], None) for row in await cur.fetchall()]
                    cur = await conn.execute("SELECT txid_current() % 4294967296, "
                                             "pg_current_wal_insert_lsn() - '0/0'")
                    row = await cur.fetchone()
                assert row is not None
                xid, inside = int(row[0]), int(row[1])
                for table, key, value in writes:  # only after COMMIT returned
                    self.truth[(table, key, xid, value)] = inside
                self.last_lsn = inside
                await asyncio.sleep(0.02)


async def archived_changes(url: str) -> dict[Change, int]:
    """Every change record of the archive at *url*: change -> its commit LSN."""
    store = open_store(url, sink_environ())
    found: dict[Change, int] = {}
    try:
        async for record in archive.change_records(store, keyring()):
            source = record["source"]
            table = source["table"]
            key = int(to_python(record["key"])["id"])
            version: int | None = None
            if record["after"] is not None:
                value = to_python(record["after"]).get("notes" if table == "guests" else "name")
                if value is None or not str(value).isdigit():
                    continue  # the seeded rows of the initial snapshot
                version = int(value)
            elif record["op"] != "d":
                continue
            found[(table, key, int(source["txId"]), version)] = int(source["lsn"])
    finally:
        await store.close()
    return found


# --- the service under test -------------------------------------------------------------------


def write_config(path: Path, dsn: str, bootstrap: str, prefix: str, store_url: str) -> str:
    slot = unique("fm_")
    path.write_text(f"""
shutdown_deadline_s = 10

[source]
dsn = "{dsn}"
slot = "{slot}"
publication = "{slot}"
heartbeat_interval_s = 0.5
status_interval_s = 0.2
reconnect_max_backoff_s = 2

[priority.tables."public.guests"]
column = "wedding_id"

[kafka]
bootstrap_servers = "{bootstrap}"
topic_prefix = "{prefix}"
partitions = 2
linger_ms = 2

[metrics]
listen = "127.0.0.1:0"

[[destinations]]
name = "faulty"
url = "{store_url}"

[destinations.flush]
critical_s = 0.5
high_s = 0.8
normal_s = 1.0
low_s = 1.5

[destinations.compaction]
enabled = false
""")
    return slot


class ReplicatorRun:
    """`replicator run`, started again after every kill; each run's stderr in its own file."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config = config
        self.logs = logs
        self.runs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        log = self.logs / f"run-{len(self.runs)}.stderr"
        self.runs.append(log)
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [REPLICATOR, "run", "--config", str(self.config)], stdout=err, stderr=err,
                env={**sink_environ(), "PYTHONUNBUFFERED": "1"})

    def alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        assert code is None, f"replicator run exited with {code} on its own:\n{self.tail()}"

    def kill9(self) -> None:
        self.alive()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    async def stop(self) -> None:
        assert self.proc is not None
        self.alive()
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.proc.wait, 60)
        assert code == 0, f"exit code {code} after SIGTERM:\n{self.tail()}"

    def abandon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self) -> str:
        return self.runs[-1].read_text(errors="replace")[-4000:] if self.runs else "(no run)"

    def tracebacks(self) -> list[str]:
        """The first lines of every traceback any run wrote."""
        found = []
        for log in self.runs:
            lines = log.read_text(errors="replace").splitlines()
            for n, line in enumerate(lines):
                if "Traceback" in line:
                    found.append(f"{log.name}: " + " | ".join(lines[n:n + 12]))
        return found


# --- the schedule -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: str  # store-latency | store-resets | store-outage | pg-cut | kill
    pause_s: float  # before it
    lasts_s: float


def schedule(rng: random.Random, rounds: int) -> list[Fault]:
    faults: list[Fault] = []
    for _ in range(rounds):
        one = [("store-latency", 8.0), ("store-resets", 6.0), ("store-outage", 20.0),
               ("pg-cut", 3.0), ("kill", rng.uniform(0.1, 1.5)), ("kill", rng.uniform(0.1, 1.5))]
        rng.shuffle(one)
        faults += [Fault(kind, rng.uniform(2.0, 5.0), lasts) for kind, lasts in one]
    return faults


async def inject(fault: Fault, rng: random.Random, service: ReplicatorRun, store: Proxy,
                 pg: Proxy) -> None:
    if fault.kind == "kill":
        service.kill9()
        await asyncio.sleep(fault.lasts_s)
        service.start()
        return
    if fault.kind == "store-resets":
        # Toxicity is drawn per connection when the toxic is added, and a client keeps its
        # connections: adding it afresh every second gives each one new chances to be reset.
        for _ in range(round(fault.lasts_s)):
            with store.with_toxic("reset_peer", timeout=0, toxicity=0.5):
                await asyncio.sleep(1.0)
        service.alive()
        return
    if fault.kind == "store-latency":
        context: Any = store.with_toxic("latency", latency=300, jitter=200)
    elif fault.kind == "store-outage":
        context = store.down()
    else:
        context = pg.down()
    with context:
        if fault.kind == "store-outage":
            # A restart while the store is down: the service must start and wait for it.
            first = rng.uniform(3.0, fault.lasts_s - 5.0)
            await asyncio.sleep(first)
            service.kill9()
            service.start()
            await asyncio.sleep(fault.lasts_s - first)
        else:
            await asyncio.sleep(fault.lasts_s)
    service.alive()


@contextlib.contextmanager
def proxied(stack: Stack, pg_dsn: str, target: StoreTarget
            ) -> Iterator[tuple[Proxy, str, Proxy, StoreTarget]]:
    with toxiproxy(stack) as proxies:
        pg, pg_proxied = postgres_through(proxies, pg_dsn)
        store, store_proxied = store_through(proxies, target)
        yield pg, pg_proxied, store, store_proxied


# --- the matrix -------------------------------------------------------------------------------


async def run_under_faults(stack: Stack, pg_dsn: str, bootstrap: str, prefix: str,
                           target: StoreTarget, tmp_path: Path) -> tuple[ReplicatorRun, Workload]:
    """The service and the workload through the schedule, until the destination's
    checkpoint covers the last commit and the service stopped cleanly."""
    rng = random.Random(20261204)
    with proxied(stack, pg_dsn, target) as (pg, pg_proxied, store, store_proxied):
        config = tmp_path / "replicator.toml"
        slot = write_config(config, pg_proxied, bootstrap, prefix, store_proxied.url)
        service = ReplicatorRun(config, tmp_path)
        service.start()
        workload = Workload(pg_dsn)
        stop = asyncio.Event()
        load: asyncio.Task[None] | None = None
        try:
            async def slot_ready() -> bool:
                service.alive()
                return await slot_confirmed(pg_dsn, slot) is not None

            # Versions overwritten before the slot existed were never capturable one by
            # one: the ground truth starts with the slot.
            await wait_for(slot_ready, within=60, what=f"replication slot {slot}")
            load = asyncio.create_task(workload.run(stop))
            for fault in schedule(rng, ROUNDS):
                await asyncio.sleep(fault.pause_s)
                assert not load.done(), "the workload stopped"
                await inject(fault, rng, service, store, pg)
            stop.set()
            await load
            end = workload.last_lsn

            async def durable() -> bool:
                service.alive()
                return await destination_checkpoint(target.url, "faulty") > end

            await wait_for(durable, within=180, what=f"the checkpoint to pass {Lsn(end)}")
            await service.stop()
        finally:
            stop.set()
            if load is not None and not load.done():
                load.cancel()
            service.abandon()
    return service, workload


async def assert_replay_equals_source(url: str, pg_dsn: str, server_dsn: str) -> None:
    with restore_db(server_dsn) as restored:
        done = await asyncio.to_thread(
            subprocess.run, [REPLICATOR, "replay", "--from", url, "--at", "latest",
                             "--to", restored], env=sink_environ(), capture_output=True,
            text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        with psycopg.connect(pg_dsn) as source, psycopg.connect(restored) as copy:
            for table in TABLES:
                assert table_state(copy, table) == table_state(source, table), table


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])
@pytest.mark.parametrize("store_target", STORES, indirect=True)
async def test_nothing_committed_is_lost_under_faults(
        dev_stack: Stack, pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str,
        topic_prefix: str, store_target: StoreTarget, tmp_path: Path) -> None:
    setup_schema(pg_dsn)
    service, workload = await run_under_faults(dev_stack, pg_dsn, kafka_bootstrap,
                                               topic_prefix, store_target, tmp_path)
    assert not service.tracebacks(), "\n".join(service.tracebacks())
    assert service.kills >= 3 * ROUNDS
    assert len(workload.truth) > 300

    archived = await archived_changes(store_target.url)
    missing = sorted(c for c in workload.truth if c not in archived)
    assert not missing, (f"{len(missing)} of {len(workload.truth)} committed changes are not "
                         f"archived, e.g. {missing[:5]}")
    early = sorted(c for c, lsn in workload.truth.items() if archived[c] < lsn)
    assert not early, f"archived below the LSN read inside their transaction: {early[:5]}"
    await assert_replay_equals_source(store_target.url, pg_dsn, pg_server_dsn)


# --- Kafka behind a proxy ---------------------------------------------------------------------


async def test_a_throwaway_broker_behind_a_proxy(dev_stack: Stack, tmp_path: Path) -> None:
    """Every connection to the throwaway broker crosses its proxy: the broker advertises the
    proxy's address, records go through it, and an outage of the proxy cuts the broker off."""
    topic = unique("fm-")
    with Toxiproxy(dev_stack.services["toxiproxy"].address()) as proxies:
        async with kafka_through(proxies, dev_stack, tmp_path / "kafka") as (proxy, bootstrap):
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                brokers = (await admin.describe_cluster())["brokers"]
                assert [f"{b['host']}:{b['port']}" for b in brokers] == [proxy.listen]
                await admin.create_topics([NewTopic(topic, 1, 1)])
            finally:
                await admin.close()
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(topic, b"through the proxy")
            finally:
                await producer.stop()
            with proxy.down():
                cut_off = AIOKafkaProducer(bootstrap_servers=bootstrap)
                with pytest.raises(KafkaConnectionError):
                    await cut_off.start()
                await cut_off.stop()
            consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                        auto_offset_reset="earliest")
            await consumer.start()
            try:
                record = await consumer.getone()
            finally:
                await consumer.stop()
            assert record.value == b"through the proxy"
