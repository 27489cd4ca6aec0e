"""`replicator impact` against the real pipeline: a simulated bad deploy on the sample schema
(weddings, guests, bookings with their vendor, payments) while capture and the sinks run,
changes before and after it, then the report over the deploy's window, by the command and by
the function."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from connectors.registry import open_store
from replicator.cli.demo import GUESTS_PER_WEDDING, ROLES, SAMPLE_DAYS, SAMPLE_SCHEMA
from replicator.config import Config, DestinationConfig, PriorityConfig, VendorLink, WeddingLink
from replicator.position import Lsn
from replicator.replay.impact import ImpactReport, impact
from tests.integration.archive_helpers import destinations, keyring, sink_environ
from tests.integration.capture_helpers import make_config
from tests.integration.replay_helpers import pipeline, snapshot_done, wait_durable

REPLICATOR = str(Path(sys.executable).parent / "replicator")
WEDDINGS = len(SAMPLE_DAYS)
SNAPSHOT_ROWS = WEDDINGS * (1 + GUESTS_PER_WEDDING + 2 * len(ROLES))
VENDORS = VendorLink(table="public.bookings", column="vendor", wedding_column="wedding_id")
CONFIG_TOML = """
[priority]
weddings_table = "public.weddings"
wedding_id_column = "id"
wedding_date_column = "wedding_date"

[impact]
vendors = { table = "public.bookings", column = "vendor", wedding_column = "wedding_id" }
"""


def seed_sample(dsn: str, today: date) -> None:
    """The sample database of `replicator demo`: twelve weddings, three per tier, each with
    ten guests and four bookings (venue, planner, photographer, florist), a deposit each."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SAMPLE_SCHEMA)
        with conn.transaction():
            for wid, days in enumerate(SAMPLE_DAYS, start=1):
                conn.execute("INSERT INTO weddings VALUES (%s, %s, %s, 'uk')",
                             (wid, f"Couple {wid}", today + timedelta(days=days)))
                for g in range(GUESTS_PER_WEDDING):
                    conn.execute("INSERT INTO guests VALUES (%s, %s, %s, %s, NULL)",
                                 (wid * 1000 + g, wid, f"Guest {g}", '{"vegan": false}'))
                for b, role in enumerate(ROLES):
                    conn.execute("INSERT INTO bookings VALUES (%s, %s, %s, %s, 1000)",
                                 (wid * 100 + b, wid, f"{role.title()} Ltd", role))
                    conn.execute("INSERT INTO payments (id, booking_id, amount) "
                                 "VALUES (%s, %s, 100)", (wid * 100 + b, wid * 100 + b))


def sample_config(pg_dsn: str, kafka: str, prefix: str,
                  dests: tuple[DestinationConfig, ...]) -> Config:
    priority = PriorityConfig(tables={
        "public.guests": WeddingLink(column="wedding_id"),
        "public.bookings": WeddingLink(column="wedding_id"),
        "public.payments": WeddingLink(column="booking_id", parent="public.bookings",
                                       parent_key="id", parent_wedding_column="wedding_id")})
    config = make_config(pg_dsn, kafka, prefix)
    return config.model_copy(update={"priority": priority, "destinations": dests})


def server_now(conn: psycopg.Connection) -> datetime:
    """The server's clock (commit times are the server's), between two quiet moments."""
    time.sleep(0.3)
    row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    time.sleep(0.3)
    moment: datetime = row[0]
    return moment


def deleted(conn: psycopg.Connection, query: str) -> int:
    """The rows *query* (no parameters: its `%` is SQL's) changed."""
    return conn.execute(query).rowcount


def incident(dsn: str) -> tuple[datetime, datetime, dict[int | str, int], Lsn]:
    """Changes before, a bad deploy in a window, changes after; the window and what the deploy
    did."""
    did: dict[int | str, int] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Before the window: other weddings, and the same tables.
        conn.execute("UPDATE guests SET notes = 'early' WHERE wedding_id = 6")
        conn.execute("DELETE FROM guests WHERE id = 2009")  # wedding 2, before the window
        conn.execute("UPDATE bookings SET price = 900 WHERE wedding_id = 7")
        since = server_now(conn)
        # The deploy: a third of the guests of weddings 2 and 3 deleted ...
        with conn.transaction():
            did[2] = deleted(conn, "DELETE FROM guests WHERE wedding_id = 2 AND id % 3 = 0")
        with conn.transaction():
            did[3] = deleted(conn, "DELETE FROM guests WHERE wedding_id = 3 AND id % 3 = 0")
        # ... a column of wedding 4's bookings rewritten ...
        with conn.transaction():
            did[4] = deleted(conn, "UPDATE bookings SET price = price * 10 "
                             "WHERE wedding_id = 4")
        # ... wedding 5's florist replaced, and a payment of wedding 8 dropped (a delete under
        # the default replica identity: its record carries the key only, no wedding).
        with conn.transaction():
            did[5] = deleted(conn, "UPDATE bookings SET vendor = 'Rogue Flowers Ltd' "
                             "WHERE wedding_id = 5 AND role = 'florist'")
            did["payments"] = deleted(conn, "DELETE FROM payments WHERE id = 801")
        until = server_now(conn)
        # After the window: more of the same.
        conn.execute("DELETE FROM guests WHERE wedding_id = 2 AND id % 3 = 1")
        conn.execute("UPDATE bookings SET vendor = 'Late Ltd' WHERE wedding_id = 9")
        conn.execute("INSERT INTO payments (id, booking_id, amount) VALUES (5000, 300, 5)")
        row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
        assert row is not None
    return since, until, did, Lsn(int(row[0]))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REPLICATOR, "impact", *args], env=sink_environ(),
                          capture_output=True, text=True, timeout=300)


async def run_impact(url: str, **options: Any) -> ImpactReport:
    store = open_store(url, sink_environ())
    try:
        return await impact(store, keyring(), **options)
    finally:
        await store.close()


def vendors_of(wid: int, florist: str = "Florist Ltd") -> list[str]:
    return sorted([*(f"{r.title()} Ltd" for r in ROLES if r != "florist"), florist])


async def test_impact_lists_the_weddings_a_bad_deploy_touched(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    today = date.today()
    seed_sample(pg_dsn, today)
    dests = destinations(tmp_path)
    config = sample_config(pg_dsn, kafka_bootstrap, topic_prefix, dests)
    async with pipeline(config) as capture:
        await snapshot_done(capture, SNAPSHOT_ROWS)
        since, until, did, end = await asyncio.to_thread(incident, pg_dsn)
        await wait_durable(dests, end)
    assert did == {2: 3, 3: 4, 4: 4, 5: 1, "payments": 1}
    url = dests[0].url

    # The function.
    report = await run_impact(url, since=since, until=until, calendar=config.priority,
                              vendors=VENDORS, today=date.today)
    doc = report.to_dict()
    assert [w["wedding_id"] for w in doc["weddings"]] == ["2", "3", "4", "5"]  # by date
    by_id = {w["wedding_id"]: w for w in doc["weddings"]}
    none = {"inserts": 0, "updates": 0, "deletes": 0}
    assert by_id["2"]["tables"] == {"public.guests": {**none, "deletes": 3}}
    assert by_id["3"]["tables"] == {"public.guests": {**none, "deletes": 4}}
    assert by_id["4"]["tables"] == {"public.bookings": {**none, "updates": 4}}
    assert by_id["5"]["tables"] == {"public.bookings": {**none, "updates": 1}}
    for wid, tier in ((2, "critical"), (3, "critical"), (4, "high"), (5, "high")):
        entry = by_id[str(wid)]
        assert entry["wedding_date"] == (today + timedelta(days=SAMPLE_DAYS[wid - 1])
                                         ).isoformat()
        assert entry["tier"] == tier
        assert since <= datetime.fromisoformat(entry["first_change"]) <= datetime.fromisoformat(
            entry["last_change"]) <= until
        assert entry["vendors"] == (vendors_of(wid, "Rogue Flowers Ltd") if wid == 5
                                    else vendors_of(wid))
    # The payment's delete names no wedding: apart, as unresolved.
    assert doc["unresolved"] == {"public.payments": {**none, "deletes": 1}}
    assert doc["warnings"] == []
    assert report.objects_read > 0 and report.bytes_read > 0

    # The command, with --config's calendar and vendor link.
    config_file = tmp_path / "impact.toml"
    config_file.write_text(CONFIG_TOML)
    window = ["--from", url, "--since", since.isoformat(), "--until", until.isoformat(),
              "--config", str(config_file)]
    done = await asyncio.to_thread(cli, *window, "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert {"since", "until", "weddings", "unresolved", "objects_read", "bytes_read",
            "seconds"} <= set(shown)
    assert all(set(w) == {"wedding_id", "wedding_date", "tier", "tables", "vendors",
                          "first_change", "last_change"} for w in shown["weddings"])
    assert shown["weddings"] == doc["weddings"] and shown["unresolved"] == doc["unresolved"]

    done = await asyncio.to_thread(cli, *window, "--csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["wedding_id"], r["table"], r["deletes"], r["updates"]) for r in rows] == [
        ("2", "public.guests", "3", "0"), ("3", "public.guests", "4", "0"),
        ("4", "public.bookings", "0", "4"), ("5", "public.bookings", "0", "1"),
        ("", "public.payments", "1", "0")]
    assert rows[3]["vendors"] == ";".join(vendors_of(5, "Rogue Flowers Ltd"))

    done = await asyncio.to_thread(cli, *window)
    assert done.returncode == 0, done.stderr
    assert "Rogue Flowers Ltd" in done.stdout and "unresolved" in done.stdout
    assert "4 wedding(s); read " in done.stdout

    # One wedding: only the segments whose header may hold it are read.
    done = await asyncio.to_thread(cli, *window, "--wedding", "5", "--json")
    assert done.returncode == 0, done.stderr
    one = json.loads(done.stdout)
    assert [w["wedding_id"] for w in one["weddings"]] == ["5"]
    assert one["weddings"][0] == by_id["5"]
    assert one["segments_skipped"] > 0
    assert one["objects_read"] < shown["objects_read"]

    # Refused: exit 2 and one line.
    done = await asyncio.to_thread(cli, *window, "--wedding", "999")
    assert done.returncode == 2 and "wedding 999 matches nothing" in done.stderr
    done = await asyncio.to_thread(cli, *window, "--tables", "public.nothing")
    assert done.returncode == 2 and "holds no table public.nothing" in done.stderr
    later = (datetime.now().astimezone() + timedelta(days=1)).isoformat()
    done = await asyncio.to_thread(cli, "--from", url, "--since", later)
    assert done.returncode == 2 and "after the newest archived commit" in done.stderr
    assert "Traceback" not in done.stderr
    done = await asyncio.to_thread(cli, *window[:4], "--until",
                                   (since - timedelta(seconds=1)).isoformat())
    assert done.returncode == 2 and "is after --until" in done.stderr

    # A quiet window: nothing, exit 0.
    quiet_since = since - timedelta(microseconds=200_000)
    done = await asyncio.to_thread(cli, "--from", url, "--since", quiet_since.isoformat(),
                                   "--until", (since - timedelta(microseconds=100_000)
                                               ).isoformat(), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["weddings"] == []
