"""Snapshots end to end: real PostgreSQL (15 and 18) -> the capture -> real Kafka.

- a capture that dies in the middle of its initial snapshot resumes with only the tables
  whose snapshot was not finished;
- an on-demand snapshot of one wedding, taken while a capture streams a live workload, holds
  exactly that wedding's rows as of its LSN, on its tier's topic, and the capture keeps
  confirming meanwhile;
- `replicator snapshot` (a separate process) for one table, with its JSON output and exit codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from replicator.capture import Capture
from replicator.config import Config, PriorityConfig, WeddingLink
from replicator.position import Lsn
from replicator.source.catalog import TableInfo
from replicator.source.snapshot import wedding_filter
from replicator.transport.control import CaptureState
from tests.integration.capture_helpers import (
    Record,
    holds,
    make_config,
    read_all,
    setup_schema,
    slot_confirmed,
    wait_for,
)
from tests.integration.test_capture import running


class SimulatedCrash(Exception):
    """The capture process dies here."""



async def current_lsn(dsn: str) -> Lsn:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        row = await (await conn.execute("SELECT pg_current_wal_lsn()::text")).fetchone()
    assert row is not None
    return Lsn.parse(row[0])


async def wait_confirmed(dsn: str, slot: str, target: Lsn) -> None:
    async def confirmed() -> bool:
        lsn = await slot_confirmed(dsn, slot)
        return lsn is not None and lsn >= target
    await wait_for(confirmed, what=f"slot {slot} confirmed past {target}")


async def state_entries(config: Config) -> dict[str, dict[str, Any]]:
    state = CaptureState(config.kafka.bootstrap_servers, config.kafka.topic_prefix)
    try:
        await state.load()
    finally:
        await state.close()
    return state.entries


def reads(records: list[Record]) -> list[Record]:
    return [r for r in records
            if not r.topic.endswith(".transactions") and r.value["op"] == "r"]


def snapshot_slots(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT slot_name FROM pg_replication_slots "
                            "WHERE slot_name LIKE '%\\_snap\\_%'").fetchall()
    return [r[0] for r in rows]


# --- the wedding filter (no services) ----------------------------------------------------------


def test_wedding_filter_per_kind_of_link() -> None:
    priority = PriorityConfig(tables={
        "public.guests": WeddingLink(column="wedding_id"),
        "public.seats": WeddingLink(column="table_id", parent="public.tables"),
        "Sales.Pay": WeddingLink(column="booking id", parent="Sales.Book", parent_key="ID",
                                 parent_wedding_column="Wedding"),
    })

    def text(table: str, wid: str) -> str | None:
        condition = wedding_filter(priority, table, wid)
        return None if condition is None else condition.as_string()

    assert text("public.weddings", "7") == "\"id\" = '7'"
    assert text("public.guests", "7") == "\"wedding_id\" = '7'"
    assert text("public.seats", "7") == \
        "\"table_id\" IN (SELECT \"id\" FROM \"public\".\"tables\" WHERE \"wedding_id\" = '7')"
    assert text("Sales.Pay", "x'; DROP TABLE weddings; --") == (
        "\"booking id\" IN (SELECT \"ID\" FROM \"Sales\".\"Book\" WHERE \"Wedding\" = "
        "'x''; DROP TABLE weddings; --')")
    assert text("public.vendors", "7") is None


# --- a crash in the middle of the initial snapshot --------------------------------------------


async def test_crash_mid_snapshot_resumes_only_the_unfinished_tables(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO guests (id, wedding_id, name) VALUES (10, 1, 'Gran'), "
                     "(11, 1, 'Aunt'), (12, 2, 'Uncle')")
        conn.execute("INSERT INTO vendors VALUES (1, 'Florist', 100)")
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)

    # First run: weddings is snapshotted and recorded; guests' rows reach Kafka, then the
    # process dies before the guests snapshot is recorded; vendors is never started.
    first = Capture(config)
    finished: list[str] = []
    original = first._snapshot_one

    async def dies_in_second_table(conn: Any, info: TableInfo, lsn: Lsn, **kw: Any) -> Any:
        tiers = await original(conn, info, lsn, **kw)
        if finished:
            raise SimulatedCrash(f"killed during the snapshot of {info.qualified}")
        finished.append(info.qualified)
        return tiers

    first._snapshot_one = dies_in_second_table  # type: ignore[method-assign]
    with pytest.raises(SimulatedCrash, match=r"public\.guests"):
        await asyncio.wait_for(first.run(), 60)
    assert finished == ["public.weddings"]
    entries = await state_entries(config)
    created = Lsn(entries["slot"]["created_lsn"])
    assert {k for k in entries if k.startswith("snapshot/")} == {"snapshot/public.weddings"}

    # While it is down, the database goes on.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO guests (id, wedding_id, name) VALUES (13, 1, 'Cousin')")
        conn.execute("INSERT INTO vendors VALUES (2, 'Band', 200)")
        conn.execute("UPDATE weddings SET couple = 'Ada & Bea' WHERE id = 1")

    second = Capture(config)
    async with running(second):
        await wait_for(lambda: holds(second.stats.snapshot_rows >= 6), what="resumed snapshot")
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO guests (id, wedding_id, name) VALUES (14, 2, 'Niece')")
        await wait_confirmed(pg_dsn, config.source.slot, await current_lsn(pg_dsn))
    assert snapshot_slots(pg_dsn) == []  # the temporary slot went with its connection

    entries = await state_entries(config)
    assert Lsn(entries["slot"]["created_lsn"]) == created  # same slot, not a new one
    resumed = Lsn(entries["snapshot/public.guests"]["lsn"])
    assert Lsn(entries["snapshot/public.weddings"]["lsn"]) == created
    assert Lsn(entries["snapshot/public.vendors"]["lsn"]) == resumed
    assert resumed > created
    assert entries["snapshot/public.guests"]["rows"] == 4

    records = await read_all(kafka_bootstrap, topic_prefix)
    by_table: dict[tuple[str, int], list[int]] = {}
    for r in reads(records):
        by_table.setdefault((r.value["source"]["table"], r.value["source"]["lsn"]), []).append(
            r.value["key"]["id"])
    assert {k: sorted(v) for k, v in by_table.items()} == {
        # the finished table: once, at the capture slot's consistent point
        ("weddings", int(created)): [1, 2, 3],
        # the table in progress when the process died: its partial first attempt, then again
        ("guests", int(created)): [10, 11, 12],
        ("guests", int(resumed)): [10, 11, 12, 13],
        ("vendors", int(resumed)): [1, 2],
    }
    # Nothing streamed is lost: the changes made while down and after the restart.
    streamed = {(r.value["op"], r.value["source"]["table"], r.value["key"]["id"])
                for r in records
                if not r.topic.endswith(".transactions") and r.value["op"] != "r"}
    assert {("c", "guests", 13), ("c", "vendors", 2), ("u", "weddings", 1),
            ("c", "guests", 14)} <= streamed


# --- an on-demand snapshot of one wedding during streaming -------------------------------------

EXTRA_SCHEMA = """
CREATE TABLE tables (id bigint PRIMARY KEY, wedding_id bigint, label text);
CREATE TABLE seats (id bigint PRIMARY KEY, table_id bigint, guest text);
INSERT INTO tables VALUES (1, 2, 'top table'), (2, 1, 'family'), (3, 2, 'friends');
INSERT INTO seats VALUES (1, 1, 'Cy'), (2, 2, 'Gran'), (3, 1, 'Di'), (4, 3, 'Pal');
INSERT INTO guests (id, wedding_id, name) VALUES (10, 1, 'Gran'), (11, 2, 'Uncle'),
                                                 (12, 2, 'Aunt'), (13, 3, 'Friend');
"""


def wedding_config(dsn: str, bootstrap: str, prefix: str) -> Config:
    config = make_config(dsn, bootstrap, prefix)
    return config.model_copy(update={"priority": PriorityConfig(tables={
        "public.guests": WeddingLink(column="wedding_id"),
        "public.tables": WeddingLink(column="wedding_id"),
        "public.seats": WeddingLink(column="table_id", parent="public.tables"),
    })})


async def workload(dsn: str, stop: asyncio.Event) -> int:
    """Inserts, updates and deletes across weddings 1-3 and the unlinked vendors table."""
    rnd = random.Random(5)
    n = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            n += 1
            async with conn.transaction():
                gid = 100 + n
                await conn.execute("INSERT INTO guests (id, wedding_id, name, notes) VALUES "
                                   "(%s, %s, %s, %s)", (gid, rnd.choice([1, 2, 3]), f"g{gid}",
                                                        str(n)))
                await conn.execute("UPDATE guests SET notes = %s WHERE id = %s",
                                   (str(n), rnd.choice([10, 11, 12, 13, 100 + rnd.randint(1, n)])))
                if rnd.random() < 0.3:
                    await conn.execute("DELETE FROM guests WHERE id = %s",
                                       (100 + rnd.randint(1, n),))
                if rnd.random() < 0.3:
                    await conn.execute("INSERT INTO seats VALUES (%s, %s, %s)",
                                       (100 + n, rnd.choice([1, 2, 3]), f"s{n}"))
                await conn.execute("INSERT INTO vendors VALUES (%s, 'v', 1)", (n,))
            await asyncio.sleep(0.01)
    return n


def rows_of_wedding_at(records: list[Record], lsn: int, wedding: int,
                       initial: int) -> dict[tuple[str, int], dict[str, Any]]:
    """The state of wedding *wedding*'s rows just before *lsn*, rebuilt from the initial
    snapshot (at *initial*) and the streamed changes committed before *lsn*."""
    state: dict[tuple[str, int], dict[str, Any]] = {}
    changes = [r.value for r in records if not r.topic.endswith(".transactions")
               and (r.value["op"] != "r" or r.value["source"]["lsn"] == initial)
               and r.value["source"]["lsn"] < lsn]
    for v in sorted(changes, key=lambda v: (v["source"]["lsn"], v["source"]["seq"])):
        key = (v["source"]["table"], v["key"]["id"])
        if v["op"] == "d":
            state.pop(key, None)
        else:
            state[key] = v["after"]
    tables = {k[1] for k, row in state.items()
              if k[0] == "tables" and row["wedding_id"] == wedding}
    return {k: row for k, row in state.items()
            if (k[0] == "weddings" and row["id"] == wedding)
            or (k[0] in ("guests", "tables") and row["wedding_id"] == wedding)
            or (k[0] == "seats" and row["table_id"] in tables)}


async def test_on_demand_wedding_snapshot_while_streaming(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    setup_schema(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(EXTRA_SCHEMA)
    config = wedding_config(pg_dsn, kafka_bootstrap, topic_prefix)
    capture = Capture(config)
    stop = asyncio.Event()
    async with running(capture) as task:
        await wait_for(lambda: holds(capture.stats.snapshot_rows >= 14), what="initial snapshot")
        load = asyncio.create_task(workload(pg_dsn, stop))
        await wait_for(lambda: holds(capture.stats.events >= 20), what="streaming")
        initial_state = await state_entries(config)

        # The on-demand snapshot: another Capture object, as the `snapshot` process has. It
        # holds its snapshot transaction open after the first table until the streaming
        # capture has visibly confirmed more changes.
        ondemand = Capture(config)
        original = ondemand._snapshot_one
        inside, release = asyncio.Event(), asyncio.Event()

        async def held_open(conn: Any, info: TableInfo, lsn: Lsn, **kw: Any) -> Any:
            tiers = await original(conn, info, lsn, **kw)
            inside.set()
            await release.wait()
            return tiers

        ondemand._snapshot_one = held_open  # type: ignore[method-assign]
        taking = asyncio.create_task(ondemand.snapshot_on_demand(wedding="2"))
        await asyncio.wait_for(inside.wait(), 30)
        events, confirmed = capture.stats.events, capture.stats.confirmed_lsn
        await wait_for(lambda: holds(capture.stats.events > events + 10
                                     and capture.stats.confirmed_lsn > confirmed),
                       what="the capture streaming and confirming during the snapshot")
        release.set()
        result = await asyncio.wait_for(taking, 30)
        assert not task.done()

        stop.set()
        assert await load > 0
        await wait_confirmed(pg_dsn, config.source.slot, await current_lsn(pg_dsn))
    assert snapshot_slots(pg_dsn) == []

    assert result.wedding == "2" and result.table is None
    assert list(result.rows) == ["public.weddings", "public.tables", "public.guests",
                                 "public.seats"]
    assert result.skipped == ("public.vendors",)
    assert result.lsn > Lsn(initial_state["slot"]["created_lsn"])

    records = await read_all(kafka_bootstrap, topic_prefix)
    initial = initial_state["slot"]["created_lsn"]
    taken = [r for r in reads(records) if r.value["source"]["lsn"] == int(result.lsn)]
    got = {(r.value["source"]["table"], r.value["key"]["id"]): r.value["after"] for r in taken}
    assert len(got) == len(taken)  # each row once
    expected = rows_of_wedding_at(records, int(result.lsn), 2, initial)
    assert got == expected
    assert sum(1 for t, _ in got if t == "guests") >= 2
    assert {t for t, _ in got} == {"weddings", "tables", "guests", "seats"}
    assert result.rows == {f"public.{t}": sum(1 for k in got if k[0] == t)
                           for t in ("weddings", "tables", "guests", "seats")}
    # Wedding 2 is 60 days away: every row on the normal tier's topic, with its wedding.
    assert {r.topic for r in taken} == {f"{topic_prefix}.normal"}
    assert {r.value["wedding_id"] for r in taken} == {"2"}
    assert {r.value["priority"] for r in taken} == {"normal"}

    # The capture's own records are untouched; the on-demand snapshot has its own.
    after = await state_entries(config)
    assert {k: v for k, v in after.items() if not k.startswith("ondemand/")} == initial_state
    ondemand_keys = {k for k in after if k.startswith("ondemand/")}
    assert ondemand_keys == {f"ondemand/{result.lsn.hex_key()}/public.{t}/wedding/2"
                             for t in ("weddings", "tables", "guests", "seats")}
    guests_record = after[f"ondemand/{result.lsn.hex_key()}/public.guests/wedding/2"]
    assert guests_record["rows"] == result.rows["public.guests"]
    assert guests_record["where"] == "\"wedding_id\" = '2'"


# --- `replicator snapshot` --------------------------------------------------------------------


def write_config(path: Path, config: Config) -> None:
    s, k = config.source, config.kafka
    path.write_text(f"""
[source]
dsn = {json.dumps(s.dsn)}
slot = "{s.slot}"
publication = "{s.publication}"

[priority.tables."public.guests"]
column = "wedding_id"

[kafka]
bootstrap_servers = "{k.bootstrap_servers}"
topic_prefix = "{k.topic_prefix}"
partitions = {k.partitions}
""")


async def replicator(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "replicator", *args], capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def test_snapshot_command_for_one_table(pg_dsn: str, kafka_bootstrap: str,
                                              topic_prefix: str, tmp_path: Path) -> None:
    setup_schema(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO guests (id, wedding_id, name) VALUES (10, 1, 'Gran'), "
                     "(11, 2, 'Uncle'), (12, 3, 'Friend'), (13, 999, 'Nobody')")
    config = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    cfg = tmp_path / "replicator.toml"
    write_config(cfg, config)
    capture = Capture(config)
    async with running(capture):
        await wait_for(lambda: holds(capture.stats.snapshot_rows >= 7), what="initial snapshot")
        done = await replicator("snapshot", "--config", str(cfg), "--table", "guests", "--json")
        assert done.returncode == 0, done.stderr
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO guests (id, wedding_id, name) VALUES (14, 1, 'Late')")
        await wait_confirmed(pg_dsn, config.source.slot, await current_lsn(pg_dsn))

        unknown = await replicator("snapshot", "--config", str(cfg), "--table", "public.nope")
        not_an_id = await replicator("snapshot", "--config", str(cfg), "--wedding", "x'y")
        nobody = await replicator("snapshot", "--config", str(cfg), "--wedding", "12345",
                                  "--json")
        wedding = await replicator("snapshot", "--config", str(cfg), "--wedding", "1")
        both = await replicator("snapshot", "--config", str(cfg), "--wedding", "1",
                                "--table", "guests")

    summary = json.loads(done.stdout)
    p = topic_prefix
    assert summary == {
        "table": "public.guests", "wedding": None, "lsn": summary["lsn"], "rows": 4,
        "tables": {"public.guests": 4},
        "topics": {f"{p}.critical": 1, f"{p}.normal": 1, f"{p}.low": 2}, "skipped": [],
    }
    lsn = Lsn.parse(summary["lsn"])
    records = await read_all(kafka_bootstrap, topic_prefix)
    taken = sorted((r.value["key"]["id"], r.topic) for r in reads(records)
                   if r.value["source"]["lsn"] == int(lsn))
    assert taken == [(10, f"{p}.critical"), (11, f"{p}.normal"), (12, f"{p}.low"),
                     (13, f"{p}.low")]
    assert ("c", 14) in {(r.value["op"], r.value["key"]["id"]) for r in records
                         if not r.topic.endswith(".transactions")}  # streaming went on

    assert unknown.returncode == 2
    assert "public.nope is not captured" in unknown.stderr
    assert "public.guests" in unknown.stderr
    assert not_an_id.returncode == 2
    assert "wedding id \"x'y\" does not fit public.weddings" in not_an_id.stderr
    assert nobody.returncode == 1
    assert json.loads(nobody.stdout)["rows"] == 0
    assert "wedding 12345 matched no row" in nobody.stderr
    assert wedding.returncode == 0, wedding.stderr
    assert wedding.stdout.startswith("snapshot of wedding 1 at ")
    assert "public.weddings 1, public.guests 2 (3 rows; topics: " \
           f"{p}.critical 3)" in wedding.stdout
    assert both.returncode == 2 and "exactly one of --table and --wedding" in both.stderr
    assert snapshot_slots(pg_dsn) == []
