"""`replicator rollback` against the real services: a simulated bad deploy under a live
workload, rolled back wedding by wedding in the live database, then undone; a concurrent
write to the wedding refuses the rollback; the wedding-day guard; foreign keys (weddings ->
guests, bookings -> payments)."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connectors.registry import open_store
from replicator.archive.layout import AUDIT, ROLLBACKS
from replicator.config import PriorityConfig, WeddingLink
from replicator.crypto import decrypt
from replicator.position import Lsn
from replicator.replay.rollback import Copy, RollbackRefused, RollbackReport, rollback
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import destinations, keyring, sink_environ
from tests.integration.replay_helpers import (
    archive_config,
    pipeline,
    snapshot_done,
    wait_durable,
)

REPLICATOR = str(Path(sys.executable).parent / "replicator")

SCHEMA = """
CREATE TABLE weddings (id bigint PRIMARY KEY, couple text NOT NULL, wedding_date date NOT NULL);
CREATE TABLE guests (id bigint PRIMARY KEY, wedding_id bigint NOT NULL REFERENCES weddings,
                     name text NOT NULL, dietary jsonb);
CREATE TABLE bookings (id bigint PRIMARY KEY, wedding_id bigint NOT NULL REFERENCES weddings,
                       vendor text NOT NULL, role text NOT NULL, price numeric(12,2));
CREATE TABLE payments (id bigint PRIMARY KEY, booking_id bigint NOT NULL REFERENCES bookings,
                       amount numeric(12,2) NOT NULL);
"""
WEDDINGS = 8
SEEDED = WEDDINGS * (1 + 12 + 4 + 4)  # the rows `seed` writes: the capture's snapshot
TOMORROW = 8  # the wedding the guard protects
CALENDAR = PriorityConfig(tables={
    "public.guests": WeddingLink(column="wedding_id"),
    "public.bookings": WeddingLink(column="wedding_id"),
    "public.payments": WeddingLink(column="booking_id", parent="public.bookings")})
CALENDAR_TOML = """[priority]
[priority.tables."public.guests"]
column = "wedding_id"
[priority.tables."public.bookings"]
column = "wedding_id"
[priority.tables."public.payments"]
column = "booking_id"
parent = "public.bookings"
"""
ROWS = {
    "public.weddings": "SELECT t::text FROM weddings t WHERE id = %(w)s",
    "public.guests": "SELECT t::text FROM guests t WHERE wedding_id = %(w)s ORDER BY id",
    "public.bookings": "SELECT t::text FROM bookings t WHERE wedding_id = %(w)s ORDER BY id",
    "public.payments": "SELECT t::text FROM payments t WHERE booking_id IN "
                       "(SELECT id FROM bookings WHERE wedding_id = %(w)s) ORDER BY id",
}


def seed(dsn: str) -> None:
    today = date.today()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        for w in range(1, WEDDINGS + 1):
            days = 1 if w == TOMORROW else 10 * w
            conn.execute("INSERT INTO weddings VALUES (%s, %s, %s)",
                         (w, f"couple {w}", today + timedelta(days=days)))
        conn.execute("INSERT INTO guests SELECT g, 1 + g %% %s, 'guest ' || g, "
                     "jsonb_build_object('g', g) FROM generate_series(1, %s) g",
                     (WEDDINGS, WEDDINGS * 12))
        conn.execute("INSERT INTO bookings SELECT b, 1 + b %% %s, 'vendor ' || (b %% 5), "
                     "(ARRAY['venue','planner','photographer','florist'])[1 + b %% 4], b * 100 "
                     "FROM generate_series(1, %s) b", (WEDDINGS, WEDDINGS * 4))
        conn.execute("INSERT INTO payments SELECT p, p, p * 10 FROM generate_series(1, %s) p",
                     (WEDDINGS * 4,))


def wedding_rows(dsn: str, wedding: int) -> dict[str, list[str]]:
    with psycopg.connect(dsn) as conn:
        return {t: [r[0] for r in conn.execute(q, {"w": wedding})] for t, q in ROWS.items()}


def everyone(dsn: str, but: set[int]) -> dict[int, dict[str, list[str]]]:
    return {w: wedding_rows(dsn, w) for w in range(1, WEDDINGS + 1) if w not in but}


def moment(dsn: str) -> tuple[datetime, Lsn]:
    """The server's clock and WAL position now, with every earlier commit before it."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT clock_timestamp(), pg_current_wal_lsn() - '0/0'").fetchone()
    assert row is not None
    return row[0], Lsn(int(row[1]))


def workload(dsn: str, weddings: list[int], stop: threading.Event) -> int:
    """Writes to *weddings* (guests renamed, added and removed; a booking's price) until
    *stop*."""
    rng, done, next_id = random.Random(7), 0, 10_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            w = rng.choice(weddings)
            with conn.transaction():
                conn.execute("UPDATE guests SET name = name || '.' WHERE id = (SELECT min(id) "
                             "FROM guests WHERE wedding_id = %s)", (w,))
                next_id += 1
                conn.execute("INSERT INTO guests VALUES (%s, %s, 'walk-in', NULL)",
                             (next_id, w))
                conn.execute("UPDATE bookings SET price = price + 1 WHERE id = (SELECT max(id) "
                             "FROM bookings WHERE wedding_id = %s)", (w,))
            done += 1
            stop.wait(0.02)
    return done


def bad_deploy(dsn: str) -> None:
    """Deletes a third of the guests of weddings 1 and 2, rewrites the prices of wedding 3's
    bookings and removes one with its payment, changes the vendors of wedding 4."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for w in (1, 2):
            conn.execute("DELETE FROM guests WHERE id IN (SELECT id FROM guests "
                         "WHERE wedding_id = %s ORDER BY id LIMIT 4)", (w,))
        conn.execute("UPDATE bookings SET price = 0 WHERE wedding_id = 3")
        with conn.transaction():
            gone = conn.execute("SELECT min(id) FROM bookings WHERE wedding_id = 3").fetchone()
            assert gone is not None
            conn.execute("DELETE FROM payments WHERE booking_id = %s", gone)
            conn.execute("DELETE FROM bookings WHERE id = %s", gone)
        conn.execute("UPDATE bookings SET vendor = 'Wrong Florist Ltd' WHERE wedding_id = 4")


async def stored(url: str, prefix: str) -> dict[str, Any]:
    store = open_store(url, sink_environ())
    try:
        keys = [info.key async for info in store.list(prefix)]
        return {k: json.loads(decrypt(await store.get(k), k, keyring())) for k in keys}
    finally:
        await store.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REPLICATOR, *args], env=sink_environ(), capture_output=True,
                          text=True, timeout=300)


async def run_rollback(url: str, dsn: str, wedding: int, at: Any, copies: list[str],
                       **options: Any) -> RollbackReport:
    stores = [open_store(u, sink_environ()) for u in copies]
    main = open_store(url, sink_environ())
    try:
        return await rollback(
            main, keyring(), dsn, wedding=str(wedding), at=at, reason="test: bad deploy",
            copies=[Copy(f"c{n}", s, keyring()) for n, s in enumerate(stores)],
            calendar=CALENDAR, heartbeat_s=0.5, **options)
    finally:
        for s in [main, *stores]:
            await s.close()


def saturday_override() -> dict[str, str]:
    """On a Saturday (UTC, the calendar's zone) every rollback needs the override."""
    return ({"override_reason": "test runs on a Saturday"}
            if datetime.now(UTC).isoweekday() == 6 else {})


async def test_a_bad_deploy_rolled_back_wedding_by_wedding_and_undone(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        s3_target: StoreTarget) -> None:
    seed(pg_dsn)
    dests = destinations(tmp_path, s3_target)
    urls = [d.url for d in dests]
    config = archive_config(pg_dsn, kafka_bootstrap, topic_prefix, dests).model_copy(
        update={"priority": CALENDAR})
    (tmp_path / "replay.toml").write_text(CALENDAR_TOML + "".join(
        f'[[destinations]]\nname = "{d.name}"\nurl = "{d.url}"\n' for d in dests))
    hit = {1, 2, 3, 4}
    async with pipeline(config) as capture:
        await snapshot_done(capture, SEEDED)
        stop = threading.Event()
        writer = asyncio.create_task(asyncio.to_thread(workload, pg_dsn, [5, 6, 7], stop))
        await asyncio.sleep(1.5)
        before_at, _ = moment(pg_dsn)
        good = {w: wedding_rows(pg_dsn, w) for w in hit}
        await asyncio.to_thread(bad_deploy, pg_dsn)
        await asyncio.sleep(1.0)  # the workload goes on during the incident
        stop.set()
        assert await writer > 10
        _, after_lsn = moment(pg_dsn)
        await wait_durable(dests, after_lsn)
        damaged = {w: wedding_rows(pg_dsn, w) for w in hit}
        assert all(damaged[w] != good[w] for w in hit)
        others = everyone(pg_dsn, hit)

        # A dry run: the diff, and nothing written.
        dry = await run_rollback(urls[0], pg_dsn, 3, before_at, urls, dry_run=True)
        assert dry.counts["public.bookings"] == {"deletes": 0, "updates": 3, "inserts": 1}
        assert dry.counts["public.payments"] == {"deletes": 0, "updates": 0, "inserts": 1}
        assert dry.counts["public.guests"] == {"deletes": 0, "updates": 0, "inserts": 0}
        assert len(dry.keys["public.bookings"]["inserts"]) == 1
        assert wedding_rows(pg_dsn, 3) == damaged[3]
        assert await stored(urls[0], ROLLBACKS) == {}

        # The rollbacks: 1 and 2 through the command (from the local folder), 3 and 4 from S3.
        reports: dict[int, dict[str, Any]] = {}
        for w in (1, 2):
            override = saturday_override()
            done = await asyncio.to_thread(
                cli, "rollback", "--from", urls[0], "--wedding", str(w), "--at",
                before_at.isoformat(), "--to", pg_dsn, "--reason", "test: bad deploy",
                "--config", str(tmp_path / "replay.toml"), "--json",
                *(["--override-reason", override["override_reason"]] if override else []))
            assert done.returncode == 0, done.stderr
            reports[w] = json.loads(done.stdout)
            assert reports[w]["rows"]["public.guests"] == {"deletes": 0, "updates": 0,
                                                           "inserts": 4}
        for w in (3, 4):
            report = await run_rollback(urls[1], pg_dsn, w, before_at, urls,
                                        **saturday_override())
            assert report.committed
            reports[w] = report.to_dict(with_keys=False)
        assert reports[4]["rows"]["public.bookings"]["updates"] == 4
        for w in hit:
            assert wedding_rows(pg_dsn, w) == good[w], w
        assert everyone(pg_dsn, hit) == others  # nobody else's rows changed

        # The audit records and the emergency snapshots exist, in the database and in stores.
        with psycopg.connect(pg_dsn) as conn:
            audits = {r[0]: r for r in conn.execute(
                "SELECT wedding, action, reason, by_user, details FROM replicator_audit")}
        assert set(audits) == {str(w) for w in hit}
        assert audits["1"][1] == "rollback" and audits["1"][2] == "test: bad deploy"
        assert audits["1"][4]["rows"]["public.guests"]["inserts"] == 4
        for url in urls:
            snapshots = await stored(url, ROLLBACKS)
            assert len(snapshots) == 4, url
            mine = next(s for s in snapshots.values() if s["wedding"] == "1")
            assert len(mine["tables"]["public.guests"]) == len(damaged[1]["public.guests"])
            assert len(await stored(url, AUDIT)) == 4
        assert reports[3]["snapshot_position"] is not None

        # Undo: the rollback of wedding 4, rolled back to the moment before it.
        _, now = moment(pg_dsn)
        await wait_durable(dests, now)
        undo = await run_rollback(urls[0], pg_dsn, 4, Lsn.parse(reports[4]["snapshot_position"]),
                                  urls, **saturday_override())
        assert undo.counts["public.bookings"]["updates"] == 4
        assert wedding_rows(pg_dsn, 4) == damaged[4]
        assert everyone(pg_dsn, {4}) == {**others, **{w: good[w] for w in (1, 2, 3)}}

        # A write to the wedding in flight: the rollback refuses and changes nothing.
        with psycopg.connect(pg_dsn) as racer:
            racer.execute("UPDATE guests SET name = 'racing' WHERE id = (SELECT max(id) "
                          "FROM guests WHERE wedding_id = 4)")
            with pytest.raises(RollbackRefused, match="being written to right now"):
                await run_rollback(urls[0], pg_dsn, 4, before_at, urls, **saturday_override())
            racer.rollback()
        assert wedding_rows(pg_dsn, 4) == damaged[4]
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM replicator_audit").fetchone() == (5,)
            assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE "
                                "'replicator_restore_%'").fetchone() == (0,)

        # The guard: a wedding tomorrow needs the override, and other weddings' writes
        # carry on meanwhile.
        done = await asyncio.to_thread(
            cli, "rollback", "--from", urls[0], "--wedding", str(TOMORROW), "--at",
            before_at.isoformat(), "--to", pg_dsn, "--reason", "test",
            "--config", str(tmp_path / "replay.toml"))
        assert done.returncode == 2, done.stderr
        assert f"wedding {TOMORROW} is tomorrow" in done.stderr and "--override-reason" in \
            done.stderr
        assert "Traceback" not in done.stderr


async def test_a_rollback_leaves_other_weddings_free(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    """A transaction writing another wedding's rows, open all along, does not stop the
    rollback (it locks only its wedding's rows), and keeps its own write."""
    seed(pg_dsn)
    dests = destinations(tmp_path)
    config = archive_config(pg_dsn, kafka_bootstrap, topic_prefix, dests).model_copy(
        update={"priority": CALENDAR})
    async with pipeline(config) as capture:
        await snapshot_done(capture, SEEDED)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE weddings SET couple = 'renamed' WHERE id = 5")
        at, _ = moment(pg_dsn)
        good = wedding_rows(pg_dsn, 1)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM payments WHERE booking_id IN "
                         "(SELECT id FROM bookings WHERE wedding_id = 1)")
            conn.execute("DELETE FROM bookings WHERE wedding_id = 1")
            conn.execute("UPDATE guests SET name = 'oops' WHERE wedding_id = 1")
        _, lsn = moment(pg_dsn)
        await wait_durable(dests, lsn)
    with psycopg.connect(pg_dsn) as other:
        other.execute("UPDATE guests SET name = 'busy' WHERE wedding_id = 2")
        other.execute("UPDATE bookings SET price = 1 WHERE wedding_id = 2")
        report = await run_rollback(dests[0].url, pg_dsn, 1, at, [dests[0].url],
                                    **saturday_override())
        other.commit()
    assert report.counts["public.bookings"]["inserts"] == 4
    assert report.counts["public.payments"]["inserts"] == 4
    assert report.counts["public.guests"]["updates"] == 12
    assert wedding_rows(pg_dsn, 1) == good
    rows = wedding_rows(pg_dsn, 2)
    assert all("busy" in r for r in rows["public.guests"])
