"""Shared pieces of the replay tests: a randomized workload that records the exact state of
every table at chosen commit points, an archive built by the real pipeline, restore
databases."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from connectors.registry import open_store
from replicator.capture import Capture
from replicator.config import Config, DestinationConfig
from replicator.position import Lsn
from replicator.replay.plan import At
from replicator.replay.run import ReplaySummary, replay
from replicator.replay.targets import Target
from replicator.sink.service import Sinks
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import (
    destination_checkpoint,
    destinations,
    keyring,
    sink_environ,
    with_destinations,
)
from tests.integration.capture_helpers import holds, make_config, wait_for

TABLES = ("public.guests", "public.vendors", "public.weddings")

SCHEMA = """
CREATE TABLE weddings (id bigint PRIMARY KEY, couple text NOT NULL, wedding_date date);
CREATE TABLE guests (id bigint PRIMARY KEY, wedding_id bigint NOT NULL, name text,
                     dietary jsonb, notes text, seen_at timestamptz);
CREATE TABLE vendors (id bigint PRIMARY KEY, name text, fee numeric(12,2), tags text[]);
"""

# Random hex compresses to about half: 200 md5s are ~3 kB compressed, over the 2 kB TOAST
# threshold, so the value is stored out of line and updates that leave it alone do not send it.
BIG = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 200))"


@dataclass(frozen=True)
class Point:
    """The exact content of every table just after a commit: rows as `t::text`, by key."""

    lsn: Lsn  # at or past the last commit's end, before the next commit
    at: datetime  # the server's clock just after that commit
    state: dict[str, list[str]]
    columns: dict[str, int]


def table_state(conn: psycopg.Connection, table: str, wedding: int | None = None
                ) -> list[str]:
    name = sql.Identifier(*table.split("."))
    if wedding is None:
        query = sql.SQL("SELECT t::text FROM {} t ORDER BY id").format(name)
        return [r[0] for r in conn.execute(query).fetchall()]
    column = "id" if table == "public.weddings" else "wedding_id"
    query = sql.SQL("SELECT t::text FROM {} t WHERE {} = %s ORDER BY id").format(
        name, sql.Identifier(column))
    return [r[0] for r in conn.execute(query, (wedding,)).fetchall()]


def record_point(conn: psycopg.Connection, tables: Sequence[str] = TABLES) -> Point:
    row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0', clock_timestamp()"
                       ).fetchone()
    assert row is not None
    state = {t: table_state(conn, t) for t in tables}
    columns = {}
    for t in tables:
        cols = conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass "
                            "AND attnum > 0 AND NOT attisdropped", (t,)).fetchone()
        assert cols is not None
        columns[t] = int(cols[0])
    return Point(Lsn(int(row[0])), row[1], state, columns)


def seed(dsn: str, today: date | None = None) -> None:
    today = today or date.today()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        for i, days in enumerate([3, 20, 60, 200, 5, 400], start=1):
            conn.execute("INSERT INTO weddings VALUES (%s, %s, %s)",
                         (i, f"couple {i}", today + timedelta(days=days)))
        conn.execute(f"INSERT INTO guests SELECT g, 1 + g % 6, 'guest ' || g, "
                     f"jsonb_build_object('g', g), CASE WHEN g % 4 = 0 THEN {BIG} END, "
                     f"'2026-06-01 12:00:00+00'::timestamptz + g * interval '1 hour' "
                     f"FROM generate_series(1, 120) g")
        conn.execute("INSERT INTO vendors SELECT v, 'vendor ' || v, v * 10.25, "
                     "ARRAY['a,b', 'c\"d', NULL] FROM generate_series(1, 20) v")


def random_workload(dsn: str, *, rng: random.Random, transactions: int,
                    points_at: Sequence[int], add_column_at: int, pause: float = 0.0,
                    first_id: int = 1000) -> list[Point]:
    """Inserts, updates (many leaving the TOASTed notes alone), deletes, a key change, an
    added column; records the state after the transactions numbered in *points_at*."""
    points = []
    next_id = first_id
    with psycopg.connect(dsn, autocommit=True) as conn:
        for n in range(transactions):
            if n == add_column_at:
                conn.execute("ALTER TABLE guests ADD COLUMN seat int")
            with conn.transaction():
                for _ in range(rng.randint(1, 4)):
                    ids = [r[0] for r in conn.execute("SELECT id FROM guests").fetchall()]
                    action = rng.random()
                    if action < 0.35 or not ids:
                        conn.execute(
                            f"INSERT INTO guests (id, wedding_id, name, dietary, notes) VALUES "
                            f"(%s, %s, %s, %s, CASE WHEN %s THEN {BIG} END)",
                            (next_id, rng.randint(1, 6), f"new {next_id}",
                             '{"vegan": true}' if rng.random() < 0.5 else None,
                             rng.random() < 0.3))
                        next_id += 1
                    elif action < 0.75:
                        column = rng.choice(["name", "dietary", "seen_at"]
                                            + (["seat"] if n > add_column_at else []))
                        value = {"name": f"renamed {n}", "dietary": '{"halal": true}',
                                 "seen_at": datetime(2026, 7, 1, 10, n % 60).astimezone(),
                                 "seat": n}[column]
                        conn.execute(sql.SQL("UPDATE guests SET {} = %s WHERE id = %s").format(
                            sql.Identifier(column)), (value, rng.choice(ids)))
                    elif action < 0.8:
                        conn.execute(f"UPDATE guests SET notes = {BIG} WHERE id = %s",
                                     (rng.choice(ids),))
                    elif action < 0.95:
                        conn.execute("DELETE FROM guests WHERE id = %s", (rng.choice(ids),))
                    else:
                        conn.execute("UPDATE guests SET id = %s WHERE id = %s",
                                     (next_id, rng.choice(ids)))
                        next_id += 1
                    if rng.random() < 0.2:
                        conn.execute("UPDATE vendors SET fee = fee + 1.5 WHERE id = %s",
                                     (rng.randint(1, 20),))
            if n in points_at:
                points.append(record_point(conn))
            if pause:
                time.sleep(pause)  # spreads the changes over several segments
        # One more commit, after the last point: a checkpoint passes a point only once a later
        # transaction is complete.
        conn.execute("UPDATE weddings SET couple = couple || '.' WHERE id = 6")
    return points


@contextlib.asynccontextmanager
async def pipeline(config: Config, environ: dict[str, str] | None = None, *,
                   accept_gap: bool = False) -> AsyncIterator[Capture]:
    capture = Capture(config, accept_gap=accept_gap)
    sinks = Sinks(config, environ or sink_environ())
    await sinks.open()
    tasks = [asyncio.create_task(capture.run()), asyncio.create_task(sinks.run())]
    test = asyncio.current_task()

    def died(task: asyncio.Task[None]) -> None:
        # A stage that fails stops the test at once (its error is raised below), rather
        # than leaving it waiting for progress that cannot come.
        if not task.cancelled() and task.exception() is not None and test is not None:
            test.cancel()

    for task in tasks:
        task.add_done_callback(died)
    try:
        yield capture
    finally:
        capture.stop()
        sinks.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


async def wait_durable(dests: Sequence[DestinationConfig], lsn: int,
                       environ: dict[str, str] | None = None) -> None:
    async def durable() -> bool:
        for d in dests:
            if await destination_checkpoint(d.url, d.name, environ) <= lsn:
                return False
        return True
    await wait_for(durable, within=90, what="every destination's checkpoint")


def archive_config(pg_dsn: str, kafka: str, prefix: str,
                   dests: tuple[DestinationConfig, ...]) -> Config:
    return with_destinations(make_config(pg_dsn, kafka, prefix), dests)


async def snapshot_done(capture: Capture, rows: int, within: float = 30) -> None:
    """The capture sent *rows* snapshot rows and its snapshot transaction has ended.

    The second half matters: that transaction holds ACCESS SHARE locks on every table it
    read until it commits, after Kafka acknowledged the rows, so a test that runs DDL with a
    blocking connection on this event loop right after the count is reached would wait for
    a commit that cannot come while the loop is blocked."""
    await wait_for(lambda: holds(capture.stats.snapshot_rows >= rows), within=within,
                   what="the snapshot")

    async def closed() -> bool:
        async with await psycopg.AsyncConnection.connect(capture.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                " AND xact_start IS NOT NULL AND state LIKE 'idle in transaction%'")
            row = await cur.fetchone()
        return row is not None and row[0] == 0
    await wait_for(closed, within=within, what="the snapshot transaction's end")


SEED_ROWS = 146  # what `seed` writes: the capture's first snapshot


def seeded_archive(pg_dsn: str, kafka: str, prefix: str, tmp_path: Path,
                   *targets: StoreTarget) -> tuple[Config, tuple[DestinationConfig, ...]]:
    """The sample database seeded, and the config of a pipeline archiving it into the local
    folder and *targets*."""
    seed(pg_dsn)
    dests = destinations(tmp_path, *targets)
    return archive_config(pg_dsn, kafka, prefix, dests), dests


@contextlib.asynccontextmanager
async def snapshotted(config: Config) -> AsyncIterator[Capture]:
    """`pipeline`, once the capture has sent the seeded database's snapshot."""
    async with pipeline(config) as capture:
        await snapshot_done(capture, SEED_ROWS)
        yield capture


@contextlib.contextmanager
def restore_db(server_dsn: str) -> Iterator[str]:
    name = "r_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server_dsn, dbname=name)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


async def run_replay(url: str, target: Target, at: At, **options: object) -> ReplaySummary:
    store = open_store(url, sink_environ())
    try:
        return await replay(store, keyring(), target, at=at, **options)  # type: ignore[arg-type]
    finally:
        await store.close()


def restored_state(dsn: str, tables: Sequence[str] = TABLES, wedding: int | None = None
                   ) -> dict[str, list[str]]:
    with psycopg.connect(dsn) as conn:
        return {t: table_state(conn, t, wedding) for t in tables}


def local_archive(tmp_path: Path) -> Path:
    return tmp_path / "archive"


async def build_archive(pg_dsn: str, kafka: str, prefix: str, tmp_path: Path,
                        *targets: StoreTarget, transactions: int = 60,
                        points_at: tuple[int, ...] = (9, 30, 59), pause: float = 0.0
                        ) -> tuple[list[Point], tuple[DestinationConfig, ...]]:
    config, dests = seeded_archive(pg_dsn, kafka, prefix, tmp_path, *targets)
    async with snapshotted(config):
        points = await asyncio.to_thread(
            random_workload, pg_dsn, rng=random.Random(transactions), transactions=transactions,
            points_at=points_at, add_column_at=transactions // 2, pause=pause)
        await wait_durable(dests, points[-1].lsn)
    return points, dests


def of_wedding(state: dict[str, list[str]], wedding: int) -> dict[str, list[str]]:
    """The rows of one wedding: its row in weddings, its guests; vendors have no wedding."""
    def field(row: str, n: int) -> str:
        return row.strip("()").split(",")[n]
    return {"public.guests": [r for r in state["public.guests"] if field(r, 1) == str(wedding)],
            "public.vendors": [],
            "public.weddings": [r for r in state["public.weddings"]
                                if field(r, 0) == str(wedding)]}
