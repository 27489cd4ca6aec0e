"""A large transaction is not held whole in memory: past the threshold its changes go to a
temporary file and come back, in order, at commit.

The size of the bounded-memory test's transaction is `REPLICATOR_TEST_LARGE_TX_MB` MiB of row
data (default 200); the 2 GB case of a bulk update is
`REPLICATOR_TEST_LARGE_TX_MB=2048 pytest tests/integration/test_large_transaction.py`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from replicator.config import Config, SourceConfig
from replicator.events import ChangeEvent
from replicator.position import Lsn
from replicator.source import pgoutput as pg
from replicator.source.assembler import Assembler, CaptureError, Committed, SpilledEvents
from replicator.source.values import TypeRegistry
from replicator.transport.avro import EventCodec
from replicator.transport.kafka import topic_names, transactions_topic
from tests.integration.capture_helpers import make_config

LARGE_TX_MB = int(os.environ.get("REPLICATOR_TEST_LARGE_TX_MB", "200"))
ROW_BYTES = 1000  # the text of one row's payload: stored inline (under the TOAST threshold)


# --- the spill itself, on real pgoutput ------------------------------------------------------


def _assemble(rows: list[tuple[str, bytes]], proto: int, spill_bytes: int,
              spill_dir: Path) -> tuple[list[Committed], list[tuple[int, int, int]]]:
    """The committed transactions of *rows* (from `pg_logical_slot_peek_binary_changes`),
    checking the size between messages as the capture does between batches; and, for each
    spill seen open, its file's (mode, link count, entries left in *spill_dir*)."""
    spill_dir.mkdir(exist_ok=True)
    decoder = pg.Decoder(proto)
    assembler = Assembler(db="test", registry=TypeRegistry(), spill_bytes=spill_bytes,
                          spill_dir=str(spill_dir))
    out, files = [], []
    for lsn, data in rows:
        done = assembler.feed(decoder.decode(data, lsn=Lsn.parse(lsn)))
        assembler.bound_memory()
        for tx in (assembler._current, *assembler._streams.values()):
            if tx is not None and tx.spill is not None:
                st = os.fstat(tx.spill.file.fileno())
                files.append((stat.S_IMODE(st.st_mode), st.st_nlink,
                              len(list(spill_dir.iterdir()))))
        if done is not None:
            out.append(done)
    assert assembler.idle
    return out, files


def _peek(conn: psycopg.Connection[Any], proto: int, **options: str) -> list[tuple[str, bytes]]:
    args = ["'proto_version'", f"'{proto}'", "'publication_names'", "'pub'"]
    for key, value in options.items():
        args += [f"'{key}'", f"'{value}'"]
    return [(lsn, bytes(data)) for lsn, data in conn.execute(
        f"SELECT lsn, data FROM pg_logical_slot_peek_binary_changes('{conn.info.dbname}', "
        f"NULL, NULL, {', '.join(args)})").fetchall()]


def _flat(txs: list[Committed]) -> list[tuple[Any, list[ChangeEvent]]]:
    return [(tx.record, list(tx.events)) for tx in txs]


@pytest.mark.parametrize("proto,options", [(1, {}), (2, {"streaming": "on"})],
                         ids=["whole", "streamed"])
def test_a_spilled_transaction_reads_back_as_if_held(
        pg_dsn: str, tmp_path: Path, proto: int, options: dict[str, str]) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE guest (id int PRIMARY KEY, name text, fee numeric(10,2))")
        conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
        conn.execute("CREATE PUBLICATION pub FOR TABLE guest, other")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                     (conn.info.dbname,))
        with conn.transaction():
            conn.execute("INSERT INTO guest SELECT g, 'guest ' || g, g * 1.25 "
                         "FROM generate_series(1, 2000) g")
            conn.execute("SAVEPOINT sp")
            conn.execute("INSERT INTO guest SELECT g, 'gone' FROM generate_series(5001, 6000) g")
            conn.execute("ROLLBACK TO SAVEPOINT sp")
            conn.execute("UPDATE guest SET name = NULL, fee = fee + 1 WHERE id % 3 = 0")
            conn.execute("UPDATE guest SET id = id + 10000 WHERE id % 7 = 0")
            conn.execute("DELETE FROM guest WHERE id % 5 = 0")
            conn.execute("TRUNCATE other")
            # A schema change halfway: the rows after it decode with the new columns.
            conn.execute("ALTER TABLE guest ADD COLUMN seat int")
            conn.execute("INSERT INTO guest SELECT g, 'late', 1, g FROM generate_series(7001, "
                         "7500) g")
        conn.execute("INSERT INTO other VALUES (1)")  # a small transaction after it
        conn.execute("SET logical_decoding_work_mem = '64kB'")
        rows = _peek(conn, proto, **options)
    held, none = _assemble(rows, proto, 1 << 40, tmp_path / "a")
    assert none == []
    spilled, files = _assemble(rows, proto, 64 << 10, tmp_path / "b")
    # The large one spilled into an unlinked 0600 file, whose private directory is gone.
    assert files and set(files) == {(0o600, 0, 0)}
    assert isinstance(spilled[0].events, SpilledEvents)
    assert isinstance(spilled[1].events, list)  # the small one stayed in memory
    assert len(spilled[0].events) == len(held[0].events) == 2000 + 666 + 285 + 400 + 1 + 500
    assert spilled[0].record == held[0].record
    assert _flat(spilled) == _flat(held)
    # Read once; the file is closed at the end.
    again, _ = _assemble(rows, proto, 64 << 10, tmp_path / "b")
    events = again[0].events
    assert isinstance(events, SpilledEvents)
    spill = events._spill
    assert spill is not None
    assert list(events) == list(held[0].events)
    assert spill.file.closed
    with pytest.raises(RuntimeError, match="only once"):
        list(events)


def test_spilling_where_nothing_can_be_written_is_a_clear_error(tmp_path: Path) -> None:
    assembler = Assembler(db="test", spill_bytes=1, spill_dir=str(tmp_path / "missing"))
    assembler.feed(pg.Relation(16400, "public", "v1.2", "d",
                               (pg.Column(True, "id", 23, -1),)))
    assembler.feed(pg.Begin(Lsn(100), 0, 7))
    assembler.feed(pg.Insert(16400, (b"1",)))
    with pytest.raises(CaptureError, match=r"^cannot spill large transaction 7 to a temporary "
                       r"file in .*/missing: No such file or directory; .*source\.spill_dir$"):
        assembler.bound_memory()


# --- a capture's memory through a large bulk update ----------------------------------------

_CHILD = """
import asyncio, logging, signal, sys
from replicator.capture import Capture
from replicator.config import Config

logging.basicConfig(level=logging.INFO, stream=sys.stderr)


async def main() -> None:
    capture = Capture(Config.model_validate_json(sys.argv[1]))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, capture.stop)
    await capture.run()


asyncio.run(main())
"""


def _kib(pid: int, field: str) -> int:
    """A `/proc/<pid>/status` memory figure (VmRSS, VmHWM: the peak), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def _kafka_figures(bootstrap: str, prefix: str, partitions: int
                         ) -> tuple[int, list[dict[str, Any]]]:
    """Messages on the tier topics, and the transaction records."""
    codec = EventCodec()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        changes = 0
        for topic in topic_names(prefix).values():
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            ends = await consumer.end_offsets(tps)
            starts = await consumer.beginning_offsets(tps)
            changes += sum(ends[tp] - starts[tp] for tp in tps)
        tp = TopicPartition(transactions_topic(prefix), 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        records = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            records += [codec.decode_transaction(r.value) for r in batch.get(tp, [])
                        if r.value is not None]
    finally:
        await consumer.stop()
    return changes, records


def _until(check: Callable[[], bool], child: subprocess.Popen[bytes], log: Path, within: float,
           what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert child.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out after {within}s waiting for {what}"
        time.sleep(0.2)


def _through_capture(config: Config, log: Path, update: str) -> tuple[int, int, str]:
    """Run a capture in its own process, run *update* once it streams, and stop it once the
    slot is confirmed past the update (Kafka holds all of it). Returns its RSS before the
    update and its peak RSS (KiB), and its log."""
    dsn, slot = config.source.dsn, config.source.slot
    with log.open("wb") as out:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, config.model_dump_json()],
                                 cwd=Path(__file__).resolve().parents[2], stdout=out,
                                 stderr=out)
    try:
        _until(lambda: "streaming slot" in log.read_text(), child, log, 60,
               "the capture to stream")
        before = _kib(child.pid, "VmRSS")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(update)
            row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()
            assert row is not None
            # The heartbeats' transactions move the slot past the update once Kafka holds
            # all of it.
            _until(lambda: _confirmed(conn, slot) >= row[0], child, log, 1800,
                   "Kafka to hold the update")
        peak = _kib(child.pid, "VmHWM")
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(60)
    assert child.returncode == 0, log.read_text()[-3000:]
    return before, peak, log.read_text()


def _confirmed(conn: psycopg.Connection[Any], slot: str) -> int:
    row = conn.execute("SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots "
                       "WHERE slot_name = %s", (slot,)).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


async def test_a_large_bulk_update_keeps_the_capture_s_memory_bounded(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    rows = LARGE_TX_MB * 2**20 // ROW_BYTES
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE weddings (id bigint PRIMARY KEY, couple text, "
                     "wedding_date date)")
        conn.execute("CREATE TABLE big (id bigint PRIMARY KEY, payload text)")
        conn.execute(f"INSERT INTO big SELECT g, repeat(md5(g::text), {ROW_BYTES // 32}) "
                     f"FROM generate_series(1, %s) g", (rows,))
    base = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    config = base.model_copy(update={"source": SourceConfig(**{
        **base.source.model_dump(), "snapshot": "never", "spill_threshold_mb": 16,
        "spill_dir": str(spill_dir)})})
    before, peak, output = await asyncio.to_thread(
        _through_capture, config, tmp_path / "capture.log",
        "UPDATE big SET payload = upper(payload)")
    # The row data went through (LARGE_TX_MB MiB) while the capture grew by far less.
    print(f"{rows} rows, {LARGE_TX_MB} MiB of row data: the capture's RSS was "
          f"{before / 1024:.0f} MiB before, {peak / 1024:.0f} MiB at its peak")
    assert (peak - before) / 1024 < LARGE_TX_MB / 2, (before / 1024, peak / 1024)
    assert "spilling its further changes to a temporary file" in output
    assert list(spill_dir.iterdir()) == []
    # Every change reached Kafka, counted by one transaction record.
    changes, records = await _kafka_figures(kafka_bootstrap, topic_prefix,
                                            config.kafka.partitions)
    assert [r["counts"] for r in records if r["counts"]] == [{"public.big": rows}]
    assert changes == rows
