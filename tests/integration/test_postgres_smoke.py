"""Each PostgreSQL version of the stack does logical replication with pgoutput."""

from __future__ import annotations

import psycopg


def test_server_is_configured_for_logical_replication(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            (["wal_level", "max_replication_slots", "max_wal_senders"],)).fetchall())
    assert settings["wal_level"] == "logical"
    assert int(settings["max_replication_slots"]) >= 10
    assert int(settings["max_wal_senders"]) >= 10


def test_versions_are_the_ones_asked_for(pg_server_dsn: str) -> None:
    with psycopg.connect(pg_server_dsn) as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None
    port_version = "15" if ":15432" in pg_server_dsn else "18"
    assert int(row[0]) // 10000 == int(port_version)


def test_pgoutput_slot_reads_a_committed_change(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE guest (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute("CREATE PUBLICATION smoke_pub FOR TABLE guest")
        conn.execute("SELECT pg_create_logical_replication_slot('smoke_slot', 'pgoutput')")
        conn.execute("INSERT INTO guest VALUES (1, 'Ada Lovelace')")
        rows = conn.execute(
            "SELECT lsn, data FROM pg_logical_slot_get_binary_changes('smoke_slot', NULL, NULL, "
            "'proto_version', '1', 'publication_names', 'smoke_pub')").fetchall()
    kinds = [bytes(data)[:1] for _, data in rows]
    # Begin, Relation, Insert, Commit: one transaction, one row.
    assert kinds == [b"B", b"R", b"I", b"C"]
    relation = bytes(rows[1][1])
    insert = bytes(rows[2][1])
    assert b"guest" in relation and b"name" in relation
    assert insert.endswith(b"Ada Lovelace")


def test_test_decoding_is_available(pg_dsn: str) -> None:
    """test_decoding is the reference the decoder's property tests compare against."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE venue (id int PRIMARY KEY, city text)")
        conn.execute("SELECT pg_create_logical_replication_slot('td_slot', 'test_decoding')")
        conn.execute("INSERT INTO venue VALUES (7, 'Bath')")
        changes = [r[0] for r in conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes('td_slot', NULL, NULL)").fetchall()]
    assert "table public.venue: INSERT: id[integer]:7 city[text]:'Bath'" in changes
