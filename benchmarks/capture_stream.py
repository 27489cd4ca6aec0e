"""Capture throughput: ReplicationStream + pgoutput.Decoder against pg_recvlogical.

Both read the same committed changes (~200k inserted rows, in transactions of 10k) from
identical slots created before the inserts, over a replication connection to PostgreSQL 15,
so the server does the same work for each. pg_recvlogical only receives (its output goes to
/dev/null); ours receives and decodes every message. Runs alternate to spread machine noise,
and the script prints changes/s for each and the ratio (ours / pg_recvlogical), plus server-side
decoding (pg_logical_slot_peek_binary_changes) as the upper bound, and our client CPU per
change. On these shared machines absolute figures are noise; the ratio is the result.

    .venv/bin/python -m benchmarks.capture_stream [--rows 200000] [--runs 3] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from replicator.devstack.settings import StackSettings
from replicator.devstack.stack import Stack
from replicator.position import Lsn
from replicator.source import pgoutput as pg
from replicator.source import stream as stream_module
from replicator.source.stream import ReplicationStream

PG_BIN = Path("/usr/lib/postgresql/15/bin")
TX_ROWS = 10_000
PUB = "bench_pub"


async def server_dsn() -> str:
    stack = Stack(StackSettings.from_env(os.environ))
    await stack.up(["pg15"])
    return stack.services["pg15"].address()


async def setup(admin_dsn: str, db: str, rows: int, slots: list[str]) -> tuple[str, Lsn]:
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    dsn = make_conninfo(admin_dsn, dbname=db)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE guest (id int PRIMARY KEY, wedding_id int NOT NULL, "
                           "name text NOT NULL, rsvp boolean, updated timestamptz)")
        await conn.execute(f"CREATE PUBLICATION {PUB} FOR TABLE guest")
        for slot in slots:
            await conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                               (slot,))
        for first in range(0, rows, TX_ROWS):
            await conn.execute(
                "INSERT INTO guest SELECT g, g %% 500, 'guest ' || g, g %% 3 = 0, now() "
                "FROM generate_series(%s::int, %s::int) g",
                (first + 1, min(first + TX_ROWS, rows)))
        cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
        row = await cur.fetchone()
        assert row is not None
    return dsn, Lsn.parse(row[0])


async def drop(admin_dsn: str, db: str) -> None:
    async with await psycopg.AsyncConnection.connect(admin_dsn, autocommit=True) as admin:
        await admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                            " WHERE database = %s", (db,))
        await admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


def run_recvlogical(dsn: str, slot: str, end: Lsn) -> float:
    argv = [str(PG_BIN / "pg_recvlogical"), "-d", dsn, "--slot", slot, "--start",
            "-o", "proto_version=1", "-o", f"publication_names={PUB}",
            f"--endpos={end}", "--no-loop", "-f", "/dev/null"]
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - started


async def run_ours(dsn: str, slot: str, rows: int,
                   kinds: tuple[type, ...] = (pg.Insert,)) -> tuple[float, float]:
    """Seconds from connecting until the *rows*-th message of *kinds* is decoded, and client
    CPU seconds."""
    decoder = pg.Decoder(1)
    decode = decoder.decode
    inserts = 0
    cpu = time.process_time()
    started = time.perf_counter()
    async with ReplicationStream(dsn, slot=slot, publication=PUB, start_lsn=Lsn(0),
                                 protocol_version=1, streaming=None) as stream:
        while inserts < rows:
            for message in await stream.read_batch():
                if type(decode(message.payload)) in kinds:
                    inserts += 1
            if stream.received_lsn:
                stream.confirm(stream.received_lsn)
        elapsed = time.perf_counter() - started
    return elapsed, time.process_time() - cpu


async def run_peek(dsn: str, slot: str) -> float:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        await conn.execute(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s)", (slot, PUB))
        return time.perf_counter() - started


async def main(rows: int, runs: int, pause_us: float | None) -> None:
    if pause_us is not None:
        stream_module.PAUSE_S = pause_us / 1e6  # type: ignore[misc]
    admin = await server_dsn()
    db = f"bench_{uuid.uuid4().hex[:8]}"
    theirs = [f"bench_recv_{i}" for i in range(runs)]
    ours = [f"bench_ours_{i}" for i in range(runs)]
    print(f"setting up {rows} rows in {db} ...", flush=True)
    try:
        dsn, end = await setup(admin, db, rows, [*theirs, *ours, "bench_peek"])
        peek = await run_peek(dsn, "bench_peek")
        recv_times: list[float] = []
        our_times: list[float] = []
        cpu_times: list[float] = []
        for i in range(runs):
            order: list[Any] = ["recv", "ours"] if i % 2 == 0 else ["ours", "recv"]
            for who in order:
                if who == "recv":
                    recv_times.append(await asyncio.to_thread(run_recvlogical, dsn, theirs[i], end))
                else:
                    elapsed, cpu = await run_ours(dsn, ours[i], rows)
                    our_times.append(elapsed)
                    cpu_times.append(cpu)
            print(f"run {i + 1}: pg_recvlogical {rows / recv_times[-1]:,.0f}/s, "
                  f"ours {rows / our_times[-1]:,.0f}/s", flush=True)
    finally:
        await drop(admin, db)
    recv_rate = rows / statistics.median(recv_times)
    our_rate = rows / statistics.median(our_times)
    print(f"\nchanges: {rows} inserts in {rows // TX_ROWS} transactions, PostgreSQL 15, "
          f"pause {stream_module.PAUSE_S * 1e6:.0f} us, loop {type(asyncio.get_running_loop())}")
    print(f"server-side decoding (peek):       {rows / peek:>10,.0f} changes/s")
    print(f"pg_recvlogical (receive only):     {recv_rate:>10,.0f} changes/s (median of {runs})")
    print(f"ReplicationStream + Decoder:       {our_rate:>10,.0f} changes/s (median of {runs})")
    cpu_us = statistics.median(cpu_times) / rows * 1e6
    print(f"client CPU per change (ours):      {cpu_us:>10.2f} us")
    print(f"ratio ours / pg_recvlogical:       {our_rate / recv_rate:>10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as the service does")
    parser.add_argument("--pause-us", type=float, default=None,
                        help="override the stream's pre-wait pause (experiments)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(main(args.rows, args.runs, args.pause_us))
    else:
        asyncio.run(main(args.rows, args.runs, args.pause_us))
