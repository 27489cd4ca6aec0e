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
position after a capped, jittered backoff, which grows until Kafka acknowledges a transaction
again (a reconnect alone is not a recovery). Every step of a reconnect (the slot's status, a
fresh producer, topics deleted meanwhile created again) is inside that loop, and meanwhile
`not_ready` holds the reason `/readyz` shows. At start, a server or broker that does not
answer is waited for the same way (logged once); a database, role or password the server
refuses is the configuration's fault (`SourceConfigError`, exit 2). The lag metric is read
from the server (`pg_current_wal_lsn()` minus the slot's `confirmed_flush_lsn`), so it grows
while capture is stuck. A change larger than `kafka.claim_check_bytes` goes to the claims
store (`transport.kafka.ClaimCheck`). Bad input (a table without a key, a type with no
converter, an invalidated slot) raises `CaptureFatal`: capture stops without confirming
anything past it, and the CLI exits with code 2 so a supervisor does not restart it in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

import psycopg
from aiokafka.errors import KafkaError
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from replicator.config import Config
from replicator.errors import OperatorError, TransientError
from replicator.events import Tier, TransactionRecord, is_restore_staging, split_qualified
from replicator.position import INVALID_LSN, Lsn
from replicator.priority import WeddingCalendar
from replicator.source import ddl
from replicator.source import pgoutput as pg
from replicator.source import slot as slots
from replicator.source.assembler import Assembler, CaptureError, Committed, column_types
from replicator.source.catalog import TableInfo, load_types, table_info
from replicator.source.ddl import SchemaHistory
from replicator.source.snapshot import (
    SnapshotResult,
    snapshot_record,
    snapshot_table,
)
from replicator.source.stream import (
    Backoff,
    ReplicationStream,
    SlotError,
    SourceError,
    negotiate_protocol,
)
from replicator.source.values import TypeRegistry, UnknownTypeError, ValueConversionError
from replicator.transport.avro import EventCodec, digest_text
from replicator.transport.control import CaptureState, last_transaction_lsn
from replicator.transport.kafka import (
    ClaimCheck,
    EventProducer,
    claims_opener,
    ensure_topics,
    transactions_topic,
)
from replicator.transport.watermark import AckWatermark

log = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "wedsync-replicator.heartbeat"


class CaptureFatal(OperatorError):
    """Capture cannot go on without an operator: the message says what to do."""


#: Bad input or configuration: retrying cannot help, so they become `CaptureFatal`.
OPERATOR_ERRORS = (CaptureError, UnknownTypeError, ValueConversionError,
                   slots.SourceConfigError, SlotError)
#: What a reconnect waits out (a non-retriable `SlotError` excepted): a server, the network or
#: Kafka not answering now.
RETRIED = (SourceError, TransientError, OSError, psycopg.OperationalError, KafkaError)
#: How often the lag is read from the server at most.
LAG_POLL_S = 5.0
T = TypeVar("T")


def _ignore_delivery(error: BaseException | None) -> None:
    """A snapshot row's delivery report: a failure is already the producer's (`flush`)."""


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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
    heartbeat_transactions: int = 0
    reconnects: int = 0
    slot_lag_bytes: int | None = None  # from the server; None until read
    events_by_tier: dict[str, int] = field(default_factory=dict)


#: Called once a table's snapshot rows are all acknowledged: (table, lsn, rows).
SnapshotRecorder = Callable[[str, Lsn, int], Awaitable[None]]
Boundary = Literal["now", "deferred", "none"]


class Capture:
    def __init__(self, config: Config, *, accept_gap: bool = False,
                 clock: Callable[[], float] = time.monotonic,
                 environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.environ = os.environ if environ is None else environ
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
        self.claims = None if config.claims_url is None else ClaimCheck(claims_opener(
            config.claims_url, config.encryption.keyring_file, self.environ))
        self.producer = self._new_producer()
        #: Why `/readyz` should say "not ready" now (None: nothing known against it).
        self.not_ready: str | None = None
        self.watermark = AckWatermark()
        self.tables: dict[str, TableInfo] = {}
        self.server_version = 0
        self._stopping = asyncio.Event()
        self._heartbeat_sent: dict[str, float] = {}
        self._heartbeat_in_tx = False  # the transaction being assembled holds a heartbeat
        self._failing_since: float | None = None
        # Snapshot boundary records waiting for the stream to pass their LSN (see _snapshot).
        self._deferred: list[tuple[TransactionRecord, Lsn, str, int, SnapshotRecorder]] = []
        # Each table's schema as last archived, and the DDL history's view of the tables.
        self.history = SchemaHistory(self.dsn, captured=self._captured)
        self._all_tables = False  # the publication is FOR ALL TABLES
        self._resnapshot_due: set[str] = set()  # tables a DDL rewrote, renamed or created
        self._backoff = Backoff(max_s=config.source.reconnect_max_backoff_s)

    # --- lifecycle ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking new changes; `run` then drains, confirms and returns."""
        self._stopping.set()

    async def run(self) -> None:
        lag: asyncio.Task[None] | None = None
        if not self.config.priority.calendar:
            log.warning("no wedding calendar is configured ([priority] absent or "
                        "weddings_table empty): every change gets the default tier, %s",
                        self.config.priority.default_tier.value)
        try:
            await self._until_answered(self._prepare, "PostgreSQL or Kafka")
            if self._stopping.is_set():
                return
            lag = asyncio.create_task(self._watch_lag(), name="capture-lag")
            # A snapshot cut short starts again (through a temporary slot, as on a restart).
            start_lsn = await self._until_answered(self._slot_and_snapshots,
                                                   "PostgreSQL or Kafka")
            if start_lsn is None:
                return
            # Everything allocated so far lives as long as the process: keep it out of the
            # collector's sight (measured: about 20% less CPU per change while streaming).
            gc.freeze()
            await self._stream_forever(start_lsn)
        except OPERATOR_ERRORS as exc:
            raise CaptureFatal(str(exc)) from exc
        finally:
            if lag is not None:
                lag.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lag
            await self.producer.stop()
            await self.state.close()
            if self.claims is not None:
                await self.claims.close()

    def _new_producer(self) -> EventProducer:
        return EventProducer(self.config.kafka, self.codec, claims=self.claims)

    async def _until_answered(self, step: Callable[[], Awaitable[T]], what: str) -> T | None:
        """Run *step* until it gets through: a service that does not answer is waited for
        under capped, jittered backoff, logged once and shown by `/readyz`; what only an
        operator can fix raises at once. None when stopped first."""
        backoff = Backoff(max_s=self.config.source.reconnect_max_backoff_s)
        since: float | None = None
        while not self._stopping.is_set():
            try:
                result = await step()
            except RETRIED as exc:
                if isinstance(exc, SlotError) and not exc.retriable:
                    raise
                if since is None:
                    since = self.clock()
                    log.warning("%s does not answer (%s); retrying with backoff until it "
                                "does", what, _line(exc))
                self.not_ready = f"{what} does not answer: {_line(exc)}"
                await self._pause(backoff)
                continue
            if since is not None:
                log.warning("%s answered after %.1fs", what, self.clock() - since)
            self.not_ready = None
            return result
        return None

    async def _pause(self, backoff: Backoff) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), backoff.next_delay())

    async def _watch_lag(self) -> None:
        """`stats.slot_lag_bytes` from the server, every few seconds, for as long as capture
        runs (a failure keeps the last value and connects again)."""
        interval = min(LAG_POLL_S, self.config.source.heartbeat_interval_s)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.dsn, autocommit=True) as conn:
                    while True:
                        lag = await slots.slot_lag(conn, self.config.source.slot)
                        if lag is not None:
                            self.stats.slot_lag_bytes = lag
                        await asyncio.sleep(interval)
            except psycopg.Error:
                await asyncio.sleep(interval)

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
            cur = await conn.execute("SELECT puballtables FROM pg_publication "
                                     "WHERE pubname = %s", (src.publication,))
            self._all_tables = bool((await cur.fetchone() or (False,))[0])
            await self.calendar.warm(conn)
        self.history.triggers = await ddl.install(self.dsn)
        await ensure_topics(kafka.bootstrap_servers, kafka.topic_prefix, kafka.partitions,
                            kafka.replication_factor, max_message_bytes=kafka.max_message_bytes)
        await self.state.load()
        await self.producer.start()
        log.info("capturing %d tables of publication %s", len(self.tables), src.publication)

    async def _slot_and_snapshots(self) -> Lsn:
        src = self.config.source
        self._deferred = []  # a retry: rows without their boundary record are never a base
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
                await self.snapshot_with_temporary_slot(pending, boundary="deferred")
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
                async with self._snapshot_transaction(created.snapshot_name) as conn:
                    # Warmed inside the export: the calendar is exactly right where the
                    # stream starts.
                    await self._snapshot(conn, tables, created.consistent_point,
                                         record=self._record_initial, calendar=self.calendar,
                                         boundary="now")
        return created.consistent_point

    async def _system_id(self) -> str:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT system_identifier::text FROM pg_control_system()")
            row = await cur.fetchone()
        return str(row[0]) if row else ""

    # --- snapshots: one path for the initial, the resumed and the on-demand snapshot -------
    #
    # Every snapshot is `_snapshot` inside a REPEATABLE READ transaction that imported a slot's
    # exported snapshot (`_snapshot_transaction`), its rows positioned at `(consistent_point, n)`:
    # - initial: the capture slot's own export at creation, recorded as `snapshot/<table>`;
    # - resumed (a table whose initial snapshot was cut short, or added later): a temporary
    #   slot's export (`snapshot_with_temporary_slot`), recorded as `snapshot/<table>`;
    # - on demand (`snapshot_on_demand`, one table or one wedding, from a separate process
    #   while `run` streams): a temporary slot's export with WHERE filters, recorded as
    #   `ondemand/<lsn>/<table>[/wedding/<id>]`, never as the initial snapshot's records.

    async def snapshot_with_temporary_slot(
        self, tables: Sequence[str], where: Mapping[str, sql.Composable] | None = None, *,
        record: SnapshotRecorder | None = None, calendar: WeddingCalendar | None = None,
        boundary: Boundary = "none",
    ) -> SnapshotResult:
        """Snapshot *tables* at a fresh consistent point while the main slot keeps its place.

        *where* restricts a table's rows (a table not in it is read whole). *record* is called
        once a table's rows are all acknowledged by Kafka; by default it records the table's
        initial snapshot as done, which only an unfiltered snapshot may do. *calendar*: see
        `_snapshot`. The temporary slot lives only until the snapshot is imported: the reading
        transaction holds the snapshot itself, so the slot (and its WAL sender) are not held
        for the whole COPY. Creating it waits for the transactions running at that moment.
        """
        if record is None:
            if where:
                raise ValueError("a filtered snapshot cannot stand for a table's initial "
                                 "snapshot: give `record`")
            record = self._record_initial
        async with contextlib.AsyncExitStack() as stack:
            async with slots.create_slot(self.dsn, self._temporary_slot_name(),
                                         temporary=True) as created:
                conn = await stack.enter_async_context(
                    self._snapshot_transaction(created.snapshot_name))
            result = await self._snapshot(conn, tables, created.consistent_point, where=where,
                                          record=record, calendar=calendar, boundary=boundary)
        return result

    def _temporary_slot_name(self) -> str:
        # Unique per call, so on-demand snapshots (several processes) never collide.
        return f"{self.config.source.slot[:40]}_snap_{secrets.token_hex(6)}"

    @contextlib.asynccontextmanager
    async def _snapshot_transaction(
            self, snapshot_name: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection inside a read-only REPEATABLE READ transaction showing exactly the
        data of the exported snapshot *snapshot_name*."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            await conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                sql.Literal(snapshot_name)))
            yield conn
            await conn.execute("COMMIT")

    async def _record_initial(self, table: str, lsn: Lsn, rows: int) -> None:
        await self.state.mark_snapshot(table, lsn, rows)

    def _snapshot_order(self, tables: Sequence[str]) -> list[str]:
        """The weddings table first, then the parent tables, then the others as given: the
        calendar learns a wedding's date and a parent's wedding before their rows are
        classified."""
        c = self.config.priority
        parents = {link.parent for link in c.tables.values() if link.parent is not None}
        return sorted(tables, key=lambda t: 0 if t == c.weddings_table else
                      1 if t in parents else 2)

    async def _snapshot(self, conn: psycopg.AsyncConnection[Any], tables: Sequence[str],
                        lsn: Lsn, *, record: SnapshotRecorder,
                        where: Mapping[str, sql.Composable] | None = None,
                        calendar: WeddingCalendar | None = None,
                        boundary: Boundary = "none") -> SnapshotResult:
        """Publish *tables* (read through *conn*, inside the snapshot's transaction) as op `r`
        events at `(lsn, n)`; call *record* for each table once Kafka holds all its rows.

        *calendar* classifies the rows after being warmed inside the snapshot, so it shows
        exactly the snapshot's weddings; without one, the capture's own calendar is used as it
        is (warmed at start-up, kept current by the stream).

        *boundary* says when the table's boundary record goes to the transactions topic (the
        sinks count a snapshot's rows with it, as they count a transaction's changes):
        `now` for the initial snapshot (nothing streamed can be older than it); `deferred`
        for a snapshot through a temporary slot before streaming resumes, whose LSN is ahead
        of the stream: its record waits until the stream passes that LSN, so the topic stays
        in commit order, and *record* waits with it; `none` for on-demand snapshots, which
        are extra copies outside the checkpoint's accounting.
        """
        if calendar is not None:
            await calendar.warm(conn)
        result = SnapshotResult(lsn)
        seq = 0
        for table in self._snapshot_order(tables):
            info = self.tables.get(table)
            if info is None:  # dropped or renamed meanwhile: its DDL in the stream says so
                continue
            await conn.execute("SAVEPOINT replicator_snapshot_table")
            try:
                tiers = await self._snapshot_one(conn, info, lsn, first_seq=seq,
                                                 where=(where or {}).get(table),
                                                 calendar=calendar)
            except psycopg.errors.UndefinedTable:
                # Dropped before its rows could be read: there is nothing to snapshot, and
                # the DROP is in the stream (a restore of it before the drop is refused).
                await conn.execute("ROLLBACK TO SAVEPOINT replicator_snapshot_table")
                log.warning("%s was dropped before its snapshot was read: left out", table)
                continue
            await conn.execute("RELEASE SAVEPOINT replicator_snapshot_table")
            rows = sum(tiers.values())
            seq += rows
            result.rows[table] = rows
            result.tiers.update(tiers)
            boundary_record = snapshot_record(lsn, table, tiers)
            if boundary != "none":
                await self._publish_schema(conn, info, lsn)
            if boundary == "deferred":
                self._deferred.append((boundary_record, lsn, table, rows, record))
            else:
                if boundary == "now":
                    await (await self.producer.send_transaction(boundary_record))
                await record(table, lsn, rows)
            log.info("snapshot of %s: %d rows at %s", table, rows, lsn)
        return result

    async def _publish_schema(self, conn: psycopg.AsyncConnection[Any], info: TableInfo,
                              lsn: Lsn) -> None:
        """Record a snapshotted table's schema at *lsn*, read through the snapshot's own
        connection (the catalog exactly as of the snapshot); waits for Kafka's ack."""
        desc = await ddl.describe(conn, info.oid)
        if desc is not None:
            desc = ddl.with_previous_names(desc, self.history.described.get(info.oid))
            self.history.recorded(desc, streamed=False)
            await (await self.producer.send_schema(ddl.document(desc, lsn, "snapshot")))

    def _captured(self, table: str) -> bool:
        if is_restore_staging(split_qualified(table)[0]):
            return False  # a replay's staging table (`events.is_restore_staging`)
        return table in self.tables or table in self.history.signatures or (
            self._all_tables and not table.startswith(("pg_temp", "pg_toast")))

    async def _archive_ddl(self, tx: Committed, lsn: Lsn) -> None:
        """The transaction's DDL (`source.ddl`), then its Relation messages, as schema
        documents at its commit LSN, each acknowledged before its changes are sent. A table
        a DDL rewrote, renamed or created is marked for a re-snapshot in the state topic
        first, so a restart takes it even if this process does not get to."""
        outcome = self.history.ddl(tx.ddl, lsn) if tx.ddl else ddl.DdlOutcome()
        for table in outcome.resnapshot:
            done = self.state.snapshot_done(table)
            if done is not None and done > lsn:
                continue  # a DDL sent again after a restart, snapshotted since
            await self.state.mark_resnapshot_due(table, lsn)
            self._resnapshot_due.add(table)
        for table in outcome.dropped:
            self.tables.pop(table, None)
            self._resnapshot_due.discard(table)
        for doc in outcome.documents:
            log.info("schema of %s archived at %s (%s%s)", doc["table"], lsn,
                     doc.get("command") or "DDL",
                     ", re-snapshot follows" if doc.get("resnapshot") else "")
            await (await self.producer.send_schema(doc))
        for relation in tx.relations:
            announced = await self.history.relation(relation, lsn)
            if announced is not None:
                await (await self.producer.send_schema(announced))

    async def _resnapshots(self) -> None:
        """Snapshot again, through a temporary slot, each table a DDL rewrote, renamed or
        created, while the stream goes on; its boundary record is deferred until the stream
        passes its LSN (`_snapshot`), so replay is exact for the table from there on."""
        while True:
            await asyncio.sleep(0.5)
            if not self._resnapshot_due:
                continue
            due = sorted(self._resnapshot_due)
            async with await psycopg.AsyncConnection.connect(self.dsn,
                                                             autocommit=True) as conn:
                for table in due:
                    try:
                        self.tables[table] = await table_info(conn, table)
                    except LookupError:  # dropped or renamed again since: its DDL says so
                        self._resnapshot_due.discard(table)
            due = [t for t in due if t in self._resnapshot_due]
            if due:
                await self.snapshot_with_temporary_slot(due, boundary="deferred")
                self._resnapshot_due.difference_update(due)

    async def _emit_deferred(self) -> None:
        """The stream has passed the deferred snapshots' LSN: send their boundary records
        (in commit order now) and only then record the tables as snapshotted."""
        deferred, self._deferred = self._deferred, []
        for boundary_record, lsn, table, rows, record in deferred:
            await (await self.producer.send_transaction(boundary_record))
            await record(table, lsn, rows)

    async def _snapshot_one(self, conn: psycopg.AsyncConnection[Any], info: TableInfo,
                            lsn: Lsn, *, first_seq: int = 0,
                            where: sql.Composable | None = None,
                            calendar: WeddingCalendar | None = None) -> Counter[Tier]:
        """Send the (matching) rows of one table; return once Kafka acknowledged every one.
        Returns the number of rows sent to each tier."""
        calendar = calendar or self.calendar
        tiers: Counter[Tier] = Counter()
        kinds = column_types(info.columns, self.registry)
        publish = self.producer.publish_event
        # No future per row: a failed delivery is recorded by the producer, which refuses
        # the next send and makes `flush` raise. Memory is bounded by librdkafka's queue
        # (a full queue makes the send wait), not by the table.
        async for batch in snapshot_table(conn, info, self.registry, lsn=lsn, db=self.db,
                                          where=where, first_seq=first_seq):
            for event in batch:
                calendar.classify(event)
                tiers[event.tier] += 1
                await publish(event, kinds, None, _ignore_delivery)
            self.stats.snapshot_rows += len(batch)
        # The table counts as snapshotted only once Kafka holds every row.
        await self.producer.flush()
        return tiers

    # --- on-demand snapshot (a separate process next to `run`: `replicator.ondemand`) -----

    async def snapshot_on_demand(self, *, table: str | None = None,
                                 wedding: str | None = None) -> SnapshotResult:
        """One captured table, or every row of one wedding, at a fresh consistent point while
        `replicator run` goes on streaming (`replicator.ondemand.snapshot_on_demand`)."""
        from replicator.ondemand import snapshot_on_demand
        return await snapshot_on_demand(self, table=table, wedding=wedding)

    # --- steps 5-7 ------------------------------------------------------------------------

    async def _stream_forever(self, start_lsn: Lsn) -> None:
        """Stream until stopped; every failure, in the stream or in the reconnect's own steps,
        is retried after the backoff (see the module docstring)."""
        position, resume = start_lsn, False
        while not self._stopping.is_set():
            try:
                if resume:
                    position = await self._resume_position(position)
                await self._stream_once(position)
                return
            except RETRIED as exc:
                if isinstance(exc, SlotError) and not exc.retriable:
                    raise
                self.stats.reconnects += 1
                self.not_ready = f"capture is reconnecting: {_line(exc)}"
                if self._failing_since is None:
                    self._failing_since = self.clock()
                    log.warning("capture stream failed, reconnecting: %s", _line(exc))
                resume = True
                await self._pause(self._backoff)

    async def _resume_position(self, position: Lsn) -> Lsn:
        """The slot's confirmed position (the slot checked usable), a fresh producer and
        watermark (a failed delivery poisons the producer: partition order is no longer
        trusted), and the topics again (one deleted meanwhile is created anew)."""
        src, kafka = self.config.source, self.config.kafka
        status = await slots.slot_status(self.dsn, src.slot)
        if status is None:
            raise CaptureFatal(f"replication slot {src.slot!r} disappeared while capturing")
        slots.check_slot_usable(status, src.slot, self.db)
        await self.producer.stop()
        self.producer = self._new_producer()
        self.watermark = AckWatermark()
        await ensure_topics(kafka.bootstrap_servers, kafka.topic_prefix, kafka.partitions,
                            kafka.replication_factor, max_message_bytes=kafka.max_message_bytes)
        return status.confirmed_flush_lsn or position

    def _recovered(self) -> None:
        """Kafka acknowledged a transaction after a failure: only now the backoff resets."""
        assert self._failing_since is not None
        log.warning("capture recovered after %.1fs", self.clock() - self._failing_since)
        self._failing_since = None
        self._backoff.reset()
        self.not_ready = None

    async def _stream_once(self, start_lsn: Lsn) -> None:
        src = self.config.source
        proto = negotiate_protocol(self.server_version, src.protocol_version)
        streaming = ("parallel" if proto >= 4 else "on") if src.streaming and proto >= 2 else None
        await self.producer.start()
        decoder = pg.Decoder(proto)
        # Replicated-in changes left out: by the server from PostgreSQL 16 (pgoutput's
        # `origin 'none'`), else by the assembler.
        skip = src.replicated_changes == "skip"
        by_server = skip and self.server_version >= 160000
        assembler = Assembler(db=self.db, registry=self.registry,
                              primary_keys={t: i.primary_key for t, i in self.tables.items()},
                              on_message=self._on_message,
                              spill_bytes=src.spill_threshold_mb << 20, spill_dir=src.spill_dir,
                              skip_replicated=skip and not by_server)
        async with ReplicationStream(
            self.dsn, slot=src.slot, publication=src.publication, start_lsn=start_lsn,
            protocol_version=proto, streaming=streaming, two_phase=src.two_phase,
            status_interval_s=src.status_interval_s, origin="none" if by_server else None,
        ) as stream:
            log.info("streaming slot %s from %s (pgoutput v%d)", src.slot, start_lsn, proto)
            heartbeat = asyncio.create_task(self._heartbeat())
            resnapshots = asyncio.create_task(self._resnapshots())
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
                    assembler.bound_memory()  # a large open transaction spills to disk
                    self._confirm(stream, assembler)
                    self._raise_if_failed()
                    if self._failing_since is not None and self.watermark.confirmable():
                        self._recovered()
                    for task in (heartbeat, resnapshots):
                        if task.done():
                            # Its connection dropped: surface the error; streaming restarts
                            # (and the task with it) after the usual backoff.
                            task.result()
                await self._drain(stream, assembler)
            finally:
                for task in (heartbeat, resnapshots):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _publish(self, tx: Committed, assembler: Assembler) -> None:
        record, events = tx.record, tx.events
        if self._deferred and record.commit_lsn > self._deferred[0][1]:
            await self._emit_deferred()
        if tx.ddl or tx.relations:
            await self._archive_ddl(tx, record.commit_lsn)
        self.stats.transactions += 1
        self.stats.last_commit_ts_us = record.commit_ts_us
        watermark = self.watermark
        heartbeat, self._heartbeat_in_tx = self._heartbeat_in_tx, False
        if not events and not heartbeat:
            # Nothing to send (only unpublished tables): confirmable as soon as everything
            # before it is.
            watermark.idle_lsn(record.end_lsn)
            return
        if not events:
            # A heartbeat's transaction: its (empty) record moves the sinks' checkpoints on a
            # quiet database, so `latest` and `verify --against` reach the present.
            watermark.begin_tx(record.commit_lsn, record.end_lsn, 1)
            watermark.track(record.commit_lsn, await self.producer.send_transaction(record))
            self.stats.heartbeat_transactions += 1
            return
        commit_lsn = record.commit_lsn
        watermark.begin_tx(commit_lsn, record.end_lsn, len(events) + 1)
        kinds = assembler.column_kinds
        tiers: dict[str, int] = {}
        digests: dict[str, int] = {}
        delivered = partial(watermark.delivered, commit_lsn)  # one per transaction
        classify, publish = self.calendar.classify, self.producer.publish_event
        for event in events:
            classify(event)
            tier = str(event.tier)
            tiers[tier] = tiers.get(tier, 0) + 1
            await publish(event, kinds.get(event.qualified_table), digests, delivered)
        record.tier_counts = tiers
        record.digests = {table: digest_text(total) for table, total in digests.items()}
        await self.producer.publish_transaction(record, delivered)
        self.stats.events += len(events)
        by_tier = self.stats.events_by_tier
        for tier, count in tiers.items():
            by_tier[tier] = by_tier.get(tier, 0) + count

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
        if message.transactional:
            self._heartbeat_in_tx = True
        sent = self._heartbeat_sent.pop(message.content.decode(errors="replace"), None)
        if sent is not None:
            self.stats.last_heartbeat_rtt_s = self.clock() - sent
