"""End-to-end capture into Kafka against pg_recvlogical, on the same WAL.

Workload: a fresh database with the sample schema of the capture tests (weddings, guests,
vendors; a few hundred weddings spread over the four tiers), a publication, then three
logical slots created at the same point (ours, pg_recvlogical's, and one only peeked at),
then N row changes (default 200k; --quick 50k) written BEFORE anything is measured: inserts,
updates and deletes of guests and vendors plus one wedding update, in transactions of 100.
So both clients drain identical WAL, and the server does the same work for each.

- pg_recvlogical (PostgreSQL 15's) drains its slot with pgoutput (proto_version 1) to
  /dev/null until `--endpos`, the end LSN of the last transaction.
- Ours: a `Capture` (config as in the capture tests, `snapshot = "never"`) streams its slot
  into Kafka (decode, assemble, classify by tier, Avro, aiokafka with acks=all) until the
  slot's confirmed_flush_lsn reaches that end LSN, i.e. until every change is acknowledged by
  Kafka. Timed from the start of streaming (start-up, which creates topics and reads the state
  topic, is reported apart); CPU is this process's over the same interval, and the part of it
  spent in the garbage collector is shown (gc.callbacks).
- Server-side decoding (`pg_logical_slot_peek_binary_changes` on the third slot) as context:
  the bound no client can pass.

The ratio ours / pg_recvlogical (throughput) is the result; absolute figures on these shared
machines are noise. Everything it creates (slots, database, topics of its prefix) is removed.

    .venv/bin/python -m benchmarks.capture [--rows 200000] [--quick] [--json]
                                           [--loop uvloop|asyncio] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import logging
import os
import pstats
import resource
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from psycopg import sql
from psycopg.conninfo import make_conninfo

from benchmarks import debezium
from benchmarks.capture_stream import PUB, drop, run_recvlogical, server_dsn
from benchmarks.capture_stream import run_ours as run_stream_decode
from replicator.capture import Capture
from replicator.cli.run import tune_gc
from replicator.config import WeddingLink
from replicator.devstack.settings import StackSettings
from replicator.devstack.stack import Stack
from replicator.events import Tier
from replicator.position import Lsn
from replicator.source import pgoutput as pg
from replicator.source.stream import negotiate_protocol
from tests.integration.capture_helpers import make_config, setup_schema

TX_CHANGES = 100  # row changes per transaction (see WORKLOAD)
WEDDINGS = 300
GUESTS0 = 2_000  # guests before the slots exist (updates and deletes need rows to hit)
VENDORS0 = 100
TABLES = ("weddings", "guests", "vendors", "bookings", "timeline_items")

# A wedding's date by tier bucket (id % 4): critical (0-7 days), high (8-30), normal
# (31-90), low (beyond 90 days, or already past). `salt` moves it within its bucket.
WEDDING_DATE = """
CREATE FUNCTION bench_wedding_date(k int, salt int) RETURNS date LANGUAGE sql IMMUTABLE AS $$
  SELECT current_date + CASE k % 4
    WHEN 0 THEN (k + salt) % 8
    WHEN 1 THEN 8 + (k + salt) % 23
    WHEN 2 THEN 31 + (k + salt) % 60
    ELSE CASE WHEN k % 8 = 3 THEN -1 - (k + salt) % 30 ELSE 91 + (k + salt) % 500 END
  END
$$
"""

# The tables the capture tests' schema lacks (no foreign keys: deletes stay exact).
EXTRA_SCHEMA = """
CREATE TABLE bookings (id bigint PRIMARY KEY, wedding_id bigint, vendor_id bigint,
                       status text, booked_at timestamptz);
CREATE TABLE timeline_items (id bigint PRIMARY KEY, wedding_id bigint, starts_at timestamptz,
                             title text);
"""
BOOKINGS0 = 100
BIG_TRANSACTIONS = 3  # multi-MB transactions, spread through the workload
BIG_ROWS = 10_000  # timeline items each (about 4.5 MB of WAL)

# One transaction per iteration, 100 row changes each: 46 guest inserts, 28 guest updates (of
# the previous transaction's first 28), 10 guest deletes (of the last 10 inserted two
# transactions before), 5 vendor inserts, 3 updates, 1 delete, 3 booking inserts and 1 update,
# 2 timeline items, and 1 wedding update (its date moves within its tier). At three points a
# transaction also inserts BIG_ROWS timeline items with long titles. Every statement hits
# exactly the rows it names (the ids start past the rows loaded before the slots).
WORKLOAD = """
CREATE PROCEDURE bench_workload(n_tx int, g0 bigint, v0 bigint, b0 bigint, w int,
                                big_every int, big_rows int) LANGUAGE plpgsql AS $$
DECLARE
  i int; g bigint; v bigint; b bigint; t bigint := 0;
BEGIN
  FOR i IN 0 .. n_tx - 1 LOOP
    g := g0 + i * 46;
    v := v0 + i * 5;
    b := b0 + i * 3;
    INSERT INTO guests
      SELECT x, (x * 7919) % w + 1, 'guest ' || x,
             jsonb_build_object('vegan', x % 5 = 0, 'table', x % 40, 'allergies',
                                CASE WHEN x % 7 = 0 THEN '["nuts"]'::jsonb ELSE '[]' END),
             repeat('n', 20 + (x % 40)::int)
      FROM generate_series(g + 1, g + 46) x;
    UPDATE guests SET notes = 'seated at table ' || (id % 40) || ' in round ' || i,
                      dietary = dietary || jsonb_build_object('rev', i)
      WHERE id BETWEEN g - 45 AND g - 18;
    DELETE FROM guests WHERE id BETWEEN g - 55 AND g - 46;
    INSERT INTO vendors SELECT x, 'vendor ' || x, (x % 997) * 12.5
      FROM generate_series(v + 1, v + 5) x;
    UPDATE vendors SET fee = fee + 1 WHERE id BETWEEN v - 4 AND v - 2;
    DELETE FROM vendors WHERE id = v - 5;
    INSERT INTO bookings SELECT x, (x * 31) % w + 1, v + 1 + x % 5, 'requested', now()
      FROM generate_series(b + 1, b + 3) x;
    UPDATE bookings SET status = 'confirmed' WHERE id = b;
    INSERT INTO timeline_items SELECT t + x, (i * 13 + x) % w + 1,
                                      now() + make_interval(hours => x), 'first dance'
      FROM generate_series(1, 2) x;
    t := t + 2;
    IF big_every > 0 AND i % big_every = big_every / 2 THEN
      INSERT INTO timeline_items SELECT t + x, x % w + 1, now() + make_interval(mins => x),
                                        'run of show ' || x || ' ' || repeat('x', 400)
        FROM generate_series(1, big_rows) x;
      t := t + big_rows;
    END IF;
    UPDATE weddings SET wedding_date = bench_wedding_date(i % w + 1, i)
      WHERE id = i % w + 1;
    COMMIT;
  END LOOP;
END
$$
"""


async def kafka_bootstrap() -> str:
    stack = Stack(StackSettings.from_env(os.environ))
    await stack.up(["kafka"])
    return stack.services["kafka"].address()


async def setup(admin_dsn: str, db: str, rows: int, slots: list[str]) -> tuple[str, int]:
    """Create *db* with the sample schema, the publication and *slots*, then write the
    workload; returns the database's DSN and the number of transactions written."""
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    dsn = make_conninfo(admin_dsn, dbname=db)
    await asyncio.to_thread(setup_schema, dsn, date.today())  # weddings 1-3
    big = BIG_TRANSACTIONS if rows >= 4 * BIG_TRANSACTIONS * BIG_ROWS else 0
    n_tx = max(1, -(-(rows - big * BIG_ROWS) // TX_CHANGES))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(EXTRA_SCHEMA)
        await conn.execute(WEDDING_DATE)
        await conn.execute(WORKLOAD)
        await conn.execute(
            "INSERT INTO weddings SELECT k, 'couple ' || k, bench_wedding_date(k, 0) "
            "FROM generate_series(4, %s) k", (WEDDINGS,))
        await conn.execute(
            "INSERT INTO guests SELECT x, (x * 7919) %% %s + 1, 'guest ' || x, '{}', 'early' "
            "FROM generate_series(1, %s) x", (WEDDINGS, GUESTS0))
        await conn.execute("INSERT INTO vendors SELECT x, 'vendor ' || x, 100 "
                           "FROM generate_series(1, %s) x", (VENDORS0,))
        await conn.execute("INSERT INTO bookings SELECT x, x %% %s + 1, x, 'confirmed', now() "
                           "FROM generate_series(1, %s) x", (WEDDINGS, BOOKINGS0))
        await conn.execute(f"CREATE PUBLICATION {PUB} FOR TABLE {', '.join(TABLES)}")
        for slot in slots:
            await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                               (slot,))
        await conn.execute(sql.SQL("CALL bench_workload({}, {}, {}, {}, {}, {}, {})").format(
            sql.Literal(n_tx), sql.Literal(GUESTS0), sql.Literal(VENDORS0),
            sql.Literal(BOOKINGS0), sql.Literal(WEDDINGS),
            sql.Literal(n_tx // big if big else 0), sql.Literal(BIG_ROWS)))
        # Not during the measurements: the checkpoint the writes would soon cause.
        await conn.execute("CHECKPOINT")
    return dsn, n_tx


async def run_peek(dsn: str, slot: str) -> tuple[float, int, int, Lsn]:
    """Server-side decoding of the whole workload: seconds, row changes, messages, and the
    end LSN of the last transaction (the commit message's LSN)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
        row = await cur.fetchone()
        assert row is not None
        started = time.perf_counter()
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE get_byte(data, 0) IN (73, 85, 68)), count(*), "
            "max(lsn)::text FROM pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, NULL, "
            "'proto_version', '1', 'publication_names', %s)", (slot, row[0], PUB))
        elapsed = time.perf_counter() - started
        counts = await cur.fetchone()
    assert counts is not None
    return elapsed, int(counts[0]), int(counts[1]), Lsn.parse(counts[2])


class TimedCapture(Capture):
    """A Capture that notes when streaming starts (after start-up) and how long the garbage
    collector runs from then on; optionally profiled."""

    profiler: cProfile.Profile | None = None
    stream_started: float | None = None
    cpu_started: float = 0.0
    gc_s: float = 0.0
    gc_runs: int = 0
    _gc_started: float = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_started
            self.gc_runs += 1

    async def _stream_forever(self, start_lsn: Lsn) -> None:
        self.cpu_started = time.process_time()
        self.stream_started = time.perf_counter()
        gc.callbacks.append(self._on_gc)
        if self.profiler is not None:
            self.profiler.enable()
        await super()._stream_forever(start_lsn)


async def slot_lsn(conn: psycopg.AsyncConnection[Any], slot: str) -> Lsn:
    cur = await conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                             "WHERE slot_name = %s", (slot,))
    row = await cur.fetchone()
    return Lsn.parse(row[0]) if row and row[0] else Lsn(0)


async def run_ours(dsn: str, bootstrap: str, prefix: str, slot: str, end: Lsn,
                   changes: int, profiler: cProfile.Profile | None) -> dict[str, Any]:
    config = make_config(dsn, bootstrap, prefix, snapshot="never")
    linked = {f"public.{t}": WeddingLink(column="wedding_id")
              for t in ("guests", "bookings", "timeline_items")}
    config = config.model_copy(update={
        "source": config.source.model_copy(update={"slot": slot, "publication": PUB}),
        "priority": config.priority.model_copy(update={"tables": linked})})
    capture = TimedCapture(config)
    capture.profiler = profiler
    created = time.perf_counter()
    task = asyncio.create_task(capture.run())
    deadline = created + max(120.0, changes / 1_000)
    reached = False
    try:
        # In-process first (cheap, no queries while streaming), then the slot itself.
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while capture.stats.confirmed_lsn < end or await slot_lsn(conn, slot) < end:
                if task.done():
                    task.result()
                    raise RuntimeError("capture returned before reaching the end LSN")
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"capture confirmed only {capture.stats.confirmed_lsn} "
                                       f"of {end} within {deadline - created:.0f}s")
                await asyncio.sleep(0.005 if capture.stats.confirmed_lsn < end else 0.01)
            finished = time.perf_counter()
            cpu = time.process_time() - capture.cpu_started
        gc_s, gc_runs = capture.gc_s, capture.gc_runs
        reached = True
    finally:
        if profiler is not None:
            profiler.disable()
        if capture._on_gc in gc.callbacks:
            gc.callbacks.remove(capture._on_gc)
        capture.stop()  # drains and confirms; the database is dropped only after this
        try:
            await asyncio.wait_for(task, 60)
        except Exception:
            if reached:  # otherwise the error that got us here is the one to see
                raise
    assert capture.stream_started is not None
    return {
        "seconds": finished - capture.stream_started,
        "startup_s": capture.stream_started - created,
        "cpu_s": cpu,
        "gc_s": gc_s,
        "gc_runs": gc_runs,
        "events": capture.stats.events,
        "transactions": capture.stats.transactions,
        "by_tier": dict(sorted(capture.stats.events_by_tier.items())),
        "protocol": negotiate_protocol(capture.server_version, config.source.protocol_version),
    }


async def delete_topics(bootstrap: str, prefix: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix + ".")]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


async def main(rows: int, as_json: bool, profile_path: str | None, with_debezium: bool) -> None:
    logging.basicConfig(level=logging.WARNING)
    admin, bootstrap = await server_dsn(), await kafka_bootstrap()
    settings = StackSettings.from_env(os.environ)
    libs = debezium.install(settings.cache_dir) if with_debezium else None
    tag = uuid.uuid4().hex[:8]
    db, prefix = f"bench_{tag}", f"bench-capture-{tag}"
    slots = {name: f"{db}_{name}" for name in ("ours", "recv", "peek", "decode", "dbz")}
    profiler = cProfile.Profile() if profile_path else None
    print(f"setting up {rows} row changes in {db} ...", flush=True)
    dbz: debezium.Run | None = None
    try:
        setup_started = time.perf_counter()
        dsn, n_tx = await setup(admin, db, rows, list(slots.values()))
        setup_s = time.perf_counter() - setup_started
        peek_s, changes, messages, end = await run_peek(dsn, slots["peek"])
        print(f"wrote {changes} changes in {n_tx} transactions ({setup_s:.1f}s); end LSN {end}"
              f"; measuring ...", flush=True)
        recv_s = await asyncio.to_thread(run_recvlogical, dsn, slots["recv"], end)
        # Our client without Kafka: stream + decoder (the protocol version pg_recvlogical is
        # given) until every row change is decoded.
        decode_s, decode_cpu = await run_stream_decode(
            dsn, slots["decode"], changes, (pg.Insert, pg.Update, pg.Delete))
        ours = await run_ours(dsn, bootstrap, prefix, slots["ours"], end, changes, profiler)
        async with debezium.kafka_clients(bootstrap) as (kafka_admin, consumer):
            tps = [TopicPartition(d["topic"], p["partition"])
                   for d in await kafka_admin.describe_topics(
                       [f"{prefix}.{tier.value}" for tier in Tier])
                   for p in d["partitions"]]
            published, first, last = await debezium.first_and_last(consumer, tps)
        ours["e2e_s"] = last - first
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if libs is not None:
            print("Debezium on Kafka Connect ...", flush=True)
            with tempfile.TemporaryDirectory(prefix="bench-debezium-") as work:
                dbz = await debezium.run(
                    libs, Path(work), dsn, bootstrap, slot=slots["dbz"], publication=PUB,
                    prefix=f"bench-dbz-{tag}", changes=changes, partitions=2,
                    timeout_s=max(300.0, changes / 1_000))
    finally:
        try:
            await drop(admin, db)
        finally:
            await delete_topics(bootstrap, prefix)
    if ours["events"] != changes or published != changes:
        print(f"WARNING: capture published {ours['events']} events ({published} in its "
              f"topics), expected {changes}", file=sys.stderr)
    if dbz is not None and dbz.messages != changes:
        print(f"WARNING: Debezium wrote {dbz.messages} messages, expected {changes}",
              file=sys.stderr)

    ours_rate, recv_rate, peek_rate = changes / ours["seconds"], changes / recv_s, changes / peek_s
    decode_rate, e2e_rate = changes / decode_s, changes / ours["e2e_s"]
    dbz_rate = changes / dbz.seconds if dbz else None
    cpu_us = ours["cpu_s"] / changes * 1e6
    ratio = ours_rate / recv_rate
    loop = type(asyncio.get_running_loop())
    print(f"\n{changes} row changes (I/U/D) in {n_tx} transactions, {messages} pgoutput messages; "
          f"PostgreSQL 15, {os.cpu_count()} CPUs, {loop.__module__}.{loop.__name__}"
          f"{', PROFILED (ratio not meaningful)' if profiler else ''}")
    print(f"{'':40}{'seconds':>9}{'changes/s':>12}")
    print(f"{'server-side decoding (peek)':40}{peek_s:>9.2f}{peek_rate:>12,.0f}")
    print(f"{'pg_recvlogical -> /dev/null':40}{recv_s:>9.2f}{recv_rate:>12,.0f}")
    print(f"{'ours: decode only (no Kafka)':40}{decode_s:>9.2f}{decode_rate:>12,.0f}")
    print(f"{'ours -> Kafka, first to last message':40}{ours['e2e_s']:>9.2f}{e2e_rate:>12,.0f}")
    print(f"{'ours -> Kafka, stream start to confirmed':40}{ours['seconds']:>9.2f}"
          f"{ours_rate:>12,.0f}")
    if dbz is not None and dbz_rate is not None:
        print(f"{'Debezium -> Kafka, first to last message':40}{dbz.seconds:>9.2f}"
              f"{dbz_rate:>12,.0f}")
        print(f"  Debezium {debezium.DEBEZIUM_VERSION}: start-up to its first message "
              f"{dbz.startup_s:.1f}s; CPU {dbz.cpu_s:.1f}s including start-up = "
              f"{dbz.cpu_s / changes * 1e6:.1f} us/change; peak RSS {dbz.peak_rss_mb:.0f} MB")
    print(f"  capture start-up (not timed):   {ours['startup_s']:.2f}s; pgoutput "
          f"v{ours['protocol']}; {ours['transactions']} transactions, events by tier "
          f"{ours['by_tier']}")
    print(f"  capture CPU: {ours['cpu_s']:.2f}s = {cpu_us:.1f} us/change "
          f"({ours['cpu_s'] / ours['seconds']:.0%} of one core), of which garbage collector "
          f"{ours['gc_s']:.2f}s = {ours['gc_s'] / changes * 1e6:.1f} us/change "
          f"({ours['gc_runs']} collections); decode only {decode_cpu / changes * 1e6:.1f} "
          f"us/change; peak RSS {peak_rss_mb:.0f} MB")
    print(f"ratio decode / pg_recvlogical:    {decode_rate / recv_rate:.2f}")
    print(f"ratio ours -> Kafka / pg_recvlogical: {ratio:.2f}")
    if dbz_rate is not None:
        print(f"ratio ours -> Kafka / Debezium:   {e2e_rate / dbz_rate:.2f}")
    if profiler is not None and profile_path:
        profiler.dump_stats(profile_path)
        stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
    if as_json:
        print(json.dumps({
            "changes": changes,
            "transactions": n_tx,
            "decode_per_s": round(decode_rate, 1),
            "recvlogical_per_s": round(recv_rate, 1),
            "server_decode_per_s": round(peek_rate, 1),
            "e2e_per_s": round(e2e_rate, 1),
            "debezium_per_s": round(dbz_rate, 1) if dbz_rate else None,
            "ratio_decode_vs_recvlogical": round(decode_rate / recv_rate, 4),
            "ratio_e2e_vs_debezium": round(e2e_rate / dbz_rate, 4) if dbz_rate else None,
            "ratio_vs_recvlogical": round(ratio, 4),
            "peak_rss_mb": round(peak_rss_mb, 1),
            "cpu_s_per_million_changes": round(ours["cpu_s"] / changes * 1e6, 2),
            "decode_cpu_s_per_million_changes": round(decode_cpu / changes * 1e6, 2),
            "debezium_cpu_s_per_million_changes":
                round(dbz.cpu_s / changes * 1e6, 2) if dbz else None,
            "debezium_peak_rss_mb": round(dbz.peak_rss_mb, 1) if dbz else None,
            "ours_startup_s": round(ours["startup_s"], 3),
            "ours_gc_us_per_change": round(ours["gc_s"] / changes * 1e6, 3),
            "profiled": profiler is not None,
        }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=None,
                        help="row changes to write and capture (default 1000000)")
    parser.add_argument("--quick", action="store_true", help="200000 row changes")
    parser.add_argument("--no-debezium", action="store_true",
                        help="leave out the Debezium reference (no Java or Maven needed)")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="event loop (the service runs on uvloop)")
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="cProfile our streaming into FILE and print its top entries "
                             "(slows ours: the ratio is then not meaningful)")
    args = parser.parse_args()
    n = args.rows if args.rows is not None else 200_000 if args.quick else 1_000_000
    coroutine = main(n, args.json, args.profile, not args.no_debezium)
    tune_gc()  # the collector settings `replicator run` uses
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)
