"""DDL in the stream, end to end against real Postgres, Kafka and a local-folder archive: each
DDL is archived at its exact position (the event triggers' logical messages), and a restore
at a point on either side of it equals the source as it was there, both while the capture
streams and while it is behind (stopped during the DDL, catching up afterwards).

The script, in order, with a recorded point (LSN and the exact state of every table) after
each step:
- add a column with a default (older rows read the default: `attmissingval`, never in WAL),
  then a point before any row changes (the new shape, no Relation message yet);
- write the new column; rename it (older rows carry the old name);
- change a column's type with rounding (a table rewrite: re-snapshotted, and points between
  the rewrite and the re-snapshot are refused, naming the table);
- drop a column, and add it again under the same name (rows not rewritten read the new
  default, not the dropped column's values); rename a table (the old name is dropped there,
  the new one re-snapshotted);
- create a table in the FOR ALL TABLES publication, write it, drop it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from replicator.errors import ReplicatorError
from replicator.position import Lsn
from replicator.replay.plan import ReplayRefused
from replicator.replay.targets import FileTarget, PostgresTarget
from tests.integration.archive_helpers import archived_schemas
from tests.integration.capture_helpers import holds, wait_for
from tests.integration.replay_helpers import (
    pipeline,
    restore_db,
    run_replay,
    seeded_archive,
    snapshot_done,
    wait_durable,
)

pytestmark = pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])


@dataclass
class Shot:
    """The source just after a step: every user table's columns and rows."""

    name: str
    lsn: Lsn
    tables: dict[str, tuple[list[tuple[str, str, bool, str | None]], list[str]]]
    exact: bool = True  # False: some table is inside a rewrite's re-snapshot window


def shot(conn: psycopg.Connection[Any], name: str) -> Shot:
    row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
    assert row is not None
    return Shot(name, Lsn(int(row[0])), database_state(conn))


def database_state(conn: psycopg.Connection[Any]
                   ) -> dict[str, tuple[list[tuple[str, str, bool, str | None]], list[str]]]:
    tables = [r[0] for r in conn.execute(
        "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY relname")]
    out = {}
    for table in tables:
        columns = [(str(r[0]), str(r[1]), bool(r[2]), r[3]) for r in conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, "
            "pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a LEFT JOIN pg_attrdef d "
            "ON d.adrelid = a.attrelid AND d.adnum = a.attnum WHERE a.attrelid = %s::regclass"
            " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum", (f"public.{table}",))]
        rows = [r[0] for r in conn.execute(sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(
            sql.Identifier(table)))]
        out[f"public.{table}"] = (columns, rows)
    return out


def script(conn: psycopg.Connection[Any], between: Callable[[str], None]) -> list[Shot]:
    """The DDL script; *between(step)* runs after the steps that wait for a re-snapshot."""
    shots = []

    def step(name: str, *statements: str) -> Shot:
        for statement in statements:
            conn.execute(statement)
        taken = shot(conn, name)
        shots.append(taken)
        return taken

    step("before", "UPDATE guests SET name = name || '+' WHERE id <= 3")
    step("add column with default", "ALTER TABLE guests ADD COLUMN note text DEFAULT 'x y'")
    step("write the new column", "UPDATE guests SET note = 'written' WHERE id = 1",
         "INSERT INTO guests (id, wedding_id, name) VALUES (1001, 1, 'late')")
    step("rename column", "ALTER TABLE guests RENAME COLUMN note TO remark",
         "UPDATE guests SET name = 'renamed-era' WHERE id = 5")
    step("alter type (rewrite)",
         "ALTER TABLE vendors ALTER COLUMN fee TYPE numeric(12,1)").exact = False
    between("vendors")
    step("after the rewrite", "UPDATE vendors SET name = name || '!' WHERE id = 1")
    step("drop column", "ALTER TABLE guests DROP COLUMN remark")
    # The same name again: rows not rewritten since read the new default, never the values
    # the dropped column had under that name.
    step("add the dropped column again",
         "ALTER TABLE guests ADD COLUMN remark text DEFAULT 'again'",
         "UPDATE guests SET name = 'after the re-add' WHERE id = 7")
    step("rename table", "ALTER TABLE vendors RENAME TO suppliers").exact = False
    between("suppliers")
    step("after the rename", "INSERT INTO suppliers VALUES (99, 'new', 1.5)")
    step("create table", "CREATE TABLE extras (id bigint PRIMARY KEY, v text DEFAULT 'd')",
         "INSERT INTO extras (id) VALUES (1)").exact = False
    between("extras")
    step("after the create", "INSERT INTO extras VALUES (2, 'b')")
    step("drop table", "DROP TABLE extras",
         "UPDATE weddings SET couple = couple || '.' WHERE id = 1")
    return shots


async def restored(server_dsn: str, url: str, lsn: Lsn) -> dict[str, Any]:
    with restore_db(server_dsn) as target:
        await run_replay(url, PostgresTarget(target), lsn)
        with psycopg.connect(target) as conn:
            return database_state(conn)


@pytest.mark.parametrize("mode", ["streaming", "behind"])
async def test_ddl_restores_either_side(pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str,
                                        topic_prefix: str, tmp_path: Path, mode: str) -> None:
    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    url = dests[0].url
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        if mode == "streaming":
            async with pipeline(config) as capture:
                await snapshot_done(capture, 146)

                def resnapshotted(table: str) -> None:
                    # From the script's thread: the table's re-snapshot, taken after the DDL
                    # just committed, is recorded (its boundary record sent once the stream
                    # passed it). Not merely "a snapshot is recorded": until the capture
                    # decodes the DDL, the table's earlier snapshot still counts as done.
                    row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
                    assert row is not None
                    ddl_lsn = int(row[0])
                    deadline = time.monotonic() + 60
                    while (capture.state.snapshot_done(f"public.{table}") or 0) <= ddl_lsn:
                        assert time.monotonic() < deadline, f"no re-snapshot of {table}"
                        time.sleep(0.2)

                shots = await asyncio.to_thread(script, conn, resnapshotted)
                final = shot(conn, "final")
                await wait_durable(dests, final.lsn)
        else:
            async with pipeline(config) as capture:
                await snapshot_done(capture, 146)
            shots = script(conn, lambda table: None)
            async with pipeline(config) as capture:
                await wait_for(lambda: holds(
                    capture.state.snapshot_done("public.suppliers") is not None),
                    within=60, what="the re-snapshot of suppliers")
                conn.execute("UPDATE weddings SET couple = couple || '!' WHERE id = 2")
                final = shot(conn, "final")
                await wait_durable(dests, final.lsn)

    # the archive: a document at each DDL's commit, from the triggers' descriptions
    guests = await archived_schemas(url, "public.guests")
    added = [d for d in guests if any(c["name"] == "note" for c in d["columns"])]
    assert added and added[0]["source"] == "ddl", guests
    note = next(c for c in added[0]["columns"] if c["name"] == "note")
    assert note.get("missing") == "x y" and note["default"] == "'x y'::text"
    renamed = [d for d in guests if any(c["name"] == "remark" for c in d["columns"])]
    assert next(c for c in renamed[0]["columns"] if c["name"] == "remark")[
        "previous_names"] == ["note"]
    vendors = await archived_schemas(url, "public.vendors")
    assert any(d.get("resnapshot") for d in vendors), vendors
    assert vendors[-1].get("dropped") and vendors[-1].get("renamed_to") == "public.suppliers"
    extras = await archived_schemas(url, "public.extras")
    assert extras[0].get("resnapshot") and extras[-1].get("dropped"), extras

    # restores on either side of each DDL
    early = ("before", "add column with default", "write the new column", "rename column")
    for taken in [*shots, final]:
        # Streaming, only the points taken right after a rewrite, rename or create are
        # inside its re-snapshot window; behind, every point from the first rewrite until
        # the re-snapshots after the catch-up is.
        exact = taken.exact if mode == "streaming" else taken.name in (*early, "final")
        if exact:
            got = await restored(pg_server_dsn, url, Lsn(taken.lsn))
            assert got.keys() == taken.tables.keys(), taken.name
            for table, (columns, rows) in taken.tables.items():
                assert got[table][1] == rows, (taken.name, table)
                assert [c[:2] for c in got[table][0]] == [c[:2] for c in columns], (
                    taken.name, table)
        else:
            with pytest.raises(ReplicatorError, match=r"re-?snapshot|no restorable state"):
                await restored(pg_server_dsn, url, Lsn(taken.lsn))

    # Asked for by name before it was created: refused. Streaming, the message points at its
    # first restorable state, later (there is none before its creation); behind, the table
    # was dropped before any re-snapshot of it, so it has none and can only be left out.
    born = Lsn(extras[0]["lsn"])
    with pytest.raises(ReplayRefused, match=(
            rf"public.extras was created at {born}, after the point: it does not exist at "
            r"LSN \S+; (restore at \S+ or later, or )?leave it out \(--tables\)")) as refused:
        await run_replay(url, FileTarget(tmp_path / "born", "jsonl"), Lsn(shots[0].lsn),
                         tables=["extras"])
    if mode == "streaming":
        assert refused.value.nearest is not None and refused.value.nearest >= born
        await run_replay(url, FileTarget(tmp_path / "born", "jsonl"), refused.value.nearest,
                         tables=["extras"])
    else:
        assert refused.value.nearest is None, refused.value


async def test_without_event_triggers_the_relation_messages_carry_the_schema(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A capture role that may not create event triggers (not a superuser): one warning, and
    schemas follow the Relation messages, by OID, so a table renamed while the capture is
    behind does not stop it (a lookup by the old name would)."""
    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    role = f"cap_{topic_prefix[-8:]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN REPLICATION").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}").format(
            sql.Identifier(role)))
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(
            sql.Identifier(config.source.publication)))
    source = config.source.model_copy(update={"dsn": f"{pg_dsn} user={role}"})
    config = config.model_copy(update={"source": source})
    try:
        async with pipeline(config) as capture:
            await snapshot_done(capture, 146)
        assert any("DDL capture is off" in r.getMessage() for r in caplog.records)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("UPDATE vendors SET name = 'before' WHERE id = 1")
            conn.execute("ALTER TABLE vendors RENAME TO suppliers")
            conn.execute("ALTER TABLE guests ADD COLUMN note text")
            conn.execute("UPDATE guests SET note = 'n' WHERE id = 1")
            async with pipeline(config) as capture:
                conn.execute("UPDATE suppliers SET name = 'after' WHERE id = 1")
                end = shot(conn, "end")
                await wait_durable(dests, end.lsn)
        guests = await archived_schemas(dests[0].url, "public.guests")
        with_note = [d for d in guests if "note" in [c["name"] for c in d["columns"]]]
        assert with_note and with_note[0]["source"] == "relation", guests
        assert (await archived_schemas(dests[0].url, "public.vendors"))[-1]["source"] in (
            "relation", "snapshot")
        assert await archived_schemas(dests[0].url, "public.suppliers")
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
