"""The fault matrix: the service as an operator deploys it, `replicator run --only capture`
and `replicator run --only sinks` as two real processes, under a ground-truth workload, while
one seeded schedule injects, all at once:

- `kill -9` at random moments, at least 50 in all: of the capture process (20 per round), of
  the sinks process (20), each restarted after a random pause of 0.1-1 s, and of `replicator
  compact` (6) and `replicator replay` (6) processes started for it and killed part-way
  through their run (at a seeded fraction of the way between the end of the interpreter's
  start-up and the run's expected end, learnt from the last run that completed; a run that
  completes first, or a replay killed after its final commit, is not counted, and tried
  again). Every killed compaction is run again to completion at once; every killed replay
  restored `--at latest` into the same scratch database (on the stack's PostgreSQL 15),
  which a fresh replay must fill at the end. Both run while the service does, and reach the
  store directly, not through its proxy;
- a restart of the source PostgreSQL server: a fast shutdown and a start of a server of the
  test's own (the shared one serves other tests), with the capture killed and restarted
  while it is down; and a 3 s cut of the capture's connection to it (its proxy disabled);
- a restart of the Kafka broker (a throwaway broker of the test's own, behind a proxy), with
  the capture and the sinks killed and restarted while it is down: both wait for it
  (`test_the_sinks_start_while_the_broker_is_down` checks the sinks' wait on its own);
- a 60 s outage of the store (its Toxiproxy proxy disabled), with the sinks killed and
  restarted inside it; 8 s of added latency (300 +- 200 ms) on it; 6 s of connection resets
  (TCP RST, half the connections, drawn again every second).

The network faults and restarts run one after the other (seeded order and pauses of 2-5 s);
the capture/sinks kills (a seeded pause of 0.5-3.5 s before each) and the compaction/replay
kills (1-6 s) each in a task of their own beside them, so kills land inside the outage and
the restarts too. The seed is printed (`-rP` shows it with a summary of what ran when the
test passes); `REPLICATOR_FAULT_SEED=<n>` draws the same schedule again (the interleaving of
the three tasks still depends on timing).

The workload logs every change it committed, after COMMIT returned: `(table, key, xid,
version)` (the version is the value the change wrote, none for a delete) with the insert LSN
read inside its transaction, a lower bound of its commit LSN; it reconnects across the
server's restart (a transaction whose COMMIT failed is not logged). Afterwards:

- every logged change is in the archive (read back object by object, decrypted and checked)
  at a commit LSN at or above that bound;
- `replicator replay --at latest` into the scratch database of the killed replays (without
  `--replace-existing`: they must have left nothing) succeeds and equals the source table by
  table;
- a final `replicator compact` completes, and a restore into a fresh database after it still
  equals the source;
- every capture/sinks process alive until SIGTERM exited 0 on it, every compaction and replay
  not killed exited 0, and no process wrote a Python traceback (the killed ones included: a
  SIGKILLed process writes nothing);
- each kind of process got its share of kills: at least 10 each for capture and sinks and 5
  each for compact and replay per round, 50 per round in all.

The default schedule is one round against S3 (about three minutes);
`REPLICATOR_FAULT_SCHEDULE=long` runs three rounds (every fault three times, 156 kills) against
each store (S3, Azure, GCS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError
from psycopg import sql
from psycopg.conninfo import make_conninfo

from connectors.registry import open_store
from replicator.devstack.stack import Stack
from replicator.position import Lsn
from replicator.transport.avro import to_python
from tests.conftest import StoreTarget, unique
from tests.integration import archive_readers as archive
from tests.integration.archive_helpers import destination_checkpoint, keyring, sink_environ
from tests.integration.capture_helpers import holds, setup_schema, slot_confirmed, wait_for
from tests.integration.faults import (
    Broker,
    PostgresServer,
    Proxy,
    Toxiproxy,
    broker_through,
    free_port,
    kafka_through,
    postgres_of_its_own,
    postgres_through,
    store_through,
    toxiproxy,
)
from tests.integration.replay_helpers import restore_db, table_state

LONG = os.environ.get("REPLICATOR_FAULT_SCHEDULE", "short") == "long"
ROUNDS = 3 if LONG else 1
STORES = ("s3", "azure", "gcs") if LONG else ("s3",)
SEED = int(os.environ.get("REPLICATOR_FAULT_SEED") or random.SystemRandom().randrange(10**6))
KILLS = {"capture": 20, "sinks": 20, "compact": 6, "replay": 6}  # per round
LEAST = {"capture": 10, "sinks": 10, "compact": 5, "replay": 5}  # asserted, per round
TABLES = ("public.guests", "public.vendors", "public.weddings")
REPLICATOR = str(Path(sys.executable).parent / "replicator")
TRACEBACK = "Traceback (most recent call last)"

Change = tuple[str, int, int, int | None]  # (table, id, xid, version; None for a delete)


# --- the workload -----------------------------------------------------------------------------


@dataclass
class Workload:
    """Upserts into guests (three weddings, so three tiers) and vendors, each writing a unique
    version, and deletes of guests. `truth` grows only after COMMIT returned. A lost
    connection (the server's restart) is opened again; what it was doing is not logged."""

    dsn: str
    seed: int
    truth: dict[Change, int] = field(default_factory=dict)  # change -> LSN inside its tx
    last_lsn: int = 0
    reconnects: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        rnd = random.Random(self.seed)
        version = 0
        while not stop.is_set():
            try:
                version = await self._write(rnd, version, stop)
            except psycopg.OperationalError:
                self.reconnects += 1
                await asyncio.sleep(0.5)

    async def _write(self, rnd: random.Random, version: int, stop: asyncio.Event) -> int:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True,
                                                         connect_timeout=5) as conn:
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
        return version


async def archived_changes(url: str) -> dict[Change, int]:
    """Every change record of the archive at *url*: change -> its commit LSN."""
    store = open_store(url, sink_environ())
    found: dict[Change, int] = {}
    try:
        async for record in archive.change_records(store, keyring()):
            if record["op"] == "r":
                continue  # the initial snapshot, and compaction's snapshot parts
            source = record["source"]
            table = source["table"]
            key = int(to_python(record["key"])["id"])
            version: int | None = None
            if record["after"] is not None:
                value = to_python(record["after"]).get("notes" if table == "guests" else "name")
                if value is None or not str(value).isdigit():
                    continue
                version = int(value)
            elif record["op"] != "d":
                continue
            found[(table, key, int(source["txId"]), version)] = int(source["lsn"])
    finally:
        await store.close()
    return found


# --- the processes ----------------------------------------------------------------------------


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


class Logs:
    """One stderr file per process started, `<name>-<n>.stderr`, under *root*."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: list[Path] = []

    def new(self, name: str) -> Path:
        path = self.root / f"{name}-{len(self.files)}.stderr"
        self.files.append(path)
        return path

    def tracebacks(self) -> list[str]:
        """The first lines of every traceback any process wrote."""
        found = []
        for log in self.files:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            for n, line in enumerate(lines):
                if TRACEBACK in line:
                    found.append(f"{log.name}: " + " | ".join(lines[n:n + 14]))
        return found


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env={**sink_environ(), "PYTHONUNBUFFERED": "1"})


def tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return log.read_text(errors="replace")[-4000:]


class Service:
    """`replicator run --only <role>`, started again after every kill."""

    def __init__(self, role: str, config: Path, logs: Logs) -> None:
        self.role = role
        self.config = config
        self.logs = logs
        self.log: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        self.log = self.logs.new(self.role)
        self.proc = spawn([REPLICATOR, "run", "--only", self.role, "--config",
                           str(self.config)], self.log)

    def alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        assert code is None, (f"{self.role} exited with {code} on its own (seed {SEED}):\n"
                              f"{tail(self.log)}")

    def metric(self, name: str) -> float:
        """The sum of the series of *name* this run's `/metrics` shows (0 before it serves)."""
        text = self.log.read_text(errors="replace") if self.log and self.log.exists() else ""
        found = re.search(r"metrics on (http://\S+/metrics)", text)
        if found is None:
            return 0.0
        try:
            with urllib.request.urlopen(found[1], timeout=5) as response:
                lines = response.read().decode().splitlines()
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith((name + " ", name + "{")))

    def readyz(self) -> str:
        """What this run's `/readyz` answers ("" before it serves)."""
        text = self.log.read_text(errors="replace") if self.log and self.log.exists() else ""
        found = re.search(r"metrics on (http://\S+)/metrics", text)
        if found is None:
            return ""
        try:
            with urllib.request.urlopen(found[1] + "/readyz", timeout=5) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as exc:
            return str(exc.read().decode())
        except OSError:
            return ""

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
        assert code == 0, f"{self.role}: exit code {code} after SIGTERM:\n{tail(self.log)}"

    def abandon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class OneShot:
    """A command that runs to its end (`replicator compact`, `replicator replay`): started to
    be killed part-way through, or to complete. `length_s` is what the last complete run
    took, `startup_s` what the interpreter takes to get to the command's code."""

    def __init__(self, name: str, argv: Callable[[], list[str]], logs: Logs,
                 startup_s: float) -> None:
        self.name = name
        self.argv = argv
        self.logs = logs
        self.startup_s = startup_s
        self.length_s = 3 * startup_s
        self.kills = 0
        self.killed_after: list[str] = []  # "<seconds in> / <expected length>", per kill
        self.completed = 0
        self.proc: subprocess.Popen[bytes] | None = None

    async def killed_at(self, fraction: float) -> bool:
        """Start a run and SIGKILL it *fraction* of the way between the end of its start-up
        and its expected end. False if it completed first (then it must have succeeded)."""
        log = self.logs.new(f"{self.name}-killed")
        started = time.monotonic()
        self.proc = proc = spawn(self.argv(), log)
        delay = self.startup_s + fraction * max(self.length_s - self.startup_s, 0.2)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), delay)
        except TimeoutError:
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            self.kills += 1
            self.killed_after.append(f"{delay:.1f}/{self.length_s:.1f}s")
            return True
        self._done(proc, log, time.monotonic() - started)
        return False

    async def to_end(self) -> None:
        log = self.logs.new(self.name)
        started = time.monotonic()
        self.proc = proc = spawn(self.argv(), log)
        try:
            await asyncio.to_thread(proc.wait, 300)
        except subprocess.TimeoutExpired:
            self.abandon()
            raise AssertionError(f"{self.name} still running after 300 s:\n{tail(log)}"
                                 ) from None
        self._done(proc, log, time.monotonic() - started)

    def _done(self, proc: subprocess.Popen[bytes], log: Path, took: float) -> None:
        assert proc.returncode == 0, (f"{self.name} exited with {proc.returncode} "
                                      f"(seed {SEED}):\n{tail(log)}")
        self.completed += 1
        self.length_s = took

    def abandon(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def restored_tables(dsn: str) -> int:
    """How many of the restored tables the database at *dsn* has."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(to_regclass(t)) FROM unnest(%s::text[]) t",
                           (list(TABLES),)).fetchone()
    return int(row[0]) if row else 0


def staging_schemas(dsn: str) -> int:
    """How many staging schemas replays left behind in the database at *dsn*."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace "
                           "WHERE nspname LIKE 'replicator\\_restore\\_%'").fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def scratch_database(server_dsn: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """A database to restore into, and a function that drops and creates it again."""
    name = unique("fmr_")
    ident = sql.Identifier(name)

    def create(drop: bool = True) -> None:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            if drop:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))

    create(drop=False)
    try:
        yield make_conninfo(server_dsn, dbname=name), create
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def startup_seconds() -> float:
    """How long the interpreter takes to load the CLI here and now (the machine is shared)."""
    started = time.monotonic()
    subprocess.run([REPLICATOR, "compact", "--help"], capture_output=True, check=True)
    return time.monotonic() - started


# --- the schedule -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: str  # store-latency | store-resets | store-outage | pg-cut | pg-restart | broker-restart
    pause_s: float  # before it
    lasts_s: float  # of the outage or added toxic; of the server's time down, for a restart
    at: float  # how far into it (0..1) a service is killed and restarted, where one is


@dataclass(frozen=True)
class Kill:
    target: str  # capture | sinks | compact | replay
    pause_s: float  # before it
    at: float  # capture/sinks: seconds down before the restart; compact/replay: how far in


@dataclass(frozen=True)
class Schedule:
    faults: list[Fault]
    services: list[Kill]  # of capture and sinks
    commands: list[Kill]  # of compact and replay

    @classmethod
    def draw(cls, rng: random.Random, rounds: int) -> Schedule:
        faults: list[Fault] = []
        services: list[Kill] = []
        commands: list[Kill] = []
        for _ in range(rounds):
            one = [("store-latency", 8.0), ("store-resets", 6.0), ("store-outage", 60.0),
                   ("pg-cut", 3.0), ("pg-restart", rng.uniform(0.5, 3.0)),
                   ("broker-restart", rng.uniform(0.5, 3.0))]
            rng.shuffle(one)
            faults += [Fault(kind, rng.uniform(2.0, 5.0), lasts, rng.uniform(0.1, 0.8))
                       for kind, lasts in one]
            kinds = [k for k in ("capture", "sinks") for _ in range(KILLS[k])]
            rng.shuffle(kinds)
            services += [Kill(k, rng.uniform(0.5, 3.5), rng.uniform(0.1, 1.0)) for k in kinds]
            kinds = [k for k in ("compact", "replay") for _ in range(KILLS[k])]
            rng.shuffle(kinds)
            commands += [Kill(k, rng.uniform(1.0, 6.0), rng.uniform(0.05, 0.9)) for k in kinds]
        return cls(faults, services, commands)


@dataclass
class Faults:
    """What the schedule acts on."""

    store: Proxy
    pg_link: Proxy
    pg: PostgresServer
    broker: Broker
    services: dict[str, Service]
    commands: dict[str, OneShot]
    recreate_replay_db: Callable[[], None]
    replay_db: str
    injected: list[str] = field(default_factory=list)
    replays_killed_late: int = 0  # killed after their final commit: not counted as kills
    # Held while a service is down between its kill and its restart, and by the faults that
    # must not have it restarted meanwhile.
    locks: dict[str, asyncio.Lock] = field(
        default_factory=lambda: {"capture": asyncio.Lock(), "sinks": asyncio.Lock()})

    def alive(self) -> None:
        """Every service not down on purpose (between its kill and its restart) is running."""
        for role, service in self.services.items():
            if not self.locks[role].locked():
                service.alive()

    async def kill_and_restart(self, role: str, down_s: float) -> None:
        async with self.locks[role]:
            service = self.services[role]
            service.kill9()
            await asyncio.sleep(down_s)
            service.start()

    async def network(self, faults: list[Fault]) -> None:
        for fault in faults:
            await asyncio.sleep(fault.pause_s)
            await self.inject(fault)
            self.injected.append(fault.kind)
            self.alive()

    async def inject(self, fault: Fault) -> None:
        if fault.kind == "store-resets":
            # Toxicity is drawn per connection when the toxic is added, and a client keeps
            # its connections: adding it afresh every second gives each one new chances.
            for _ in range(round(fault.lasts_s)):
                with self.store.with_toxic("reset_peer", timeout=0, toxicity=0.5):
                    await asyncio.sleep(1.0)
        elif fault.kind == "pg-restart":
            # The capture killed while the server is down: it must start and wait for it.
            await self.pg.stop()
            await self.kill_and_restart("capture", fault.lasts_s)
            await self.pg.start()
        elif fault.kind == "broker-restart":
            # The capture and the sinks killed while the broker is down: both must start and
            # wait for it (the sinks' consumer group is joined only once it answers).
            await self.broker.stop()
            await asyncio.gather(self.kill_and_restart("capture", fault.lasts_s),
                                 self.kill_and_restart("sinks", fault.lasts_s / 2))
            await self.broker.start()
        elif fault.kind == "store-outage":
            # The sinks killed while the store is down: they must start and wait for it.
            with self.store.down():
                await asyncio.sleep(fault.at * fault.lasts_s)
                await self.kill_and_restart("sinks", 0.5)
                await asyncio.sleep((1 - fault.at) * fault.lasts_s - 0.5)
        else:
            context: Any = {"store-latency": lambda: self.store.with_toxic(
                                "latency", latency=300, jitter=200),
                            "pg-cut": self.pg_link.down}[fault.kind]()
            with context:
                await asyncio.sleep(fault.lasts_s)

    async def kill_services(self, kills: list[Kill], network: asyncio.Task[None]) -> None:
        for kill in kills:
            await asyncio.sleep(kill.pause_s)
            await self.kill_and_restart(kill.target, kill.at)
            if network.done():
                self.alive()

    async def kill_commands(self, kills: list[Kill]) -> None:
        for kill in kills:
            await asyncio.sleep(kill.pause_s)
            command = self.commands[kill.target]
            for _ in range(4):  # a run that completes before the kill teaches its length
                killed = await command.killed_at(kill.at)
                took_effect = kill.target == "replay" and (
                    not killed or await asyncio.to_thread(restored_tables, self.replay_db) > 0)
                if took_effect:
                    if killed:  # between its final commit and its exit: not mid-restore
                        command.kills -= 1
                        command.killed_after.pop()
                        self.replays_killed_late += 1
                        killed = False
                    await asyncio.to_thread(self.recreate_replay_db)  # start from nothing
                if killed:
                    break
            if kill.target == "compact":
                await command.to_end()  # a killed compaction, run again to completion


@contextlib.asynccontextmanager
async def servers(stack: Stack, target: StoreTarget, state: Path
                  ) -> AsyncIterator[tuple[PostgresServer, Broker, Proxy, str, Proxy,
                                           StoreTarget]]:
    """A PostgreSQL server and a broker of the test's own, the first reached through a proxy
    as the store is: (server, broker, pg proxy, DSN through it, store proxy, store through
    it). The proxies are deleted on the way out."""
    with toxiproxy(stack) as proxies:
        async with contextlib.AsyncExitStack() as started:
            # Started one after the other: both at once overload a small shared machine.
            pg = await started.enter_async_context(postgres_of_its_own(stack, state / "pg"))
            broker = await started.enter_async_context(
                broker_through(proxies, stack, state / "kafka"))
            with psycopg.connect(pg.dsn, autocommit=True) as admin:
                admin.execute("CREATE DATABASE source")
            dsn = make_conninfo(pg.dsn, dbname="source")
            pg_link, dsn_proxied = postgres_through(proxies, dsn)
            store, store_proxied = store_through(proxies, target)
            yield pg, broker, pg_link, dsn_proxied, store, store_proxied


# --- the matrix -------------------------------------------------------------------------------


@dataclass
class Outcome:
    workload: Workload
    logs: Logs
    kills: dict[str, int]
    injected: list[str]
    source: str  # DSN of the source database, still up


async def assert_replay_equals_source(url: str, source: str, into: str,
                                      logs: Logs) -> None:
    """`replicator replay --at latest` into *into* (no --replace-existing) equals *source*."""
    log = logs.new("replay-check")
    proc = spawn([REPLICATOR, "replay", "--from", url, "--at", "latest", "--to", into], log)
    code = await asyncio.to_thread(proc.wait, 300)
    assert code == 0, tail(log)
    assert TRACEBACK not in tail(log), tail(log)
    with psycopg.connect(source) as want, psycopg.connect(into) as got:
        for table in TABLES:
            assert table_state(got, table) == table_state(want, table), table


async def run_under_faults(stack: Stack, target: StoreTarget, restore_server: str,
                           replay_db: str, recreate_replay_db: Callable[[], None],
                           tmp_path: Path) -> Outcome:
    """The service, the workload and the schedule, until the destination's checkpoint covers
    the last commit and both processes stopped cleanly; then the final compaction."""
    rng = random.Random(SEED)
    schedule = Schedule.draw(rng, ROUNDS)
    logs = Logs(tmp_path)
    async with servers(stack, target, tmp_path / "servers") as (
            pg, broker, pg_link, dsn_proxied, store, store_proxied):
        source = make_conninfo(pg.dsn, dbname="source")
        setup_schema(source)
        config = tmp_path / "replicator.toml"
        slot = write_config(config, dsn_proxied, broker.bootstrap, unique("fm"),
                            store_proxied.url)
        services = {role: Service(role, config, logs) for role in ("capture", "sinks")}
        startup = await asyncio.to_thread(startup_seconds)
        commands = {
            "compact": OneShot("compact", lambda: [REPLICATOR, "compact", "--from", target.url],
                               logs, startup),
            "replay": OneShot("replay", lambda: [REPLICATOR, "replay", "--from", target.url,
                                                 "--at", "latest", "--to", replay_db],
                              logs, startup)}
        faults = Faults(store, pg_link, pg, broker, services, commands, recreate_replay_db,
                        replay_db)
        workload = Workload(source, SEED)
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:
            for service in services.values():
                service.start()

            async def slot_ready() -> bool:
                faults.alive()
                return await slot_confirmed(source, slot) is not None

            # Versions overwritten before the slot existed were never capturable one by
            # one: the ground truth starts with the slot.
            await wait_for(slot_ready, within=90, what=f"replication slot {slot}")
            load = asyncio.create_task(workload.run(stop))
            tasks.append(load)

            await wait_for(lambda: holds(workload.last_lsn > 0), within=30,
                           what="the first commit")
            first = workload.last_lsn

            async def archived() -> bool:
                faults.alive()
                return await destination_checkpoint(target.url, "faulty") > first

            # Something to compact and restore before the first of those is killed.
            await wait_for(archived, within=90, what="the first archived changes")
            network = asyncio.create_task(faults.network(schedule.faults))
            tasks += [network, asyncio.create_task(faults.kill_services(schedule.services,
                                                                        network)),
                      asyncio.create_task(faults.kill_commands(schedule.commands))]
            for done in asyncio.as_completed(tasks[1:]):
                await done  # the first failure, at once
            assert not load.done(), "the workload stopped"
            stop.set()
            await load
            end = workload.last_lsn

            async def durable() -> bool:
                faults.alive()
                return await destination_checkpoint(target.url, "faulty") > end

            await wait_for(durable, within=180, what=f"the checkpoint to pass {Lsn(end)}")
            await services["capture"].stop()
            await services["sinks"].stop()
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for service in services.values():
                service.abandon()
            for command in commands.values():
                command.abandon()
        kills = {k: s.kills for k, s in services.items()}
        kills |= {k: c.kills for k, c in commands.items()}
        print(f"fault matrix, seed {SEED}: kills {kills}, faults {faults.injected}, "
              f"{len(workload.truth)} changes, {workload.reconnects} workload reconnects, "
              f"compactions completed {commands['compact'].completed}, interpreter start-up "
              f"{startup:.1f} s, compactions killed at {commands['compact'].killed_after}, "
              f"replays killed at {commands['replay'].killed_after} (and "
              f"{faults.replays_killed_late} after their final commit, not counted), staging "
              f"schemas the killed replays left: {staging_schemas(replay_db)}")
        # Not in the `finally`: the source must outlive this function, its checks need it.
        outcome = Outcome(workload, logs, kills, faults.injected, source)
        await check(outcome, target, restore_server, replay_db, commands["compact"])
    return outcome


async def check(outcome: Outcome, target: StoreTarget, restore_server: str, replay_db: str,
                compact: OneShot) -> None:
    logs, workload = outcome.logs, outcome.workload
    assert not logs.tracebacks(), "\n".join(logs.tracebacks())
    assert sorted(outcome.injected) == sorted(
        ["store-latency", "store-resets", "store-outage", "pg-cut", "pg-restart",
         "broker-restart"] * ROUNDS)
    for kind, least in LEAST.items():
        assert outcome.kills[kind] >= least * ROUNDS, (kind, outcome.kills)
    assert sum(outcome.kills.values()) >= 50 * ROUNDS, outcome.kills
    assert len(workload.truth) > 1000

    archived = await archived_changes(target.url)
    missing = sorted(c for c in workload.truth if c not in archived)
    assert not missing, (f"{len(missing)} of {len(workload.truth)} committed changes are not "
                         f"archived, e.g. {missing[:5]}")
    early = sorted(c for c, lsn in workload.truth.items() if archived[c] < lsn)
    assert not early, f"archived below the LSN read inside their transaction: {early[:5]}"

    # Where every killed replay restored: a fresh replay must find it as they left it, empty.
    await assert_replay_equals_source(target.url, outcome.source, replay_db, logs)
    await compact.to_end()
    with restore_db(restore_server) as restored:
        await assert_replay_equals_source(target.url, outcome.source, restored, logs)
    assert not logs.tracebacks(), "\n".join(logs.tracebacks())


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])
@pytest.mark.parametrize("store_target", STORES, indirect=True)
async def test_nothing_committed_is_lost_under_faults(
        dev_stack: Stack, pg_server_dsn: str, store_target: StoreTarget,
        tmp_path: Path) -> None:
    print(f"fault matrix: REPLICATOR_FAULT_SEED={SEED}", file=sys.stderr)
    with scratch_database(pg_server_dsn) as (replay_db, recreate):
        await run_under_faults(dev_stack, store_target, pg_server_dsn, replay_db, recreate,
                               tmp_path)


async def test_the_sinks_start_while_the_broker_is_down(tmp_path: Path) -> None:
    """`replicator run --only sinks` started while no broker answers waits for one (the
    capture does: "PostgreSQL or Kafka does not answer ... retrying with backoff")."""
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    config = tmp_path / "replicator.toml"
    write_config(config, "postgresql://postgres@127.0.0.1:1/none", f"127.0.0.1:{free_port()}",
                 unique("fm"), f"file://{archive_dir}")
    logs = Logs(tmp_path)
    sinks = Service("sinks", config, logs)
    sinks.start()
    answers: set[str] = set()
    try:
        for _ in range(20):
            await asyncio.sleep(0.5)
            sinks.alive()
            answers.add(await asyncio.to_thread(sinks.readyz))
        await sinks.stop()
    finally:
        sinks.abandon()
    assert not logs.tracebacks(), "\n".join(logs.tracebacks())
    # Not ready, and why: the address of the broker it waits for.
    assert any(a.startswith("not ready: sink faulty: Kafka does not answer") for a in answers), \
        answers
    assert "does not answer" in tail(sinks.log) and "retrying with backoff" in tail(sinks.log)


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
