"""Capture under faults and large values, against the real services: changes larger than a
Kafka message (the claim check, end to end to a restore), the reconnect loop's backoff and
readiness, the lag read from the slot, and bad input at start (no wedding calendar, a
missing database, an unreachable server)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, generate_latest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from replicator.capture import Capture
from replicator.cli.run import TRANSIENT_GRACE_S, QuietTransientBroker
from replicator.config import Config
from replicator.events import Tier
from replicator.ops.metrics import PipelineCollector
from replicator.position import Lsn
from replicator.replay.plan import LATEST
from replicator.replay.targets import PostgresTarget
from replicator.sink.service import Sinks
from replicator.source.stream import ReplicationStream, SlotInUseError
from replicator.transport.control import StateFollower, StateUnavailable, last_transaction_lsn
from replicator.transport.kafka import topic_names
from tests.integration.archive_helpers import destinations, sink_environ, with_destinations
from tests.integration.capture_helpers import (
    holds,
    make_config,
    read_all,
    setup_schema,
    slot_confirmed,
    wait_for,
)
from tests.integration.replay_helpers import restore_db, run_replay, wait_durable

WAITING = "retrying with backoff until it does"
DOCS = "CREATE TABLE docs (id bigint PRIMARY KEY, body text, blob bytea, doc jsonb)"


@contextlib.asynccontextmanager
async def running(config: Config, *, sinks: bool = True) -> AsyncIterator[Capture]:
    """Capture (and the sinks) of *config* as tasks; a stage that fails fails the test."""
    capture = Capture(config, environ=sink_environ())
    stages = Sinks(config, sink_environ()) if sinks else None
    if stages is not None:
        await stages.open()
    tasks = [asyncio.create_task(capture.run())]
    if stages is not None:
        tasks.append(asyncio.create_task(stages.run()))
    try:
        yield capture
    finally:
        capture.stop()
        if stages is not None:
            stages.stop()
        for task in tasks:
            await asyncio.wait_for(task, 60)


def lag_metric(capture: Capture) -> float:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(lambda: capture, dict))
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith("wedsync_capture_lag_bytes "):
            return float(line.split()[1])
    raise AssertionError("no wedsync_capture_lag_bytes")


def server_lag(dsn: str, slot: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint "
                           "FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    assert row is not None
    return int(row[0])


# --- item 3: changes larger than a Kafka message ----------------------------------------------


@pytest.mark.parametrize("pg_server_dsn", ["18"], indirect=True)
async def test_large_values_reach_a_restore_through_claims(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    setup_schema(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(DOCS)
    dests = destinations(tmp_path)
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), dests)
    async with running(config) as capture:
        await wait_for(lambda: holds(capture.stats.snapshot_rows >= 3), what="the snapshot")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            # 2.2 MB of text (the row that stalled capture), a 3 MB bytea, a 50 MB jsonb,
            # and a small row after them.
            conn.execute("INSERT INTO docs (id, body) SELECT 1, string_agg(md5(i::text), '') "
                         "FROM generate_series(1, 68750) i")
            conn.execute("INSERT INTO docs (id, blob) SELECT 2, decode(string_agg(md5(i::text)"
                         ", ''), 'hex') FROM generate_series(1, 187500) i")
            conn.execute("INSERT INTO docs (id, doc) SELECT 3, jsonb_agg(md5(i::text)) "
                         "FROM generate_series(1, 1450000) i")
            conn.execute("INSERT INTO docs (id, body) VALUES (4, 'small')")
            conn.execute("UPDATE guests SET name = 'after' WHERE false")
            sizes = conn.execute("SELECT id, octet_length(body), octet_length(blob), "
                                 "octet_length(doc::text) FROM docs ORDER BY id").fetchall()
            lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert sizes[0][1] == 2_200_000 and sizes[1][2] == 3_000_000
        assert sizes[2][3] > 50_000_000
        assert lsn is not None
        await wait_durable(dests, Lsn.parse(lsn[0]))
        assert capture.claims is not None and capture.claims.claimed >= 3
    claims = sorted((tmp_path / "archive" / "claims").glob("*.avro"))
    assert len(claims) >= 3
    plain = hashlib.md5(b"1").hexdigest().encode()  # the first 32 characters of the text
    assert not any(plain in claim.read_bytes() for claim in claims)  # encrypted
    with restore_db(pg_server_dsn) as target:
        await run_replay(dests[0].url, PostgresTarget(target), LATEST)
        query = "SELECT id, md5(t::text) FROM docs t ORDER BY id"
        with psycopg.connect(pg_dsn) as src, psycopg.connect(target) as dst:
            assert dst.execute(query).fetchall() == src.execute(query).fetchall()


async def shrink_topics(bootstrap: str, prefix: str, limit: int) -> None:
    """Set the tier topics' `max.message.bytes` (as an operator might, by mistake)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([
            ConfigResource(ConfigResourceType.TOPIC, topic,
                           configs={"max.message.bytes": str(limit)})
            for topic in topic_names(prefix).values()])
    finally:
        await admin.close()


async def test_backoff_grows_until_a_transaction_is_acknowledged(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    base = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    config = base.model_copy(update={"source": base.source.model_copy(
        update={"reconnect_max_backoff_s": 1.0})})
    async with running(config, sinks=False) as capture:
        await wait_for(lambda: holds(capture.stats.transactions >= 1), what="streaming")
        # The broker now refuses the next change (a topic's limit below it): every
        # reconnect succeeds, and the same transaction fails again.
        await shrink_topics(kafka_bootstrap, topic_prefix, 20_000)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO vendors (id, name) SELECT 1, string_agg(md5(i::text), '')"
                         " FROM generate_series(1, 3000) i")
        await wait_for(lambda: holds(capture.stats.reconnects >= 4), what="reconnects")
        # Reconnecting is not recovering: the backoff kept growing.
        assert capture._backoff.attempts >= 3
        assert capture.not_ready is not None and "Kafka" in capture.not_ready
        await shrink_topics(kafka_bootstrap, topic_prefix, 1_048_576)
        await wait_for(lambda: holds(capture.not_ready is None), what="recovery")
        assert capture._backoff.attempts == 0
    names = [r.value["after"]["name"] for r in await read_all(kafka_bootstrap, topic_prefix)
             if r.value.get("op") == "c" and r.value["source"]["table"] == "vendors"]
    assert len(names) >= 1 and len(names[0]) == 96_000


async def hold_slot(dsn: str, slot: str, publication: str) -> ReplicationStream:
    """Take the slot from the capture: end its WAL sender and start our own stream before
    the capture reconnects."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                         "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
            stream = ReplicationStream(dsn, slot=slot, publication=publication,
                                       start_lsn=Lsn(0), protocol_version=1)
            try:
                await stream.start()
                return stream
            except SlotInUseError:
                await asyncio.sleep(0.05)


async def test_lag_is_read_from_the_slot_while_capture_cannot_stream(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    slot = config.source.slot
    async with running(config, sinks=False) as capture:
        await wait_for(lambda: holds(capture.stats.transactions >= 1), what="streaming")
        stream = await hold_slot(pg_dsn, slot, config.source.publication)
        try:
            # WAL the slot holds, while capture only gets "slot in use".
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE filler (i int PRIMARY KEY, m text)")
                conn.execute("INSERT INTO filler SELECT i, md5(i::text) "
                             "FROM generate_series(1, 20000) i")
            held = server_lag(pg_dsn, slot)
            assert held > 1_000_000
            await wait_for(lambda: holds(lag_metric(capture) >= held), what="the lag metric")
            assert capture.not_ready is not None
        finally:
            await stream.stop()
        await wait_for(lambda: holds(capture.not_ready is None), what="recovery")
        await wait_for(lambda: holds(lag_metric(capture) < held), what="the lag going down")


# --- item 9: reconnects under a cut connection, readiness ---------------------------------------


def write_toml(path: Path, dsn: str, bootstrap: str, prefix: str, *, priority: str = "",
               metrics_port: int = 0) -> Path:
    config = make_config(dsn, bootstrap, prefix)
    path.write_text(f"""
[source]
dsn = "{dsn}"
slot = "{config.source.slot}"
publication = "{config.source.publication}"
heartbeat_interval_s = 0.5
status_interval_s = 0.2
reconnect_max_backoff_s = 2.0

[kafka]
bootstrap_servers = "{bootstrap}"
topic_prefix = "{prefix}"
partitions = 1

[metrics]
listen = "127.0.0.1:{metrics_port}"
{priority}
""")
    return path


def start_run(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "replicator", "run", "--only", "capture", "--config",
             str(config)], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


async def ready_is(port: int, code: int) -> bool:
    return (await asyncio.to_thread(readyz, port))[0] == code


def allow_connections(server_dsn: str, db: str, allow: bool) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
            sql.Identifier(db), sql.SQL("true" if allow else "false")))
        if not allow:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (db,))


async def test_a_cut_connection_and_a_closed_database_are_waited_out(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    setup_schema(pg_dsn)
    port = free_port()
    log = tmp_path / "run.log"
    config = write_toml(tmp_path / "run.toml", pg_dsn, kafka_bootstrap, topic_prefix,
                        metrics_port=port)
    slot = config.read_text().split('slot = "')[1].split('"')[0]
    db = str(conninfo_to_dict(pg_dsn)["dbname"])
    proc = start_run(config, log)
    try:
        await wait_for(lambda: ready_is(port, 200), within=60, what="ready")
        await wait_for(lambda: holds("streaming slot" in log.read_text()), within=180,
                       what="streaming")
        # Every connection of the database ends (the WAL sender's too), and no new one is let
        # in for a while: like a restart that takes its time.
        allow_connections(pg_server_dsn, db, False)
        try:
            await wait_for(lambda: ready_is(port, 503), what="not ready")
            status, body = await asyncio.to_thread(readyz, port)
            assert status == 503 and body.startswith("not ready: ") and body.count("\n") == 1
            assert proc.poll() is None, log.read_text()[-3000:]
        finally:
            allow_connections(pg_server_dsn, db, True)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO vendors VALUES (7, 'after the cut', 1)")
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        after = Lsn.parse(row[0])

        async def confirmed_past() -> bool:
            confirmed = await slot_confirmed(pg_dsn, slot)
            return confirmed is not None and confirmed >= after
        await wait_for(confirmed_past, within=60, what="the change after the cut")
        await wait_for(lambda: ready_is(port, 200), what="ready again")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


# --- item 9c and bad input at start -----------------------------------------------------------


async def test_without_a_calendar_every_change_gets_the_default_tier(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, name text)")
        conn.execute("INSERT INTO items VALUES (1, 'before')")
    base = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    config = Config(source=base.source, kafka=base.kafka, shutdown_deadline_s=10)
    assert not config.priority.calendar
    async with running(config, sinks=False) as capture:
        await wait_for(lambda: holds(capture.stats.snapshot_rows >= 1), what="the snapshot")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO items VALUES (2, 'after')")
        await wait_for(lambda: holds(capture.stats.events >= 1), what="the change")
    records = [r for r in await read_all(kafka_bootstrap, topic_prefix) if "op" in r.value]
    assert sorted(r.value["after"]["id"] for r in records) == [1, 2]
    assert {r.value["priority"] for r in records} == {Tier.LOW.value}
    warnings = [r for r in caplog.records if "calendar" in r.getMessage()
                and r.levelname == "WARNING"]
    assert len(warnings) == 1


def run_briefly(config: Path, log: Path) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "replicator", "run", "--only", "capture",
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=120, check=False)
    return done.returncode, done.stderr


async def test_a_configured_calendar_that_is_missing_is_the_operators(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, name text)")
    config = write_toml(tmp_path / "run.toml", pg_dsn, kafka_bootstrap, topic_prefix,
                        priority='[priority]\nweddings_table = "public.weddings"\n',
                        metrics_port=free_port())
    code, stderr = await asyncio.to_thread(run_briefly, config, tmp_path / "log")
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "public.weddings" in errors[0], stderr[-3000:]


async def test_a_missing_database_is_the_operators(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    missing = make_conninfo(pg_dsn, dbname="no_such_database_here")
    config = write_toml(tmp_path / "run.toml", missing, kafka_bootstrap, topic_prefix,
                        metrics_port=free_port())
    code, stderr = await asyncio.to_thread(run_briefly, config, tmp_path / "log")
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no_such_database_here" in errors[0], stderr[-3000:]


async def test_an_unreachable_server_at_start_is_waited_for(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    unreachable = make_conninfo(pg_dsn, host="127.0.0.1", port=str(free_port()))
    log = tmp_path / "run.log"
    config = write_toml(tmp_path / "run.toml", unreachable, kafka_bootstrap, topic_prefix,
                        metrics_port=port)
    proc = start_run(config, log)
    try:
        await wait_for(lambda: holds(WAITING in log.read_text()), what="the warning")
        await wait_for(lambda: ready_is(port, 503), what="not ready")
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert text.count(WAITING) == 1 and "Traceback" not in text, text[-3000:]


async def test_a_topic_deleted_while_capturing_is_created_again(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    low = topic_names(topic_prefix)[Tier.LOW]
    async with running(config, sinks=False) as capture:
        await wait_for(lambda: holds(capture.stats.transactions >= 1), what="streaming")
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([low])

            async def gone() -> bool:
                return low not in await admin.list_topics()
            await wait_for(gone, what="the deletion")
        finally:
            await admin.close()
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO vendors VALUES (9, 'after the deletion', 1)")

        async def delivered() -> bool:
            records = await read_all(kafka_bootstrap, topic_prefix)
            return any(r.topic == low and r.value.get("after", {}).get("name") ==
                       "after the deletion" for r in records if "op" in r.value)
        await wait_for(delivered, within=120, what="the change in the recreated topic")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, low)])
    finally:
        await admin.close()
    configs = {entry[0]: entry[1] for entry in described[0].resources[0][4]}
    assert configs["max.message.bytes"] == str(config.kafka.max_message_bytes)


async def test_staging_tables_and_short_lived_tables_leave_capture_running(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    """A replay's staging schema in the captured database (a rollback or a restore with
    --replace-existing into the live database), whose tables get their key only after the
    load, is left out; and a table created and dropped at once (before its snapshot could be
    read) is passed over: capture goes on."""
    setup_schema(pg_dsn)
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)  # FOR ALL TABLES
    async with running(config, sinks=False) as capture:
        await wait_for(lambda: holds(capture.stats.transactions >= 1), what="streaming")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA replicator_restore_0123456789_0")
            conn.execute("CREATE TABLE replicator_restore_0123456789_0.guests "
                         "(id bigint, name text)")
            conn.execute("INSERT INTO replicator_restore_0123456789_0.guests "
                         "SELECT g, 'staged' FROM generate_series(1, 50) g")
            conn.execute("ALTER TABLE replicator_restore_0123456789_0.guests "
                         "ADD PRIMARY KEY (id)")
            conn.execute("DROP SCHEMA replicator_restore_0123456789_0 CASCADE")
            for n in range(5):
                conn.execute(f"CREATE TABLE brief_{n} (id bigint PRIMARY KEY)")
                conn.execute(f"INSERT INTO brief_{n} VALUES (1)")
                conn.execute(f"DROP TABLE brief_{n}")
            conn.execute("INSERT INTO vendors VALUES (9, 'after the staging', 1)")
        await asyncio.sleep(3)  # the re-snapshots of the brief tables get their turn

        async def delivered() -> bool:
            records = await read_all(kafka_bootstrap, topic_prefix)
            return any(r.value.get("after", {}).get("name") == "after the staging"
                       for r in records if "op" in r.value)
        await wait_for(delivered, within=60, what="the change after the staging tables")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO vendors VALUES (10, 'still running', 1)")

        async def still() -> bool:
            records = await read_all(kafka_bootstrap, topic_prefix)
            return any(r.value.get("after", {}).get("name") == "still running"
                       for r in records if "op" in r.value)
        await wait_for(still, within=60, what="a change after the re-snapshots")
        records = await read_all(kafka_bootstrap, topic_prefix)
        assert not [r for r in records if "replicator_restore_" in str(r.value)], \
            "a staging table reached Kafka"


# --- noise: transient broker states, clients whose start failed --------------------------------


async def test_kafka_clients_whose_start_failed_are_closed(
        caplog: pytest.LogCaptureFixture) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # no broker listens there
    with pytest.raises(KafkaError):
        await last_transaction_lsn(nowhere, "t.transactions")
    follower = StateFollower(nowhere, "t.capture-state")
    with pytest.raises(StateUnavailable):
        await follower.read_new()
    await follower.close()
    gc.collect()
    await asyncio.sleep(0)
    assert not [r for r in caplog.records if "Unclosed" in r.getMessage()]


def test_transient_broker_errors_are_quiet_unless_they_persist() -> None:
    now = [0.0]
    quiet = QuietTransientBroker(clock=lambda: now[0])

    def record(message: str, name: str = "aiokafka.consumer.group_coordinator",
               level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, (), None)

    # A broker warming up: dropped while it lasts less than the grace period.
    for t in range(0, 50, 5):
        now[0] = float(t)
        assert not quiet.filter(record("Group Coordinator Request failed: "
                                       "[Error 15] GroupCoordinatorNotAvailableError"))
    # It persists: one line, as a warning, then quiet again for the rest of the spell.
    now[0] = TRANSIENT_GRACE_S + 1
    persisting = record("NotLeaderForPartitionError for t.low-0")
    assert quiet.filter(persisting) and persisting.levelno == logging.WARNING
    assert "transient state for 61s" in persisting.getMessage()
    now[0] += 5
    assert not quiet.filter(record("NotLeaderForPartitionError for t.low-0"))
    # Other errors, and other loggers, pass as they are.
    assert quiet.filter(record("Unexpected error in sender"))
    assert quiet.filter(record("GroupCoordinatorNotAvailableError", name="replicator.sink"))
