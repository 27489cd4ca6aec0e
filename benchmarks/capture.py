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
import sys
import time
import uuid
from datetime import date
from typing import Any

import psycopg
from aiokafka.admin import AIOKafkaAdminClient
from psycopg import sql
from psycopg.conninfo import make_conninfo

from benchmarks.capture_stream import PUB, drop, run_recvlogical, server_dsn
from replicator.capture import Capture
from replicator.devstack.settings import StackSettings
from replicator.devstack.stack import Stack
from replicator.position import Lsn
from replicator.source.stream import negotiate_protocol
from tests.integration.capture_helpers import make_config, setup_schema

TX_CHANGES = 100  # row changes per transaction (see WORKLOAD)
WEDDINGS = 300
GUESTS0 = 2_000  # guests before the slots exist (updates and deletes need rows to hit)
VENDORS0 = 100

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

# One transaction per iteration, 100 row changes each: 50 guest inserts, 30 guest updates (of
# the previous transaction's first 30), 10 guest deletes (of the last 10 inserted two
# transactions before), 5 vendor inserts, 3 updates, 1 delete, and 1 wedding update (its date
# moves within its tier). Every statement hits exactly the rows it names (the ids start past
# the rows loaded before the slots), so the change count is exact.
WORKLOAD = """
CREATE PROCEDURE bench_workload(n_tx int, g0 bigint, v0 bigint, w int) LANGUAGE plpgsql AS $$
DECLARE
  i int; g bigint; v bigint;
BEGIN
  FOR i IN 0 .. n_tx - 1 LOOP
    g := g0 + i * 50;
    v := v0 + i * 5;
    INSERT INTO guests
      SELECT x, (x * 7919) % w + 1, 'guest ' || x,
             jsonb_build_object('vegan', x % 5 = 0, 'table', x % 40, 'allergies',
                                CASE WHEN x % 7 = 0 THEN '["nuts"]'::jsonb ELSE '[]' END),
             repeat('n', 20 + (x % 40)::int)
      FROM generate_series(g + 1, g + 50) x;
    UPDATE guests SET notes = 'seated at table ' || (id % 40) || ' in round ' || i,
                      dietary = dietary || jsonb_build_object('rev', i)
      WHERE id BETWEEN g - 49 AND g - 20;
    DELETE FROM guests WHERE id BETWEEN g - 59 AND g - 50;
    INSERT INTO vendors SELECT x, 'vendor ' || x, (x % 997) * 12.5
      FROM generate_series(v + 1, v + 5) x;
    UPDATE vendors SET fee = fee + 1 WHERE id BETWEEN v - 4 AND v - 2;
    DELETE FROM vendors WHERE id = v - 5;
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
    n_tx = max(1, -(-rows // TX_CHANGES))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
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
        await conn.execute(f"CREATE PUBLICATION {PUB} FOR TABLE weddings, guests, vendors")
        for slot in slots:
            await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                               (slot,))
        await conn.execute(sql.SQL("CALL bench_workload({}, {}, {}, {})").format(
            sql.Literal(n_tx), sql.Literal(GUESTS0), sql.Literal(VENDORS0),
            sql.Literal(WEDDINGS)))
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
    config = config.model_copy(update={"source": config.source.model_copy(
        update={"slot": slot, "publication": PUB})})
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


async def main(rows: int, as_json: bool, profile_path: str | None) -> None:
    logging.basicConfig(level=logging.WARNING)
    admin, bootstrap = await server_dsn(), await kafka_bootstrap()
    tag = uuid.uuid4().hex[:8]
    db, prefix = f"bench_{tag}", f"bench-capture-{tag}"
    ours_slot, recv_slot, peek_slot = f"{db}_ours", f"{db}_recv", f"{db}_peek"
    profiler = cProfile.Profile() if profile_path else None
    print(f"setting up {rows} row changes in {db} ...", flush=True)
    try:
        setup_started = time.perf_counter()
        dsn, n_tx = await setup(admin, db, rows, [ours_slot, recv_slot, peek_slot])
        setup_s = time.perf_counter() - setup_started
        peek_s, changes, messages, end = await run_peek(dsn, peek_slot)
        print(f"wrote {changes} changes in {n_tx} transactions ({setup_s:.1f}s); end LSN {end}"
              f"; measuring ...", flush=True)
        recv_s = await asyncio.to_thread(run_recvlogical, dsn, recv_slot, end)
        ours = await run_ours(dsn, bootstrap, prefix, ours_slot, end, changes, profiler)
    finally:
        try:
            await drop(admin, db)
        finally:
            await delete_topics(bootstrap, prefix)
    if ours["events"] != changes:
        print(f"WARNING: capture published {ours['events']} events, expected {changes}",
              file=sys.stderr)

    ours_rate, recv_rate, peek_rate = changes / ours["seconds"], changes / recv_s, changes / peek_s
    cpu_us = ours["cpu_s"] / changes * 1e6
    ratio = ours_rate / recv_rate
    loop = type(asyncio.get_running_loop())
    print(f"\n{changes} row changes (I/U/D) in {n_tx} transactions, {messages} pgoutput messages; "
          f"PostgreSQL 15, {os.cpu_count()} CPUs, {loop.__module__}.{loop.__name__}"
          f"{', PROFILED (ratio not meaningful)' if profiler else ''}")
    print(f"{'':34}{'seconds':>9}{'changes/s':>12}")
    print(f"{'server-side decoding (peek)':34}{peek_s:>9.2f}{peek_rate:>12,.0f}")
    print(f"{'pg_recvlogical -> /dev/null':34}{recv_s:>9.2f}{recv_rate:>12,.0f}")
    print(f"{'Capture -> Kafka (acks=all)':34}{ours['seconds']:>9.2f}{ours_rate:>12,.0f}")
    print(f"  capture start-up (not timed):   {ours['startup_s']:.2f}s; pgoutput "
          f"v{ours['protocol']}; {ours['transactions']} transactions, events by tier "
          f"{ours['by_tier']}")
    print(f"  capture CPU: {ours['cpu_s']:.2f}s = {cpu_us:.1f} us/change "
          f"({ours['cpu_s'] / ours['seconds']:.0%} of one core), of which garbage collector "
          f"{ours['gc_s']:.2f}s = {ours['gc_s'] / changes * 1e6:.1f} us/change "
          f"({ours['gc_runs']} collections)")
    print(f"ratio ours / pg_recvlogical:      {ratio:.2f}")
    print(f"ratio ours / server-side decoding: {ours_rate / peek_rate:.2f}")
    if profiler is not None and profile_path:
        profiler.dump_stats(profile_path)
        stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
    if as_json:
        print(json.dumps({
            "rows": changes,
            "ours_s": round(ours["seconds"], 4),
            "ours_changes_per_s": round(ours_rate, 1),
            "ours_cpu_us_per_change": round(cpu_us, 3),
            "recvlogical_s": round(recv_s, 4),
            "recvlogical_changes_per_s": round(recv_rate, 1),
            "ratio_vs_recvlogical": round(ratio, 4),
            "server_decode_changes_per_s": round(peek_rate, 1),
            "ours_startup_s": round(ours["startup_s"], 3),
            "ours_gc_us_per_change": round(ours["gc_s"] / changes * 1e6, 3),
            "profiled": profiler is not None,
        }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=None,
                        help="row changes to write and capture (default 200000)")
    parser.add_argument("--quick", action="store_true", help="50000 row changes")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="event loop (the service runs on uvloop)")
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="cProfile our streaming into FILE and print its top entries "
                             "(slows ours: the ratio is then not meaningful)")
    args = parser.parse_args()
    n = args.rows if args.rows is not None else 50_000 if args.quick else 200_000
    coroutine = main(n, args.json, args.profile)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)
