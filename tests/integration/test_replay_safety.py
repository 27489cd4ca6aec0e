"""Replay's safety rails, against the real services: a wedding restore replaces that
wedding's rows only; a failed restore commits nothing; stale points, selections matching
nothing and bad targets are refused; file names stay in their directory; the
wedding-day guard reads the configured calendar and records an override."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from connectors.registry import open_store
from replicator.archive.layout import AUDIT, parse_audit_key
from replicator.crypto import decrypt
from replicator.errors import ReplicatorError
from replicator.position import Lsn
from replicator.replay.table import Column, TableSchema
from replicator.replay.targets import FileTarget, PostgresTarget
from tests.integration.archive_helpers import keyring, sink_environ
from tests.integration.replay_helpers import (
    build_archive,
    restore_db,
    restored_state,
    run_replay,
)

REPLICATOR = str(Path(sys.executable).parent / "replicator")
GUESTS_LINK = '[priority.tables."public.guests"]\ncolumn = "wedding_id"\n'


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([REPLICATOR, *args], env=sink_environ(), capture_output=True,
                          text=True, timeout=300)


def wedding_of(row: str, table: str) -> str:
    return row.strip("()").split(",")[0 if table == "public.weddings" else 1]


def staging_schemas(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'replicator_restore_%'")]


async def test_a_wedding_restore_replaces_that_weddings_rows_only(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        transactions=12, points_at=(11,))
    point, url = points[-1], dests[0].url
    config = tmp_path / "replay.toml"
    config.write_text(GUESTS_LINK)
    with restore_db(pg_server_dsn) as target:
        await run_replay(url, PostgresTarget(target), Lsn(point.lsn))
        with psycopg.connect(target, autocommit=True) as conn:
            # What the operator added since: all of it must survive the restore.
            conn.execute("CREATE INDEX guests_name ON guests (name)")
            conn.execute("ALTER TABLE guests ADD CONSTRAINT guests_wedding "
                         "FOREIGN KEY (wedding_id) REFERENCES weddings (id)")
            conn.execute("ALTER TABLE guests ALTER COLUMN name SET DEFAULT 'a guest'")
            conn.execute("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql "
                         "AS $$BEGIN RETURN NEW; END$$")
            conn.execute("CREATE TRIGGER guests_touch BEFORE UPDATE ON guests "
                         "FOR EACH ROW EXECUTE FUNCTION touch()")
            conn.execute("GRANT SELECT ON guests TO PUBLIC")
            # Wedding 2 damaged; wedding 3 and a new wedding 7 changed: those stay.
            mine = [r[0] for r in conn.execute(
                "SELECT id FROM guests WHERE wedding_id = 2 ORDER BY id")]
            conn.execute("DELETE FROM guests WHERE id = %s", (mine[0],))
            conn.execute("UPDATE guests SET name = 'damaged' WHERE id = %s", (mine[1],))
            conn.execute("INSERT INTO guests (id, wedding_id, name) VALUES (99999, 2, 'stray')")
            conn.execute("UPDATE weddings SET couple = 'damaged' WHERE id = 2")
            conn.execute("UPDATE guests SET name = 'kept' WHERE id = "
                         "(SELECT min(id) FROM guests WHERE wedding_id = 3)")
            conn.execute("INSERT INTO weddings VALUES (7, 'new couple', NULL)")
            conn.execute("INSERT INTO guests (id, wedding_id, name) VALUES (99998, 7, 'new')")
        before = restored_state(target)

        done = await asyncio.to_thread(
            cli, "replay", "--from", url, "--at", str(Lsn(point.lsn)), "--wedding", "2",
            "--to", target, "--replace-existing", "--config", str(config),
            "--override-reason", "test: today may be a Saturday")
        assert done.returncode == 0, done.stderr
        after = restored_state(target)
        for table in ("public.guests", "public.weddings"):
            expected = ([r for r in before[table] if wedding_of(r, table) != "2"]
                        + [r for r in point.state[table] if wedding_of(r, table) == "2"])
            assert sorted(after[table]) == sorted(expected), table
        assert after["public.vendors"] == before["public.vendors"]
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'guests_name'"
                                ).fetchone() == (1,)
            assert conn.execute("SELECT count(*) FROM pg_constraint "
                                "WHERE conname = 'guests_wedding'").fetchone() == (1,)
            assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'guests_touch'"
                                ).fetchone() == (1,)
            assert conn.execute("SELECT column_default FROM information_schema.columns WHERE "
                                "table_name = 'guests' AND column_name = 'name'"
                                ).fetchone() == ("'a guest'::text",)
            acl = conn.execute("SELECT relacl::text FROM pg_class WHERE oid = 'guests'::regclass"
                               ).fetchone()
            assert acl is not None and "=r/" in acl[0]
        assert staging_schemas(target) == []

        # Something that cannot be done safely is refused, and nothing changes: without the
        # link, the target's guests of the wedding cannot be told apart.
        config.write_text("")
        done = await asyncio.to_thread(
            cli, "replay", "--from", url, "--at", str(Lsn(point.lsn)), "--wedding", "2",
            "--to", target, "--replace-existing", "--config", str(config),
            "--override-reason", "test")
        assert done.returncode == 2, done.stderr
        assert "public.guests" in done.stderr and "[priority.tables]" in done.stderr
        # One error line (on a Saturday the wedding-day guard's override warning comes too).
        lines = done.stderr.strip().splitlines()
        assert len([line for line in lines if "[priority.tables]" in line]) == 1, lines
        assert "Traceback" not in done.stderr and len(lines) <= 2, lines
        assert restored_state(target) == after


async def test_a_failure_after_the_first_table_commits_nothing(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        transactions=6, points_at=(5,))
    with restore_db(pg_server_dsn) as target:
        with psycopg.connect(target, autocommit=True) as conn:
            # The last table restored (tables go in name order, one at a time) fails when it
            # commits: its primary key, once added, arms a deferred trigger that raises.
            conn.execute("CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql "
                         "AS $$BEGIN RAISE EXCEPTION 'refused at commit'; END$$")
            conn.execute("""
                CREATE FUNCTION arm() RETURNS event_trigger LANGUAGE plpgsql AS $$
                DECLARE r record;
                BEGIN
                  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands()
                           WHERE command_tag = 'ALTER TABLE' LOOP
                    IF r.object_identity LIKE '%.weddings' THEN
                      EXECUTE format('CREATE CONSTRAINT TRIGGER fail AFTER INSERT ON %s '
                                     'DEFERRABLE INITIALLY DEFERRED FOR EACH ROW '
                                     'EXECUTE FUNCTION fail_at_commit()', r.object_identity);
                      EXECUTE format('INSERT INTO %s (id, couple) VALUES (-1, %L)',
                                     r.object_identity, 'armed');
                    END IF;
                  END LOOP;
                END$$""")
            conn.execute("CREATE EVENT TRIGGER arm ON ddl_command_end EXECUTE FUNCTION arm()")
        try:
            with pytest.raises((ReplicatorError, psycopg.Error), match="refused at commit"):
                await run_replay(dests[0].url, PostgresTarget(target), Lsn(points[-1].lsn),
                                 jobs=1)
            with psycopg.connect(target) as conn:
                tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname "
                                      "NOT IN ('pg_catalog', 'information_schema')").fetchone()
            assert tables == (0,)
            assert staging_schemas(target) == []
        finally:
            with psycopg.connect(target, autocommit=True) as conn:
                conn.execute("DROP EVENT TRIGGER arm")


async def test_bad_points_selections_and_targets_are_refused(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        transactions=4, points_at=(3,))
    url, at = dests[0].url, str(Lsn(points[-1].lsn))

    # A point later than anything archived (plus the heartbeat interval) is refused.
    out = tmp_path / "stale"
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at",
                                   "2030-01-01T00:00:00Z", "--to", str(out))
    assert done.returncode == 2, done.stderr
    assert "newest archived commit" in done.stderr and "--allow-stale" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at",
                                   "2030-01-01T00:00:00Z", "--to", str(out), "--allow-stale")
    assert done.returncode == 0, done.stderr

    # A wedding or tables matching nothing.
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at", at, "--wedding",
                                   "424242", "--to", str(tmp_path / "none"))
    assert done.returncode == 2 and "wedding 424242" in done.stderr, done.stderr
    assert not list((tmp_path / "none").glob("*.jsonl"))
    for tables in ("nosuch", " , "):
        done = await asyncio.to_thread(cli, "replay", "--from", url, "--at", at, "--tables",
                                       tables, "--to", str(tmp_path / "none"))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr

    # A directory with '=' in its name is not a DSN; files 0600 in a 0700 folder.
    out = tmp_path / "files=here"
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at", at, "--to", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "public.guests.jsonl", "public.vendors.jsonl", "public.weddings.jsonl"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}

    # A store folder or a database that does not exist.
    done = await asyncio.to_thread(cli, "replay", "--from", f"file://{tmp_path}/missing",
                                   "--at", "latest", "--to", str(tmp_path / "x"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    missing = "r_missing_" + uuid.uuid4().hex[:8]
    dsn = make_conninfo(pg_server_dsn, dbname=missing)
    done = await asyncio.to_thread(cli, "replay", "--from", url, "--at", at, "--to", dsn)
    assert done.returncode == 2 and f"database {missing} does not exist" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    try:
        done = await asyncio.to_thread(cli, "replay", "--from", url, "--at", at, "--to", dsn,
                                       "--tables", "public.vendors", "--create-database")
        assert done.returncode == 0, done.stderr
        assert len(restored_state(dsn, ("public.vendors",))["public.vendors"]) == 20
    finally:
        with psycopg.connect(pg_server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(missing)))


async def test_file_names_are_encoded_and_stay_in_the_directory(tmp_path: Path) -> None:
    def schema(table: str) -> TableSchema:
        return TableSchema(table, (Column("id", "integer", True), Column("v", "text", False)),
                           ("id",), Lsn(1))

    outside = tmp_path / "outside"
    tables = [f"{outside}.t", "../up.t", ".hidden.t", 'public."we""ird"', "public.guests"]
    out = tmp_path / "out"
    target = FileTarget(out, "jsonl")
    await target.prepare([schema(t) for t in tables])
    for table in tables:
        async with target.table(schema(table)) as writer:
            await writer.write([[1, table]])
    await target.commit()
    assert not await asyncio.to_thread(os.path.exists, f"{outside}.t.jsonl")
    assert not await asyncio.to_thread(os.path.exists, tmp_path / "up.t.jsonl")
    files = {p.name: json.loads(p.read_text()) for p in out.iterdir()}
    assert files == {quote(f"{outside}.t", safe="") + ".jsonl": {"id": 1, "v": f"{outside}.t"},
                     "%2E.%2Fup.t.jsonl": {"id": 1, "v": "../up.t"},
                     "%2Ehidden.t.jsonl": {"id": 1, "v": ".hidden.t"},
                     "public.%22we%22%22ird%22.jsonl": {"id": 1, "v": 'public."we""ird"'},
                     "public.guests.jsonl": {"id": 1, "v": "public.guests"}}
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o600}


async def test_the_wedding_day_guard_reads_the_calendar_and_records_an_override(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        transactions=4, points_at=(3,))
    url, at = dests[0].url, str(Lsn(points[-1].lsn))
    config = tmp_path / "replay.toml"
    config.write_text('[priority]\nweddings_table = "app.events"\n'
                      'wedding_date_column = "day"\ntimezone = "UTC"\n')
    with restore_db(pg_server_dsn) as target:
        await run_replay(url, PostgresTarget(target), Lsn(points[-1].lsn),
                         tables=["public.vendors"])
        with psycopg.connect(target, autocommit=True) as conn:  # no replication slot
            conn.execute("CREATE SCHEMA app")
            conn.execute("CREATE TABLE app.events (id int PRIMARY KEY, day date)")
            conn.execute("INSERT INTO app.events VALUES "
                         "(1, (now() AT TIME ZONE 'UTC')::date + 1)")
            conn.execute("UPDATE vendors SET name = 'changed' WHERE id = 1")
        args = ("replay", "--from", url, "--at", at, "--to", target, "--tables",
                "public.vendors", "--replace-existing", "--config", str(config))
        done = await asyncio.to_thread(cli, *args)
        assert done.returncode == 2, done.stderr
        assert "1 wedding(s) in app.events are today or tomorrow" in done.stderr
        assert "--override-reason" in done.stderr
        assert restored_state(target, ("public.vendors",))["public.vendors"][0].startswith(
            "(1,changed,")

        done = await asyncio.to_thread(cli, *args, "--override-reason", "vendor 1 was wiped")
        assert done.returncode == 0, done.stderr
        assert restored_state(target, ("public.vendors",))["public.vendors"] == \
            points[-1].state["public.vendors"]
        with psycopg.connect(target) as conn:
            rows = conn.execute("SELECT reason, tables, restore_point FROM "
                                "public.replicator_audit").fetchall()
        assert rows == [("vendor 1 was wiped", ["public.vendors"], at)]
    store = open_store(url, sink_environ())
    try:
        keys = [info.key async for info in store.list(AUDIT)]
        assert len(keys) == 1
        parse_audit_key(keys[0])
        doc = json.loads(decrypt(await store.get(keys[0]), keys[0], keyring()))
    finally:
        await store.close()
    assert doc["reason"] == "vendor 1 was wiped" and doc["tables"] == ["public.vendors"]
    assert "today or tomorrow" in doc["guard"] and doc["restore_point"] == at


async def test_a_killed_replay_leaves_nothing_the_next_one_keeps(pg_server_dsn: str) -> None:
    # A replay killed with -9 cannot drop its staging schemas; the next replay into the
    # database drops them, and leaves alone those of a replay that is still running.
    schema = TableSchema("public.t", (Column("id", "integer", True),), ("id",), Lsn(1))
    with restore_db(pg_server_dsn) as target:
        script = (
            "import asyncio, sys\n"
            "from replicator.position import Lsn\n"
            "from replicator.replay.table import Column, TableSchema\n"
            "from replicator.replay.targets import PostgresTarget\n"
            "async def main():\n"
            "    t = PostgresTarget(sys.argv[1])\n"
            "    await t.prepare([TableSchema('public.t', (Column('id', 'integer', True),),"
            " ('id',), Lsn(1))])\n"
            "    print('staged', flush=True)\n"
            "    await asyncio.sleep(600)\n"
            "asyncio.run(main())\n")
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, target, stdout=asyncio.subprocess.PIPE,
            env=sink_environ())
        try:
            assert child.stdout is not None
            assert await asyncio.wait_for(child.stdout.readline(), 60) == b"staged\n"
        finally:
            child.kill()  # SIGKILL: nothing of its own cleans up
            await child.wait()
        killed = staging_schemas(target)
        assert len(killed) == 1, killed
        running = PostgresTarget(target)
        await running.prepare([schema])
        kept = sorted(set(staging_schemas(target)) - set(killed))
        assert len(kept) == 1
        nxt = PostgresTarget(target)
        await nxt.prepare([schema])
        mine = sorted(set(staging_schemas(target)) - set(killed) - set(kept))
        assert sorted(staging_schemas(target)) == sorted(kept + mine)  # the killed run's: gone
        await nxt.abort()
        await running.abort()
        assert staging_schemas(target) == []


async def test_the_wedding_filter_uses_the_index_and_picks_what_the_text_comparison_picks(
        pg_dsn: str) -> None:
    """A rollback's and a wedding restore's statements find the wedding's rows through the
    column's index (`= %s::bigint`), not by casting every row to text; an id whose text is
    not canonical for the type ('007', an upper-case uuid) keeps the text comparison, so it
    picks exactly the rows it picked before."""
    from replicator.replay.swap import wedding_equals

    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE big (id int PRIMARY KEY, wedding_id bigint, "
                           "w uuid, note text)")
        await conn.execute("INSERT INTO big SELECT g, g % 1000, "
                           "md5((g % 1000)::text)::uuid, 'x' FROM generate_series(1, 20000) g")
        await conn.execute("CREATE INDEX ON big (wedding_id)")
        await conn.execute("CREATE INDEX ON big (w)")
        await conn.execute("ANALYZE big")
        uuid_text = (await (await conn.execute(
            "SELECT w::text FROM big WHERE wedding_id = 7 LIMIT 1")).fetchone())[0]

        async def rows(column: str, wedding: str) -> tuple[int, str, str]:
            where = await wedding_equals(conn, "t", "public.big", column, wedding)
            query = sql.SQL("SELECT count(*) FROM big t WHERE {}").format(where)
            count = (await (await conn.execute(query, (wedding,))).fetchone())[0]
            plan = "\n".join(r[0] for r in await (await conn.execute(
                sql.SQL("EXPLAIN ") + query, (wedding,))).fetchall())
            return count, where.as_string(conn), plan

        count, text, plan = await rows("wedding_id", "7")
        assert count == 20 and "::bigint" in text and "Index" in plan, (text, plan)
        count, text, plan = await rows("w", uuid_text)
        assert count == 20 and "::uuid" in text and "Index" in plan, (text, plan)
        for column, odd in (("wedding_id", "007"), ("wedding_id", "seven"),
                            ("w", uuid_text.upper()), ("wedding_id", "99999999999999999999")):
            count, text, _ = await rows(column, odd)
            assert count == 0 and "::text" in text, (column, odd, text)
        count, text, _ = await rows("note", "x")  # a text column: compared as text
        assert count == 20000 and "::text" in text
        # The failed casts left the connection usable (each tried in a savepoint).
        assert (await (await conn.execute("SELECT 1")).fetchone())[0] == 1
