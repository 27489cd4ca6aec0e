"""Tables with odd names end to end: capture, Kafka, the archive, and replay into Postgres
and into files, compared with the source.

The names: a dot in a table name (`public."v1.2"`), a dot in a schema name
(`"my.schema"."v1.2"`, and `"my"."schema.v1.2"`, which a naive `schema.table` text form could
not tell from it), a double quote (`public."we""ird"`, a schema `"qu""ote"`), spaces and
upper case (`public."Guest List"`), non-ASCII (`"qu""ote"."Mariée Ünïcode"`). The qualified
text form is `schema.table` when neither part holds a dot or a double quote, and the quoted
identifier form (`"my.schema"."v1.2"`) otherwise.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from replicator.config import PriorityConfig, SourceConfig, WeddingLink
from replicator.position import Lsn
from replicator.replay.targets import FileTarget, PostgresTarget
from tests.integration.archive_helpers import destinations, with_destinations
from tests.integration.capture_helpers import make_config, read_all
from tests.integration.replay_helpers import (
    pipeline,
    restore_db,
    run_replay,
    snapshot_done,
    wait_durable,
)

# (schema, table) -> the qualified text form every stage uses as the table's name
TABLES = {
    ("public", "v1.2"): '"public"."v1.2"',
    ("my.schema", "v1.2"): '"my.schema"."v1.2"',
    ("my", "schema.v1.2"): '"my"."schema.v1.2"',
    ("public", 'we"ird'): '"public"."we""ird"',
    ("public", "Guest List"): "public.Guest List",
    ('qu"ote', "Mariée Ünïcode"): '"qu""ote"."Mariée Ünïcode"',
    ("public", "weddings"): "public.weddings",
}
LINKED = ("my.schema", "v1.2")  # rows lead to their wedding through "Wedding Id"


def _name(schema: str, table: str) -> sql.Identifier:
    return sql.Identifier(schema, table)


def _setup(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for schema in ("my.schema", "my", 'qu"ote'):
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute("CREATE TABLE weddings (id bigint PRIMARY KEY, couple text, "
                     "wedding_date date)")
        conn.execute("INSERT INTO weddings VALUES (1, 'Ada & Bo', current_date + 3)")
        for schema, table in TABLES:
            if table == "weddings":
                continue
            conn.execute(sql.SQL(
                'CREATE TABLE {} (id bigint PRIMARY KEY, "Wedding Id" bigint, '
                '"Note Text" text, "größe" numeric(8,2))').format(_name(schema, table)))
            conn.execute(sql.SQL(
                "INSERT INTO {} SELECT g, 1, %s || ' ' || g, g * 1.5 "
                "FROM generate_series(1, 20) g").format(_name(schema, table)), (table,))


def _workload(dsn: str) -> None:
    """Inserts, updates, deletes, a key change and an added column on every odd table."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for schema, table in TABLES:
            if table == "weddings":
                continue
            name = _name(schema, table)
            with conn.transaction():
                conn.execute(sql.SQL(
                    "INSERT INTO {} SELECT g, 1, 'new ' || g, g FROM generate_series(21, 30) g"
                ).format(name))
                conn.execute(sql.SQL(
                    "UPDATE {} SET \"Note Text\" = \"Note Text\" || ' (edited)' "
                    "WHERE id % 3 = 0").format(name))
                conn.execute(sql.SQL("DELETE FROM {} WHERE id % 7 = 0").format(name))
                conn.execute(sql.SQL("UPDATE {} SET id = 100 WHERE id = 1").format(name))
        conn.execute(sql.SQL('ALTER TABLE {} ADD COLUMN "Seat No" int').format(
            _name("my", "schema.v1.2")))
        conn.execute(sql.SQL('UPDATE {} SET "Seat No" = id WHERE id < 10').format(
            _name("my", "schema.v1.2")))


def _state(dsn: str) -> dict[str, list[str]]:
    with psycopg.connect(dsn) as conn:
        return {text: [r[0] for r in conn.execute(sql.SQL(
                    "SELECT t::text FROM {} t ORDER BY id").format(_name(*pair))).fetchall()]
                for pair, text in TABLES.items()}


def _lsn(dsn: str) -> Lsn:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
        assert row is not None
        # One more commit: a checkpoint passes a point only once a later transaction is whole.
        conn.execute("UPDATE weddings SET couple = couple || '.'")
    return Lsn(int(row[0]))


def _from_csv(dsn: str, pair: tuple[str, str], data: bytes) -> list[str]:
    """The CSV read back by `COPY ... CSV HEADER` into a copy of the source table."""
    with psycopg.connect(dsn) as conn:
        conn.execute(sql.SQL("CREATE TEMP TABLE csv_back (LIKE {})").format(_name(*pair)))
        with conn.cursor().copy("COPY csv_back FROM STDIN (FORMAT csv, HEADER)") as copy:
            copy.write(data)
        rows = [r[0] for r in conn.execute(
            "SELECT t::text FROM csv_back t ORDER BY id").fetchall()]
        conn.rollback()
    return rows


_COLUMNS = ("id", "Wedding Id", "Note Text", "größe")


def _source_rows(dsn: str, pair: tuple[str, str]) -> list[tuple[object, ...]]:
    """The columns every odd table has, as the file targets write them (numeric as text)."""
    with psycopg.connect(dsn) as conn:
        return [tuple(r) for r in conn.execute(sql.SQL(
            'SELECT id, "Wedding Id", "Note Text", "größe"::text FROM {} ORDER BY id'
        ).format(_name(*pair))).fetchall()]


async def test_odd_table_names_end_to_end(pg_dsn: str, pg_server_dsn: str,
                                          kafka_bootstrap: str, topic_prefix: str,
                                          tmp_path: Path) -> None:
    await asyncio.to_thread(_setup, pg_dsn)
    base = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    # The configuration names the tables in the qualified text form.
    config = base.model_copy(update={
        "source": SourceConfig(**{**base.source.model_dump(), "tables": tuple(TABLES.values())}),
        "priority": PriorityConfig(tables={TABLES[LINKED]: WeddingLink(column="Wedding Id")}),
    })
    dests = destinations(tmp_path)
    config = with_destinations(config, dests)
    async with pipeline(config) as capture:
        await snapshot_done(capture, 1 + 20 * (len(TABLES) - 1))
        await asyncio.to_thread(_workload, pg_dsn)
        expected = await asyncio.to_thread(_state, pg_dsn)
        lsn = await asyncio.to_thread(_lsn, pg_dsn)
        await wait_durable(dests, lsn)
    # Kafka: each change names its table's schema and name apart; the linked table's rows
    # found their wedding.
    records = [r for r in await read_all(kafka_bootstrap, topic_prefix)
               if "source" in r.value]
    seen = {(r.value["source"]["schema"], r.value["source"]["table"]) for r in records}
    assert seen == set(TABLES)
    linked = [r for r in records if (r.value["source"]["schema"],
                                     r.value["source"]["table"]) == LINKED]
    assert linked and all(r.value["wedding_id"] == "1" for r in linked if r.value["op"] != "d")
    # The archive: one folder per table, named by the percent-encoded qualified text.
    archive = tmp_path / "archive"
    folders = {p.name for p in (archive / "segments").iterdir()}
    assert {quote(t, safe="") for t in TABLES.values() if t != "public.weddings"} <= folders
    # Replay into Postgres: every table as the source had it.
    url = dests[0].url
    with restore_db(pg_server_dsn) as target_dsn:
        summary = await run_replay(url, PostgresTarget(target_dsn), lsn)
        assert await asyncio.to_thread(_state, target_dsn) == expected
        assert summary.rows == sum(len(v) for v in expected.values())
    # Replay into files, in each format.
    for fmt in ("jsonl", "csv", "parquet"):
        out = tmp_path / f"files-{fmt}"
        target = FileTarget(out, fmt)
        await run_replay(url, target, lsn)
        assert sorted(p.name for p in out.iterdir()) == sorted(
            target.path(t).name for t in TABLES.values())
        for pair, text in TABLES.items():
            path = target.path(text)
            if fmt == "csv":
                got = await asyncio.to_thread(_from_csv, pg_dsn, pair, path.read_bytes())
                assert got == expected[text], (fmt, text)
                continue
            if pair == ("public", "weddings"):
                continue
            source = await asyncio.to_thread(_source_rows, pg_dsn, pair)
            if fmt == "jsonl":
                rows = [json.loads(line) for line in path.read_text().splitlines()]
            else:
                import pyarrow.parquet as pq

                rows = pq.read_table(path).to_pylist()
            got_rows = sorted((int(r["id"]), int(r["Wedding Id"]), r["Note Text"],
                               str(r["größe"])) for r in rows)
            assert got_rows == source, (fmt, text)
