"""Capture: every committed change in Postgres, into Kafka, by wedding tier, losing nothing.

Start-up, each step from the durable side:

1. Check the server (wal_level, free slots) and the publication (every table has a key);
   read the catalog (user types, primary keys).
2. Create the Kafka topics that are missing; read the capture's state topic.
3. Warm the wedding calendar (one query per table).
4. The slot. Missing and never created by us: create it with an exported snapshot and take
   the initial snapshot inside it. Missing but recorded in the state topic: it was lost;
   stop with an alert unless the operator confirmed (`accept_gap`), then create a new slot,
   snapshot again and record the gap. Present: check it is usable (not invalidated), and
   snapshot (through a temporary slot) any table whose initial snapshot is not recorded.

Streaming, for every committed transaction, in commit order:

5. Decode, assemble, classify by tier, hand every event and the transaction record to the
   producer (without waiting: batching needs many in flight).
6. Register the transaction with the ack watermark; Kafka's acknowledgements (acks=all)
   complete it.
7. Confirm to the slot only the watermark: the end LSN of the newest transaction that, with
   every earlier one, is acknowledged. A crash anywhere repeats unconfirmed transactions,
   which the archive de-duplicates by position.

A lost connection (Postgres or Kafka) restarts streaming from step 5 at the slot's confirmed
position after a capped, jittered backoff. Bad input (a table without a key, a type with no
converter, an invalidated slot) raises `CaptureFatal`: capture stops without confirming
anything past it, and the CLI exits with code 2 so a supervisor does not restart it in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from aiokafka.errors import KafkaError
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from replicator.config import Config
from replicator.events import ChangeEvent
from replicator.position import INVALID_LSN, Lsn
from replicator.priority import WeddingCalendar
from replicator.source import pgoutput as pg
from replicator.source import slot as slots
from replicator.source.assembler import Assembler, CaptureError, Committed, column_types
from replicator.source.catalog import TableInfo, load_types, table_info
from replicator.source.snapshot import snapshot_table
from replicator.source.stream import (
    Backoff,
    ReplicationStream,
    SlotError,
    SourceError,
    negotiate_protocol,
)
from replicator.source.values import TypeRegistry, UnknownTypeError, ValueConversionError
from replicator.transport.avro import EventCodec
from replicator.transport.control import CaptureState, last_transaction_lsn
from replicator.transport.kafka import (
    EventProducer,
    ProducerError,
    ensure_topics,
    transactions_topic,
)
from replicator.transport.watermark import AckWatermark

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "wedsync-replicator.heartbeat"


class CaptureFatal(RuntimeError):
    """Capture cannot go on without an operator: the message says what to do."""


@dataclass
class CaptureStats:
    """What `status` and the metrics show about capture."""

    transactions: int = 0
    events: int = 0
    snapshot_rows: int = 0
    confirmed_lsn: Lsn = INVALID_LSN
    received_lsn: Lsn = INVALID_LSN
    server_lsn: Lsn = INVALID_LSN
    last_commit_ts_us: int = 0
    last_heartbeat_rtt_s: float | None = None
    reconnects: int = 0
    events_by_tier: dict[str, int] = field(default_factory=dict)


class Capture:
    def __init__(self, config: Config, *, accept_gap: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.accept_gap = accept_gap
        self.clock = clock
        src = config.source
        password = src.password.get_secret_value() if src.password else None
        self.dsn = make_conninfo(src.dsn, password=password) if password else src.dsn
        self.db = str(conninfo_to_dict(src.dsn).get("dbname") or "postgres")
        self.registry = TypeRegistry()
        self.calendar = WeddingCalendar(config.priority)
        self.stats = CaptureStats()
        self.state = CaptureState(config.kafka.bootstrap_servers, config.kafka.topic_prefix,
                                  config.kafka.replication_factor)
        self.codec = EventCodec()
        self.producer = EventProducer(config.kafka, self.codec)
        self.watermark = AckWatermark()
        self.tables: dict[str, TableInfo] = {}
        self.server_version = 0
        self._stopping = asyncio.Event()
        self._heartbeat_sent: dict[str, float] = {}
        self._failing_since: float | None = None
        self._backoff = Backoff(max_s=config.source.reconnect_max_backoff_s)

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking new changes; `run` then drains, confirms and returns."""
        self._stopping.set()

    async def run(self) -> None:
        try:
            await self._prepare()
            await self.producer.start()
            start_lsn = await self._slot_and_snapshots()
            await self._stream_forever(start_lsn)
        except (CaptureError, UnknownTypeError, ValueConversionError, slots.SourceConfigError,
                SlotError) as exc:
            raise CaptureFatal(str(exc)) from exc
        finally:
            await self.producer.stop()
            await self.state.close()

    # --- steps 1-4 ------------------------------------------------------------------------

    async def _prepare(self) -> None:
        src, kafka = self.config.source, self.config.kafka
        info = await slots.check_server(self.dsn, slot=src.slot)
        self.server_version = info.version_num
        tables = await slots.ensure_publication(self.dsn, src.publication, src.tables)
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await load_types(conn, self.registry)
            for qualified in tables:
                self.tables[qualified] = await table_info(conn, qualified)
            await self.calendar.warm(conn)
        await ensure_topics(kafka.bootstrap_servers, kafka.topic_prefix, kafka.partitions,
                            kafka.replication_factor)
        await self.state.load()
        log.info("capturing %d tables of publication %s", len(self.tables), src.publication)

    async def _slot_and_snapshots(self) -> Lsn:
        src = self.config.source
        status = await slots.slot_status(self.dsn, src.slot)
        recorded = self.state.slot
        if status is None and recorded is not None and not self.accept_gap:
            raise CaptureFatal(
                f"replication slot {src.slot!r} is gone, but this capture created it at "
                f"{Lsn(recorded['created_lsn'])}: changes since the last confirmed position may "
                f"be lost. Nothing was changed. To start again with a new slot and a full "
                f"snapshot, recording the gap in the archive, run again with --accept-gap.")
        if status is not None:
            slots.check_slot_usable(status, src.slot, self.db)
            pending = [t for t in self.tables if self.state.snapshot_done(t) is None]
            if pending and src.snapshot == "initial":
                await self.snapshot_with_temporary_slot(pending)
            return status.confirmed_flush_lsn or status.restart_lsn or Lsn(0)
        last = (await last_transaction_lsn(self.config.kafka.bootstrap_servers,
                                           transactions_topic(self.config.kafka.topic_prefix))
                if recorded is not None else None)
        failover = self.server_version >= 170000
        async with slots.create_slot(self.dsn, src.slot, two_phase=src.two_phase,
                                     failover=failover) as created:
            system = await self._system_id()
            await self.state.mark_slot(src.slot, created.consistent_point, system)
            if recorded is not None:
                start = last if last is not None else Lsn(recorded["created_lsn"])
                await self.state.record_gap(start, created.consistent_point,
                                            f"slot {src.slot} lost; operator accepted the gap")
                log.warning("recorded a gap from %s to %s", start, created.consistent_point)
            if src.snapshot == "initial":
                tables = list(self.tables) if recorded is not None else [
                    t for t in self.tables if self.state.snapshot_done(t) is None]
                await self._snapshot(tables, created.snapshot_name, created.consistent_point)
        return created.consistent_point

    async def _system_id(self) -> str:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT system_identifier::text FROM pg_control_system()")
            row = await cur.fetchone()
        return str(row[0]) if row else ""

    async def snapshot_with_temporary_slot(self, tables: list[str],
                                           where: dict[str, Any] | None = None) -> Lsn:
        """Snapshot *tables* at a fresh consistent point while the main slot keeps its place."""
        name = f"{self.config.source.slot}_snap_{int(time.time())}"[:63]
        async with slots.create_slot(self.dsn, name, temporary=True) as created:
            await self._snapshot(tables, created.snapshot_name, created.consistent_point)
        return created.consistent_point

    async def _snapshot(self, tables: list[str], snapshot_name: str, lsn: Lsn) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot_name}'")
            for table in tables:
                rows = await self._snapshot_one(conn, self.tables[table], lsn)
                await self.state.mark_snapshot(table, lsn, rows)
                log.info("snapshot of %s: %d rows at %s", table, rows, lsn)
            await conn.execute("COMMIT")

    async def _snapshot_one(self, conn: psycopg.AsyncConnection[Any], info: TableInfo,
                            lsn: Lsn) -> int:
        rows = 0
        futures: list[asyncio.Future[Any]] = []
        kinds = column_types(info.columns, self.registry)
        async for batch in snapshot_table(conn, info, self.registry, lsn=lsn, db=self.db):
            for event in batch:
                self.calendar.classify(event)
                futures.append(await self.producer.send_event(event, kinds))
            rows += len(batch)
            self.stats.snapshot_rows += len(batch)
        # The table counts as snapshotted only once Kafka holds every row.
        await self.producer.flush()
        for future in futures:
            await future
        return rows

    # --- steps 5-7 ------------------------------------------------------------------------

    async def _stream_forever(self, start_lsn: Lsn) -> None:
        backoff = self._backoff
        position = start_lsn
        while not self._stopping.is_set():
            try:
                await self._stream_once(position)
                return
            except (SourceError, ProducerError, OSError, psycopg.OperationalError,
                    KafkaError) as exc:
                if isinstance(exc, SlotError) and not exc.retriable:
                    raise
                self.stats.reconnects += 1
                if self._failing_since is None:
                    self._failing_since = self.clock()
                    log.warning("capture stream failed, reconnecting: %s", exc)
                status = await slots.slot_status(self.dsn, self.config.source.slot)
                if status is None:
                    raise CaptureFatal(f"replication slot {self.config.source.slot!r} "
                                       "disappeared while capturing") from exc
                slots.check_slot_usable(status, self.config.source.slot, self.db)
                position = status.confirmed_flush_lsn or position
                # A failed delivery poisons the producer (partition order is no longer
                # trusted): start a fresh one and resend from the slot's position.
                await self.producer.stop()
                self.producer = EventProducer(self.config.kafka, self.codec)
                self.watermark = AckWatermark()
                delay = backoff.next_delay()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def _stream_once(self, start_lsn: Lsn) -> None:
        src = self.config.source
        proto = negotiate_protocol(self.server_version, src.protocol_version)
        streaming = ("parallel" if proto >= 4 else "on") if src.streaming and proto >= 2 else None
        await self.producer.start()
        decoder = pg.Decoder(proto)
        assembler = Assembler(db=self.db, registry=self.registry,
                              primary_keys={t: i.primary_key for t, i in self.tables.items()},
                              on_message=self._on_message)
        async with ReplicationStream(
            self.dsn, slot=src.slot, publication=src.publication, start_lsn=start_lsn,
            protocol_version=proto, streaming=streaming, two_phase=src.two_phase,
            status_interval_s=src.status_interval_s,
        ) as stream:
            log.info("streaming slot %s from %s (pgoutput v%d)", src.slot, start_lsn, proto)
            if self._failing_since is not None:
                log.warning("capture stream recovered after %.1fs",
                            self.clock() - self._failing_since)
                self._failing_since = None
                self._backoff.reset()
            heartbeat = asyncio.create_task(self._heartbeat())
            try:
                while not self._stopping.is_set():
                    reading = asyncio.ensure_future(stream.read_batch())
                    stopping = asyncio.ensure_future(self._stopping.wait())
                    done, _ = await asyncio.wait({reading, stopping},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if reading not in done:
                        reading.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await reading
                        break
                    stopping.cancel()
                    for message in reading.result():
                        decoded = decoder.decode(message.payload, lsn=message.wal_start)
                        committed = assembler.feed(decoded)
                        if committed is not None:
                            await self._publish(committed, assembler)
                    self._confirm(stream, assembler)
                    self._raise_if_failed()
                await self._drain(stream, assembler)
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat

    async def _publish(self, tx: Committed, assembler: Assembler) -> None:
        record, events = tx.record, tx.events
        self.stats.transactions += 1
        self.stats.last_commit_ts_us = record.commit_ts_us
        watermark = self.watermark
        if not events:
            # Nothing to send (a heartbeat, or only unpublished tables): confirmable as soon
            # as everything before it is.
            watermark.idle_lsn(record.end_lsn)
            return
        commit_lsn = record.commit_lsn
        watermark.begin_tx(commit_lsn, record.end_lsn, len(events) + 1)
        kinds = assembler.column_kinds
        for event in events:
            self.calendar.classify(event)
            self._count(event)
            delivery = await self.producer.send_event(event, kinds.get(event.qualified_table))
            watermark.track(commit_lsn, delivery)
        watermark.track(commit_lsn, await self.producer.send_transaction(record))
        self.stats.events += len(events)

    def _count(self, event: ChangeEvent) -> None:
        tier = event.tier.value
        self.stats.events_by_tier[tier] = self.stats.events_by_tier.get(tier, 0) + 1

    def _raise_if_failed(self) -> None:
        if self.watermark.failed_at is not None:
            failure = self.watermark.failure
            raise SourceError(f"Kafka delivery failed at {self.watermark.failed_at}; resuming "
                              f"from the slot's confirmed position: {failure!r}") from failure

    def _confirm(self, stream: ReplicationStream, assembler: Assembler) -> None:
        lsn = self.watermark.confirmable()
        floor = assembler.confirm_floor()
        if lsn is not None and (floor is None or lsn < floor):
            stream.confirm(lsn)
        if assembler.idle and self.watermark.pending_transactions == 0:
            # Nothing open and everything acknowledged: the latest keepalive's position may
            # be confirmed too, so the slot advances while only other tables are written.
            stream.confirm_keepalive_if_idle(True)
        self.stats.confirmed_lsn = stream.confirmed_lsn
        self.stats.received_lsn = stream.received_lsn
        self.stats.server_lsn = stream.server_wal_end

    async def _drain(self, stream: ReplicationStream, assembler: Assembler) -> None:
        """Shutdown: wait for Kafka's acknowledgements within the deadline, confirm, return."""
        deadline = self.config.shutdown_deadline_s
        try:
            await asyncio.wait_for(self.producer.flush(), deadline)
        except TimeoutError:
            log.warning("Kafka did not acknowledge everything within %.0fs; the unconfirmed "
                        "transactions will be sent again on restart", deadline)
        await asyncio.sleep(0)  # let delivery callbacks run
        self._confirm(stream, assembler)
        await stream.flush_status()
        log.info("capture stopped at confirmed LSN %s", self.stats.confirmed_lsn)

    # --- heartbeat ------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """A logical message on a schedule: it travels through the slot like a change, so a
        quiet database with busy neighbours still moves the confirmed position, and its
        round trip measures how far behind the stream is."""
        interval = self.config.source.heartbeat_interval_s
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while True:
                token = f"{time.time_ns()}"
                self._heartbeat_sent[token] = self.clock()
                await conn.execute("SELECT pg_logical_emit_message(true, %s, %s)",
                                   (HEARTBEAT_PREFIX, token))
                await asyncio.sleep(interval)

    def _on_message(self, message: pg.LogicalMessage) -> None:
        if message.prefix != HEARTBEAT_PREFIX:
            return
        sent = self._heartbeat_sent.pop(message.content.decode(errors="replace"), None)
        if sent is not None:
            self.stats.last_heartbeat_rtt_s = self.clock() - sent
