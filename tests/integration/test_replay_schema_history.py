"""Replay and verify reading the schema history, on an archive built by the real pipeline to
which schema documents are added by hand (sealed as the sink seals them,
`sink.worker._write_schema`/`_put`): a column added with a missing value, a table rewritten
by a DDL and re-snapshotted, a table dropped; and verify comparing a live table's columns
with the archive's."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connectors.base import ObjectStore
from connectors.registry import open_store
from replicator.archive.layout import schema_key, transactions_key
from replicator.archive.reader import Archive, schema_versions
from replicator.archive.segment import encode_transaction_segment
from replicator.capture import Capture
from replicator.crypto import encrypt
from replicator.events import Tier
from replicator.position import Lsn
from replicator.replay.compact import compact
from replicator.replay.plan import LATEST, ReplayRefused
from replicator.replay.targets import PostgresTarget
from replicator.replay.verify import verify
from replicator.source.snapshot import snapshot_record
from tests.integration.archive_helpers import keyring, sink_environ
from tests.integration.replay_helpers import (
    Point,
    record_point,
    restore_db,
    restored_state,
    run_replay,
    seeded_archive,
    snapshotted,
    wait_durable,
)

GUESTS, VENDORS, WEDDINGS = "public.guests", "public.vendors", "public.weddings"
REPLICATOR = str(Path(sys.executable).parent / "replicator")
NO_SEQUENCE = "nextval('guests_id_seq'::regclass)"  # a sequence no restore target has


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REPLICATOR, *args], env=sink_environ(), capture_output=True,
                          text=True, timeout=300)


def insert_lsn(conn: psycopg.Connection) -> Lsn:
    row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
    assert row is not None
    return Lsn(int(row[0]))


async def put_sealed(store: ObjectStore, key: str, data: bytes) -> None:
    """As the sink writes an object (`sink.worker._put`)."""
    await store.put(key, encrypt(data, key, keyring()))


async def put_schema(store: ObjectStore, doc: dict[str, Any]) -> None:
    """As the sink writes a schema document (`sink.worker._write_schema`)."""
    await put_sealed(store, schema_key(str(doc["table"]), Lsn(doc["lsn"])),
                     json.dumps(doc, sort_keys=True).encode())


async def newest_schema(store: ObjectStore, table: str, at: Lsn) -> dict[str, Any]:
    found = [key for lsn, key in await schema_versions(store, table) if lsn <= at]
    return dict(json.loads(await Archive(store, keyring()).fetch(found[-1])))


async def test_missing_values_rewrites_and_drops_from_the_schema_history(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    points: dict[str, Point] = {}
    async with snapshotted(config):
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            # Rows already there read the added column as 7 (attmissingval): their archived
            # images (the snapshot's) lack it.
            conn.execute("ALTER TABLE guests ADD COLUMN seat int DEFAULT 7")
            conn.execute("UPDATE guests SET name = 'updated' WHERE id = 1")
            conn.execute("UPDATE guests SET seat = NULL WHERE id = 2")  # present, NULL
            conn.execute("INSERT INTO guests (id, wedding_id, name) VALUES (500, 1, 'new')")
            points["added"] = record_point(conn)
            conn.execute("UPDATE weddings SET couple = 'before the rewrite' WHERE id = 1")
            rewrite = insert_lsn(conn)  # where the hand-written rewrite document goes
            conn.execute("UPDATE weddings SET couple = 'inside the window' WHERE id = 2")
            points["inside"] = record_point(conn)
        # The table's re-snapshot, as the capture takes one after a rewrite: its rows at a
        # fresh consistent point (and, below, its boundary record).
        resnapshot = await Capture(config).snapshot_on_demand(table=WEDDINGS)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE weddings SET couple = 'after the re-snapshot' WHERE id = 3")
            points["after"] = record_point(conn)
            conn.execute("UPDATE vendors SET name = 'last change' WHERE id = 1")
            drop = insert_lsn(conn)  # where the hand-written drop document goes
            conn.execute("UPDATE guests SET name = 'late' WHERE id = 5")
            points["end"] = record_point(conn)
            conn.execute("UPDATE weddings SET couple = couple || '.' WHERE id = 6")
        await wait_durable(dests, points["end"].lsn)
    assert rewrite < resnapshot.lsn < points["after"].lsn < drop < points["end"].lsn

    url = dests[0].url
    store = open_store(url, sink_environ())
    try:
        # The added column as a DDL document describes it (whatever the capture wrote): its
        # missing value and default, and a default the restore target cannot create.
        guests = await newest_schema(store, GUESTS, points["added"].lsn)
        for column in guests["columns"]:
            column["default"] = {"seat": "7", "id": NO_SEQUENCE}.get(column["name"])
            column["missing"] = "7" if column["name"] == "seat" else None
        guests.update(lsn=int(guests["lsn"]) + 1, source="ddl")
        await put_schema(store, guests)
        weddings = await newest_schema(store, WEDDINGS, rewrite)
        await put_schema(store, {**weddings, "lsn": int(rewrite), "source": "ddl",
                                 "resnapshot": True, "command": "ALTER TABLE"})
        await put_schema(store, {"table": VENDORS, "lsn": int(drop), "columns": [],
                                 "primary_key": [], "source": "ddl", "dropped": True,
                                 "command": "DROP TABLE"})
        boundary = snapshot_record(resnapshot.lsn, WEDDINGS,
                                   Counter({Tier.LOW: resnapshot.rows[WEDDINGS]}))
        data, header = encode_transaction_segment([boundary], codec="deflate")
        await put_sealed(store, transactions_key(
            header.first.commit_lsn, header.last.commit_lsn,
            hashlib.sha256(data).hexdigest()[:16]), data)
    finally:
        await store.close()

    # Rows written before the column existed restore with its missing value; a NULL written
    # after stays NULL.
    with restore_db(pg_server_dsn) as target:
        postgres = PostgresTarget(target)
        await run_replay(url, postgres, points["added"].lsn)
        restored = restored_state(target)
        assert restored == points["added"].state
        assert any(row.endswith(",7)") for row in restored[GUESTS])
        assert any(row.startswith("(2,") and row.endswith(",)") for row in restored[GUESTS])
        # The defaults the target can create are set; the other is skipped, and said so.
        with psycopg.connect(target) as conn:
            defaults: dict[str, str | None] = dict(conn.execute(
                "SELECT column_name, column_default FROM information_schema.columns "
                "WHERE table_name = 'guests'").fetchall())
        assert defaults["seat"] == "7" and defaults["id"] is None
        assert postgres.skipped_defaults == {GUESTS: {"id": NO_SEQUENCE}}
    # The scratch drill compares the restored columns with the archive's: the skipped
    # default is a note, not a failure; the missing values hash as the live rows would.
    store = open_store(url, sink_environ())
    try:
        report = await verify(store, keyring(), at=points["added"].lsn,
                              scratch_dsn=pg_server_dsn)
    finally:
        await store.close()
    assert report.ok, report.lines()
    checked = report.to_dict()["tables"][GUESTS]
    assert checked["columns_checked"] is True
    assert checked["notes"] == [f"column id: its default {NO_SEQUENCE} was not created in "
                                "the scratch database (the target could not create it)"]
    # A compaction snapshot holds the filled values (a restore streams its rows as they are).
    store = open_store(url, sink_environ())
    try:
        compacted = await compact(store, keyring(), at=points["added"].lsn, tables=[GUESTS])
    finally:
        await store.close()
    assert [t.done for t in compacted.tables] == [True], compacted.to_dict()
    with restore_db(pg_server_dsn) as target:
        await run_replay(url, PostgresTarget(target), points["added"].lsn, tables=[GUESTS])
        assert restored_state(target, (GUESTS,)) == {GUESTS: points["added"].state[GUESTS]}

    # Inside the rewrite's window: refused, pointing just before the rewrite.
    with pytest.raises(ReplayRefused, match=(
            rf"table public.weddings was rewritten by ALTER TABLE at {rewrite}; its rows are "
            rf"restorable again from {resnapshot.lsn} \(its re-snapshot\)")) as refused:
        await run_replay(url, PostgresTarget("dbname=unused"), points["inside"].lsn)
    assert refused.value.nearest == Lsn(rewrite - 1) and refused.value.tables == (WEDDINGS,)
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at",
                                   str(points["inside"].lsn), "--tables", "weddings",
                                   "--to", str(tmp_path / "inside"))
    assert done.returncode == 2 and "rewritten by ALTER TABLE" in done.stderr, done.stderr
    # From the re-snapshot on, exact again (its rows upsert the state there).
    with restore_db(pg_server_dsn) as target:
        await run_replay(url, PostgresTarget(target), points["after"].lsn)
        assert restored_state(target) == points["after"].state

    # After the drop: left out of a whole restore, refused by name.
    with restore_db(pg_server_dsn) as target:
        summary = await run_replay(url, PostgresTarget(target), points["end"].lsn)
        assert set(summary.tables) == {GUESTS, WEDDINGS}
        assert summary.left_out == {VENDORS: f"table public.vendors was dropped at {drop}"}
        assert "left out public.vendors" in summary.line()
        restored = restored_state(target, (GUESTS, WEDDINGS))
        assert restored == {t: points["end"].state[t] for t in (GUESTS, WEDDINGS)}
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT to_regclass('public.vendors')").fetchone() == (None,)
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at",
                                   str(points["end"].lsn), "--tables", "vendors",
                                   "--to", str(tmp_path / "dropped"))
    assert done.returncode == 2, done.stderr
    assert f"public.vendors was dropped at {drop}" in done.stderr
    with restore_db(pg_server_dsn) as target:  # just before the drop it is there
        summary = await run_replay(url, PostgresTarget(target), Lsn(drop - 1),
                                   tables=["vendors"])
        assert set(summary.tables) == {VENDORS} and not summary.left_out


async def test_verify_fails_on_a_live_column_the_archive_lacks(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    async with snapshotted(config):
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE guests SET name = 'x' WHERE id = 1")
            store = open_store(dests[0].url, sink_environ())
            try:
                await wait_durable(dests, record_point(conn).lsn)
                report = await verify(store, keyring(), at=LATEST, against_dsn=pg_dsn,
                                      scratch_dsn=pg_server_dsn, wait_s=60)
                assert report.ok, report.lines()
                assert all(t.columns_checked for t in report.tables.values())
                # A column the archive never hears of (no change to the table follows, and
                # no DDL event trigger fires in replica mode).
                conn.execute("SET session_replication_role = replica")
                conn.execute("ALTER TABLE vendors ADD COLUMN extra text")
                conn.execute("RESET session_replication_role")
                conn.execute("UPDATE guests SET name = 'y' WHERE id = 1")
                await wait_durable(dests, record_point(conn).lsn)
                report = await verify(store, keyring(), at=LATEST, against_dsn=pg_dsn,
                                      wait_s=60)
            finally:
                await store.close()
    assert not report.ok and report.differing == [VENDORS], report.lines()
    vendors = report.to_dict()["tables"][VENDORS]
    assert vendors["columns_checked"] is True
    assert any("column extra (text) is in the live database and not in the archive's schema"
               in p for p in vendors["problems"]), vendors["problems"]
    assert any("extra" in line for line in report.lines())
