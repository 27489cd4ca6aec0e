"""Real pgoutput output from PostgreSQL 15 and 18, assembled into committed transactions."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
import pytest

from replicator.events import Op
from replicator.position import Lsn
from replicator.source import pgoutput as pg
from replicator.source.assembler import Assembler, CaptureError, Committed
from replicator.source.values import TypeRegistry


def changes(conn: psycopg.Connection[Any], proto: int = 1, **options: str) -> list[Committed]:
    slot = conn.info.dbname  # slot names are server-wide: one per test database
    args = ["'proto_version'", f"'{proto}'", "'publication_names'", "'pub'"]
    for key, value in options.items():
        args += [f"'{key}'", f"'{value}'"]
    rows = conn.execute(
        f"SELECT lsn, data FROM pg_logical_slot_get_binary_changes('{slot}', NULL, NULL, "
        f"{', '.join(args)})").fetchall()
    decoder = pg.Decoder(proto)
    assembler = Assembler(db="test", registry=TypeRegistry(),
                          primary_keys={"public.guest": ("id",)})
    out = []
    for lsn, data in rows:
        done = assembler.feed(decoder.decode(bytes(data), lsn=Lsn.parse(lsn)))
        if done is not None:
            out.append(done)
    assert assembler.idle
    return out


@pytest.fixture
def conn(pg_dsn: str) -> Any:
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("CREATE TABLE guest (id int PRIMARY KEY, name text, fee numeric(10,2), "
                  "notes text)")
        c.execute("ALTER TABLE guest ALTER COLUMN notes SET STORAGE EXTERNAL")
        c.execute("CREATE PUBLICATION pub FOR TABLE guest")
        c.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (c.info.dbname,))
        yield c


def test_insert_update_delete_in_one_transaction(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO guest VALUES (1, 'Ada', 10.50, 'x'), (2, 'Bo', NULL, NULL)")
        conn.execute("UPDATE guest SET name = 'Ada L.' WHERE id = 1")
        conn.execute("DELETE FROM guest WHERE id = 2")
    [tx] = changes(conn)
    ops = [(e.op, e.key, e.position.seq) for e in tx.events]
    assert ops == [(Op.CREATE, {"id": 1}, 0), (Op.CREATE, {"id": 2}, 1),
                   (Op.UPDATE, {"id": 1}, 2), (Op.DELETE, {"id": 2}, 3)]
    assert {e.position.commit_lsn for e in tx.events} == {tx.record.commit_lsn}
    assert tx.events[0].after == {"id": 1, "name": "Ada", "fee": Decimal("10.50"), "notes": "x"}
    assert tx.events[2].before is None  # default identity: no old tuple unless the key changed
    assert tx.events[3].before == {"id": 2}
    assert tx.record.counts == {"public.guest": 4}
    assert tx.record.commit_ts_us > 1_700_000_000_000_000


def test_replica_identity_full_gives_whole_before_image(conn: psycopg.Connection[Any]) -> None:
    conn.execute("ALTER TABLE guest REPLICA IDENTITY FULL")
    conn.execute("INSERT INTO guest VALUES (1, 'Ada', 1, 'n')")
    conn.execute("UPDATE guest SET fee = 2 WHERE id = 1")
    *_, tx = changes(conn)
    [event] = tx.events
    assert event.before == {"id": 1, "name": "Ada", "fee": Decimal("1.00"), "notes": "n"}
    assert event.key == {"id": 1}  # the primary key, not every column


def test_unchanged_toast_is_listed_never_a_value(conn: psycopg.Connection[Any]) -> None:
    big = "wedding vows " * 20_000  # stored out of line
    conn.execute("INSERT INTO guest VALUES (1, 'Ada', 1, %s)", (big,))
    conn.execute("UPDATE guest SET fee = 3 WHERE id = 1")
    insert, update = changes(conn)
    assert insert.events[0].after is not None and insert.events[0].after["notes"] == big
    event = update.events[0]
    assert event.unchanged == ("notes",)
    assert event.after == {"id": 1, "name": "Ada", "fee": Decimal("3.00")}


def test_toast_is_filled_from_a_full_before_image(conn: psycopg.Connection[Any]) -> None:
    conn.execute("ALTER TABLE guest REPLICA IDENTITY FULL")
    big = "first dance " * 20_000
    conn.execute("INSERT INTO guest VALUES (1, 'Ada', 1, %s)", (big,))
    conn.execute("UPDATE guest SET fee = 3 WHERE id = 1")
    _, update = changes(conn)
    event = update.events[0]
    assert event.after is not None
    assert event.unchanged == () and event.after["notes"] == big


def test_schema_change_applies_to_later_rows(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO guest (id, name) VALUES (1, 'Ada')")
    conn.execute("ALTER TABLE guest ADD COLUMN table_no int")
    conn.execute("INSERT INTO guest (id, name, table_no) VALUES (2, 'Bo', 7)")
    first, second = changes(conn)
    assert first.events[0].after is not None and "table_no" not in first.events[0].after
    assert second.events[0].after is not None and second.events[0].after["table_no"] == 7


def test_truncate_is_an_event(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO guest (id) VALUES (1)")
    conn.execute("TRUNCATE guest")
    _, tx = changes(conn)
    assert [(e.op, e.table, e.key) for e in tx.events] == [(Op.TRUNCATE, "guest", {})]


def test_streamed_transaction_drops_an_aborted_subtransaction(
        conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO guest (id, name) SELECT g, repeat('k', 200) "
                     "FROM generate_series(1, 3000) g")
        conn.execute("SAVEPOINT sp")
        conn.execute("INSERT INTO guest (id, name) SELECT g, 'gone' "
                     "FROM generate_series(10001, 13000) g")
        conn.execute("ROLLBACK TO SAVEPOINT sp")
        conn.execute("INSERT INTO guest (id, name) VALUES (20000, 'last')")
    # A rolled-back big transaction must leave nothing behind.
    with conn.transaction(force_rollback=True):
        conn.execute("INSERT INTO guest (id) SELECT g FROM generate_series(30001, 33000) g")
    # An abort record is not flushed at once; the SQL interface decodes only flushed WAL, so
    # commit something unrelated (not published, so it decodes to nothing) to flush it.
    conn.execute("CREATE TABLE flush_marker (id int)")
    conn.execute("SET logical_decoding_work_mem = '64kB'")
    [tx] = changes(conn, proto=2, streaming="on")
    ids = [e.key["id"] for e in tx.events]
    assert len(ids) == 3001 and ids[-1] == 20000
    assert not any(10001 <= i <= 13000 or i > 30000 for i in ids)
    assert [e.position.seq for e in tx.events] == list(range(3001))


def test_a_table_without_any_key_is_a_clear_error() -> None:
    assembler = Assembler(db="d")
    relation = pg.Relation(1, "public", "loose", "n", (pg.Column(False, "a", 23, -1),))
    with pytest.raises(CaptureError, match=r"public\.loose has no primary key.*REPLICA IDENTITY"):
        assembler.feed(relation)
