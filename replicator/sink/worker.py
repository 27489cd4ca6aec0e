"""One destination's sink: Kafka -> segments in an object store, compressed and encrypted.

Each destination is its own consumer group (`<prefix>.sink.<destination>`) over the four tier
topics and the transactions topic, so a slow or failing destination never holds back another.

Buffers are kept per tier and table. A tier is flushed when its interval has passed since
its oldest buffered change (critical 5 s, high 30 s, normal 60 s, low 300 s by default), or
when the buffers reach `max_rows` / `max_bytes`. Under backlog, critical partitions are read
first: lower tiers are not read while critical partitions are behind (left out of the read,
not paused, so that the records already fetched for them are kept: `_prioritise`).

A flush, in this order:

1. write the buffered changes as segments, one per table, named by their position range
   (`segments/<table>/<first>-<last>-<digest>.seg`), and the buffered transaction records
   (`transactions/<first>-<last>-<digest>.seg`); writes are create-only, and an existing
   name means the same content was already written;
2. advance the checkpoint over the transactions now complete in this destination and write
   it (`checkpoints/<destination>/<lsn>`);
3. commit the Kafka offsets of records at or below the checkpoint, and only those.

A crash between any two steps repeats work on restart and loses nothing: the checkpoint is
rebuilt from the newest checkpoint object, and every record above it is read again from the
committed offsets (its segments may then exist twice, under different digests; replay
de-duplicates by position).

The digest in a segment's name keeps names unique when two flushes cover the same position
range with different changes (changes of one table arrive from several partitions, in no
particular order across them). Names still sort by position.

Checkpoint objects are sealed and pruned (sink/objects.py). Several processes can share one
destination's partitions (sink/members.py).

Memory is bounded while a destination fails: once its buffers reach `flush.max_rows` or
`flush.max_bytes`, or while its breaker is open, every partition is paused (the consumer
still polls, so it stays in its group) and is resumed once a flush succeeds.

It is bounded under a backlog too. What was written stays in memory (its offset-ledger entry,
its transaction in the completeness tracker) until the checkpoint passes it, and the
checkpoint waits for the slowest partition: transaction records are small and quick to read,
and lower tiers wait while critical partitions are behind, so without a bound the sink would
hold one entry per transaction of the whole backlog. Once `READ_AHEAD_ROWS * flush.max_rows`
records are read and not committed, the partitions already past the lowest commit LSN held
above the checkpoint wait (left out of the read), and those not yet past it are read (even
a lower tier while critical partitions are behind); once every partition is past it or at
its end, the buffers are flushed, the checkpoint passes it and the memory is released.
(Partitions are read in commit order. If the checkpoint still cannot pass with everything
read written, say a parked record's transaction, reading goes on rather than waiting
forever.)

A record that cannot be decoded is parked, not retried: at the next flush it is written as a
dead letter, `deadletters/<topic>/<partition>-<offset>.json` (encrypted JSON: the raw key,
value and headers in base64, the error, where it was read), counted in
`wedsync_sink_dead_letters_total`, and the sink goes on. The checkpoint never claims its
transaction: a change's transaction record counts it, so that transaction never completes
and the checkpoint stays below it (its offset is committed once the dead letter is written);
a parked transaction record or schema belongs to no known transaction, so it holds every
checkpoint where it is, and its offset is never committed (it is parked again after a
restart). Replay past the checkpoint is refused with the dead letters named.

When the group rebalances (a member came or went, or this process was paused past the session
timeout), what was read and not yet written is dropped with its offsets, and a commit refused
because of the rebalance is logged, not raised: the partitions are read again from their
committed offsets (sink/members.py), so nothing is lost and the service keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from connectors.base import ObjectStore, run_bounded
from connectors.errors import StoreError
from replicator.archive.segment import EventFacts, event_facts
from replicator.backoff import Backoff
from replicator.config import DestinationConfig, KafkaConfig
from replicator.crypto import Keyring
from replicator.errors import TransientError
from replicator.events import TIER_ORDER, Tier, TransactionRecord
from replicator.position import INVALID_LSN, Lsn
from replicator.sink.breaker import BreakerState, CircuitBreaker, CircuitOpen, TokenBucket
from replicator.sink.checkpoint import CompletenessTracker
from replicator.sink.claims import ClaimResolver, claim_of
from replicator.sink.conflicts import ConflictWatch, Rules
from replicator.sink.members import ROLES, ProgressReader, ProgressWriter, Revocations, role_of
from replicator.sink.objects import CheckpointObjects, RecordedGaps, dead_letter, lost_range
from replicator.sink.offsets import OffsetLedger, Pending, align, backlog
from replicator.sink.raw import raw_change, raw_transaction
from replicator.sink.shared import SharedDecodes
from replicator.sink.spool import Spool
from replicator.sink.stats import SinkStats
from replicator.sink.writer import ArchiveWriter, Buffered
from replicator.transport.avro import EventCodec, transaction_from_dict
from replicator.transport.control import StateFollower, state_topic
from replicator.transport.kafka import schemas_topic, topic_names, transactions_topic

log = logging.getLogger(__name__)

#: Records behind in a critical partition above which lower tiers are paused.
CRITICAL_BACKLOG = 500
#: Records read and not yet committed (buffered, or written and above the checkpoint) above
#: which the partitions ahead of the checkpoint are paused, in multiples of `flush.max_rows`.
READ_AHEAD_ROWS = 2
#: The group's session timeout: a sink whose heartbeats stop this long (paused, hung) loses
#: its partitions to the group. Segments are encoded and encrypted off the event loop, so the
#: heartbeat goes on through a large flush.
SESSION_TIMEOUT_MS = 30_000
#: Objects a flush writes at once (`connectors.base.run_bounded`).
WRITES_AT_ONCE = 8


_TIER_NAMES = tuple(tier.value for tier in TIER_ORDER)


class SinkWorker:
    def __init__(self, destination: DestinationConfig, kafka: KafkaConfig, store: ObjectStore,
                 keyring: Keyring, *, clock: Any = time.monotonic,
                 claims_url: str | None = None, shared: SharedDecodes[Any] | None = None,
                 conflicts: Rules | None = None) -> None:
        self.destination = destination
        self.kafka = kafka
        self.store = store
        self.keyring = keyring
        self.clock = clock
        self.codec = EventCodec()
        # What the other sinks of this process decoded already (sink/shared.py).
        self.shared: SharedDecodes[Any] = shared or SharedDecodes(1)
        self.stats = SinkStats()
        # Tables with a conflict rule: their changes are decoded and watched (sink/conflicts).
        self.watch = ConflictWatch(conflicts, self.stats) if conflicts else None
        self.breaker = CircuitBreaker()
        self.bucket = TokenBucket(destination.bandwidth_bytes_per_s)
        self.writer = ArchiveWriter(destination, store, keyring, self.bucket, self.stats)
        self.tiers = topic_names(kafka.topic_prefix)
        self.tier_of_topic = {topic: tier for tier, topic in self.tiers.items()}
        self.tx_topic = transactions_topic(kafka.topic_prefix)
        self.schema_topic = schemas_topic(kafka.topic_prefix)
        self.group = f"{kafka.topic_prefix}.sink.{destination.name}"
        self.tracker = CompletenessTracker()
        self._buffers: dict[Tier, dict[str, list[Buffered]]] = {
            t: defaultdict(list) for t in TIER_ORDER}
        self._oldest: dict[Tier, float] = {}
        # Commit times (us) of the oldest buffered change, and of the oldest buffered
        # transaction record with changes, per tier (`_note_pending`).
        self._pending_ts: dict[Tier, int] = {}
        self._tx_pending_ts: dict[Tier, int] = {}
        self._rows = 0
        self._bytes = 0
        # decoded record and its entry in the offset ledger
        self._tx_buffer: list[tuple[dict[str, Any], bytes, Pending]] = []  # record, body
        self._schema_buffer: list[tuple[dict[str, Any], Pending]] = []
        self.offsets = OffsetLedger()  # records read and not yet committed
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self.poll_records = 5000  # records per poll at most
        # Records read and not yet committed, at most (see `_prioritise`).
        self.read_ahead = READ_AHEAD_ROWS * destination.flush.max_rows
        self._read_lsn: dict[TopicPartition, Lsn] = {}  # commit LSN last read, per partition
        self._next_offset: dict[TopicPartition, int] = {}  # where each partition must go on
        self._align_flush = False  # read-ahead at its bound, all the checkpoint waits for read
        # The capture's recorded gaps, archived before a checkpoint passes them.
        self._state = StateFollower(kafka.bootstrap_servers, state_topic(kafka.topic_prefix))
        self._gaps = RecordedGaps(self._state, destination.name, self.writer.put_stored)
        # Changes too large for Kafka arrive as references to the claims store (sink/claims.py).
        claims_url = claims_url or kafka.claims_url or destination.url
        self._claims = ClaimResolver(claims_url, keyring,
                                     store=store if claims_url == destination.url else None)
        # Dead letters not yet written: (name, content, ledger entry to mark written or None)
        self._dead_buffer: list[tuple[str, bytes, Pending | None]] = []
        self._epoch = 0  # bumped when a rebalance drops the buffers
        self.checkpoints = CheckpointObjects(store, destination.name, keyring,
                                             self.writer.put_stored)
        # The local spool for a long outage of the store (sink/spool.py), and since when the
        # store has been failing.
        self.spool = (Spool(destination.spool.dir, destination.name, keyring, self.stats)
                      if destination.spool.dir is not None else None)
        self._down_since: float | None = None
        self._spooled_ts: dict[Tier, int] = {}  # oldest commit (us) spooled, per tier
        self._respooled = False  # this outage's spooling began by reading again (sink/spool)
        # Several processes for this destination (sink/members.py): this member's role, set
        # by each assignment; its progress objects; the other members' (checkpointer).
        self.checkpointer = True  # owns the transactions partition: writes the checkpoints
        self.solo = True  # owns every partition: no other member to hear from
        self._reassigned = False
        self._assignment: set[TopicPartition] = set()
        self._reporter = ProgressWriter(destination.name)
        self._progress = ProgressReader(store, destination.name, keyring)
        self._unreported: list[tuple[Tier, Lsn, int]] = []  # durable, no progress object yet
        self._unreported_records: list[TransactionRecord] = []  # shipped from the spool, ditto
        self._last_pass = clock()

    def stop(self) -> None:
        self._stopping.set()

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        restored = await self._restore_checkpoints()
        if restored is None:
            return  # stopped before the store answered
        overall, tiers = restored
        self.tracker = CompletenessTracker(overall, tiers)
        self.stats.checkpoint = self.tracker.checkpoint
        self.stats.tier_checkpoints = dict(self.tracker.tier_checkpoints)
        consumer = await self._start_consumer()
        if consumer is None:
            await self._state.close()
            await self._claims.close()
            return  # stopped before the broker answered
        self._consumer = consumer
        try:
            while not self._stopping.is_set():
                if self._reassigned:
                    await self._take_role(consumer)
                await self._poll(consumer)
                due = self._due_tiers()
                if due:
                    await self._flush_guarded(consumer, due)
            await self._flush_guarded(consumer, list(TIER_ORDER), final=True)
        finally:
            await consumer.stop()
            await self._state.close()
            await self._claims.close()

    async def _start_consumer(self) -> AIOKafkaConsumer | None:
        """The group's consumer, started: a broker that does not answer is waited for under
        capped, jittered backoff (logged once, shown in `stats.waiting` and by `/readyz`),
        as the capture waits for it. None if the worker was stopped first."""
        backoff = Backoff(max_s=30.0)
        since: float | None = None
        while not self._stopping.is_set():
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.kafka.bootstrap_servers,
                group_id=self.group, enable_auto_commit=False, auto_offset_reset="earliest",
                max_partition_fetch_bytes=4 * 1024 * 1024,
                session_timeout_ms=SESSION_TIMEOUT_MS)
            consumer.subscribe([*self.tiers.values(), self.tx_topic, self.schema_topic],
                               listener=Revocations(self, consumer))
            try:
                await consumer.start()  # inside: a consumer whose start failed is closed too
            except KafkaError as exc:
                await consumer.stop()
                if since is None:
                    since = time.monotonic()
                    log.warning("destination %s: Kafka (%s) does not answer (%s); retrying "
                                "with backoff until it does", self.destination.name,
                                self.kafka.bootstrap_servers, exc)
                self.stats.waiting = f"Kafka does not answer: {exc}"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff.next_delay())
                continue
            if since is not None:
                log.warning("destination %s: Kafka answered after %.1fs",
                            self.destination.name, time.monotonic() - since)
            self.stats.waiting = None
            return consumer
        return None

    async def _restore_checkpoints(self) -> tuple[Lsn, dict[Tier, Lsn]] | None:
        """The newest checkpoints in the store, read again until the store answers (a store
        down trips the breaker, as a failed flush does); None if the worker was stopped."""
        while not self._stopping.is_set():
            try:
                self.breaker.check()
            except CircuitOpen:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(),
                                           max(0.1, self.breaker.seconds_until_retry()))
                continue
            try:
                overall, tiers = await self.checkpoints.restore()
            except (StoreError, OSError) as exc:
                self._failed("cannot read its checkpoint", exc)
                continue
            self._succeeded()
            return overall, tiers
        return None

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        wanted = await self._prioritise(consumer)
        batch = await consumer.getmany(*wanted, timeout_ms=200, max_records=self.poll_records)
        for tp, records in batch.items():
            if records and self._next_offset.get(tp, records[0].offset) < records[0].offset:
                # Records skipped: deleted by Kafka's retention before they were archived?
                letter = await lost_range(consumer, tp, self._next_offset[tp],
                                          records[0].offset, self.destination.name)
                if letter is not None:
                    self._dead_buffer.append((*letter, None))
                    self.tracker.hold()  # the transactions they belonged to are not known
                    self._reporter.hold = True
                    self.stats.dead_letters += 1
                    self._oldest.setdefault(Tier.CRITICAL, self.clock())
            if records:
                self._next_offset[tp] = records[-1].offset + 1
            if tp.topic == self.tx_topic:
                for record in records:
                    try:
                        self._add_transaction(tp, record)
                    except Exception as exc:  # any record that cannot be read is parked
                        self._park(tp, record, exc, hold=True)
            elif tp.topic == self.schema_topic:
                for record in records:
                    try:
                        self._add_schema(tp, record)
                    except Exception as exc:
                        self._park(tp, record, exc, hold=True)
            else:
                tier = self.tier_of_topic[tp.topic]
                for record in records:
                    try:
                        if claim_of(record.headers) is not None:  # a reference: fetch it
                            record.value = await self._claims.value_of(record)
                        self._add_change(tp, tier, record)
                    except TransientError:
                        raise
                    except Exception as exc:
                        self._park(tp, record, exc, hold=False)

    def _add_schema(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        schema = json.loads(record.value)
        # Not part of any transaction: committable once written.
        entry = self.offsets.track(tp, record.offset)
        self._schema_buffer.append((schema, entry))
        self._oldest.setdefault(Tier.CRITICAL, self.clock())

    def _park(self, tp: TopicPartition, record: ConsumerRecord[Any, Any], exc: Exception, *,
              hold: bool) -> None:
        """*record* cannot be decoded: its dead letter is written at the next flush (module
        docstring). With *hold* (a transaction record or a schema) every checkpoint stays
        where it is and its offset is never committed."""
        key, content = dead_letter(tp, record, exc, self.destination.name)
        entry = self.offsets.track(tp, record.offset)
        if hold:
            self.tracker.hold()
            self._reporter.hold = True  # and the checkpointer, when it is another member
        self._dead_buffer.append((key, content, None if hold else entry))
        self._oldest.setdefault(Tier.CRITICAL, self.clock())
        self.stats.dead_letters += 1
        log.error("destination %s: record %s/%d at offset %d cannot be decoded (%s: %s); "
                  "parked as %s%s", self.destination.name, tp.topic, tp.partition,
                  record.offset, type(exc).__name__, exc, key,
                  "; every checkpoint holds until an operator deals with it" if hold else
                  "; its transaction stays above the checkpoint")

    async def _prioritise(self, consumer: AIOKafkaConsumer) -> tuple[TopicPartition, ...]:
        """The partitions to read now: none while this destination can take no more (`_full`:
        all paused), else not lower tiers while critical is behind, nor those too far ahead of
        the checkpoint: left out of the read, not paused (aiokafka drops what it fetched for a
        paused partition, and fetches it again on resume). Empty: every one not paused."""
        critical_topic = self.tiers[Tier.CRITICAL]
        lag = await backlog(consumer)
        behind = any(n > CRITICAL_BACKLOG for key, n in lag.items()
                     if key.rsplit("/", 1)[0] == critical_topic)
        self.stats.lag = lag
        self._note_pending()
        full = self._full()
        if full != self.stats.paused:
            log.warning("destination %s: intake %s", self.destination.name,
                        "paused (buffers at their bound or the store failing)" if full
                        else "resumed")
            self.stats.paused = full
        assigned = consumer.assignment()
        ahead, needed, self._align_flush = align(
            assigned, lag, self.offsets, self.tracker.checkpoint, self._read_lsn,
            self.read_ahead, self._unwritten())
        if full:
            waiting = set(assigned)
        elif behind:
            waiting = {tp for tp in assigned
                       if tp.topic not in (critical_topic, self.tx_topic, self.schema_topic)}
        else:
            waiting = set()
        if not full:
            waiting = (waiting | ahead) - needed
        wanted = tuple(assigned - waiting)
        with contextlib.suppress(IllegalStateError):  # a rebalance took some meanwhile
            if wanted:
                consumer.resume(*assigned)
            else:
                consumer.pause(*assigned)
        return wanted

    def _note_pending(self) -> None:
        """`stats.pending_since_us`, for `wedsync_rpo_seconds`: per tier, the commit time of
        the oldest change the tier's checkpoint has not passed (docs/ARCHITECTURE.md, "The
        live recovery point")."""
        unread = {key.rsplit("/", 1)[0] for key, n in self.stats.lag.items() if n > 0}
        pending: dict[str, int] = {}
        for tier in TIER_ORDER:
            found = [ts for ts in (self._pending_ts.get(tier), self._tx_pending_ts.get(tier),
                                   self.tracker.oldest_pending(tier),
                                   self.spool and self.spool.waiting
                                   and self._spooled_ts.get(tier, self.spool.oldest_us)) if ts]
            if found:
                pending[tier.value] = min(found)
            elif ({self.tiers[tier], self.tx_topic} & unread
                  and tier in self.tracker.passed_ts_us):
                pending[tier.value] = self.tracker.passed_ts_us[tier]
        self.stats.pending_since_us = pending
        self.stats.held = {"buffered_rows": self._rows, "buffered_bytes": self._bytes,
                           "uncommitted_runs": len(self.offsets),
                           "tracked_transactions": self.tracker.tracked,
                           "transaction_records": len(self._tx_buffer)}

    def _unwritten(self) -> bool:
        return bool(self._rows or self._tx_buffer or self._schema_buffer or self._dead_buffer)

    def _full(self) -> bool:
        """Whether intake must pause: the buffers at their bound, or the breaker open."""
        flush = self.destination.flush
        return (self._rows >= flush.max_rows or self._bytes >= flush.max_bytes
                or (self.breaker.state is not BreakerState.CLOSED and not self._spooling()))

    def _add_change(self, tp: TopicPartition, tier: Tier, record: ConsumerRecord[Any, Any]
                    ) -> None:
        # Its facts from its headers (sink/raw.py), else decoded once to check it and learn
        # them; either way what is kept is the body, which goes into the segment as it is.
        raw = raw_change(record.headers, record.value, self.codec.own_event_body)
        if raw is not None:
            found: tuple[EventFacts, bytes, dict[str, Any] | None] | None = (*raw, None)
            self.stats.raw_changes += 1
        else:
            where = (tp.topic, tp.partition, record.offset)
            found = self.shared.take(where, record.value)
        if found is None:
            value, body = self.codec.decode_event_body(record.value)
            facts = event_facts(value)
            if facts[5] is not None:  # a key-only delete: its key now, not the whole record
                facts = (*facts[:5], partial(str, facts[5]()))
            found = (facts, body, value if facts[3] == "r" else None)
            self.shared.put(where, record.value, found)
        facts, body, snapshot_row = found
        table = facts[0]
        position = (Lsn.of(facts[1][0]), int(facts[1][1]))
        size = len(record.value)
        entry = self.offsets.track(tp, record.offset, position[0])
        self._read_lsn[tp] = position[0]
        self._buffers[tier][table].append(
            Buffered(facts, body, snapshot_row, position, size, entry))
        self._oldest.setdefault(tier, self.clock())
        if (facts[2] < self._pending_ts.get(tier, facts[2] + 1)
                and position[0] >= self.tracker.tier_checkpoints[tier]):  # not a duplicate
            self._pending_ts[tier] = facts[2]
        self._rows += 1
        self._bytes += size
        if self.watch is not None and self.watch.watches(table):  # records written first
            self._dead_buffer += self.watch.see(record.key, record.value, self.codec)

    def _add_transaction(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        found = raw_transaction(record.headers, record.value, self.codec.own_transaction_body)
        if found is None:
            where = (tp.topic, tp.partition, record.offset)
            found = self.shared.take(where, record.value)
            if found is None:
                found = self.codec.decode_transaction_body(record.value)
                self.shared.put(where, record.value, found)
        else:
            self.stats.raw_transactions += 1
        value, body = found
        entry = self.offsets.track(tp, record.offset, Lsn.of(value["commit_lsn"]))
        self._read_lsn[tp] = entry.commit_lsn
        self._tx_buffer.append((value, body, entry))
        self._oldest.setdefault(Tier.CRITICAL, self.clock())
        if entry.commit_lsn >= self.tracker.checkpoint:  # not a duplicate
            # A record without tier counts (older captures) counts for every tier.
            tier_counts = value.get("tier_counts") or dict.fromkeys(
                _TIER_NAMES, any((value.get("counts") or {}).values()))
            for tier in TIER_ORDER:
                if tier_counts.get(tier.value, 0) > 0:
                    self._tx_pending_ts.setdefault(tier, value["commit_ts_us"])

    def _due_tiers(self) -> list[Tier]:
        if self._full():
            # (also with empty buffers while the breaker is open: intake is paused, and only
            # a trial flush closes it)
            return list(TIER_ORDER)
        if self._align_flush:
            self._align_flush = False
            return list(TIER_ORDER)
        flush, now = self.destination.flush, self.clock()
        due = [t for t, since in self._oldest.items() if now - since >= flush.interval(t)]
        if not due and self.spool is not None and self.spool.waiting and not self._spooling():
            return [Tier.CRITICAL]  # ship what is spooled (the store is back, or at start)
        # Nothing of its own to write, but the checkpoint may move: the checkpointer hears
        # from the other members; a member commits what the checkpoint passed.
        if (not due and not self.solo and now - self._last_pass >= flush.interval(Tier.CRITICAL)
                and (self.tracker.incomplete if self.checkpointer
                     else len(self.offsets) or self._unreported)):
            self._last_pass = now
            return [Tier.CRITICAL]
        return due

    # --- flushing ---------------------------------------------------------------------------

    async def _flush_guarded(self, consumer: AIOKafkaConsumer, tiers: list[Tier],
                             final: bool = False) -> None:
        try:
            self.breaker.check()
        except CircuitOpen:
            if self._spooling():
                await self._flush_to_spool(consumer, tiers)
            elif not final:
                await asyncio.sleep(min(1.0, self.breaker.seconds_until_retry()))
            return
        try:
            if self.spool is not None and self.spool.waiting:
                await self._ship()  # what was spooled goes first, in order
            await self._flush(consumer, tiers)
        except (StoreError, TransientError, OSError) as exc:
            self._failed("flush failed", exc)
            if self._spooling():
                await self._flush_to_spool(consumer, tiers)
            return
        self._succeeded()

    def _spooling(self) -> bool:
        """Whether flushes go into the spool: the store has failed for `spool.after_s`."""
        spooling = (self.spool is not None and self._down_since is not None
                    and self.clock() - self._down_since >= self.destination.spool.after_s)
        if spooling and not self.stats.spooling and self.spool is not None:
            log.warning("destination %s: the store keeps failing; writing into the spool %s "
                        "until it answers", self.destination.name, self.spool.root)
        self.stats.spooling = spooling
        return spooling

    async def _flush_to_spool(self, consumer: AIOKafkaConsumer, tiers: list[Tier]) -> None:
        """One flush into a spool batch; once it is sealed, the offsets of its records are
        committed (sink/spool.py). A failed batch is deleted, and what was read and not
        written is read again from the committed offsets."""
        assert self.spool is not None
        if not self._respooled:  # what was written to the store above the checkpoint too
            self._respooled = True
            self._drop_unwritten(set(), "the spool takes over from the store")
            with contextlib.suppress(IllegalStateError, KafkaError):
                await consumer.seek_to_committed()
            return
        batch = self.writer.batch = self.spool.begin()
        for tier, ts in [*self._pending_ts.items(), *self._tx_pending_ts.items()]:
            self._spooled_ts[tier] = min(ts, self._spooled_ts.get(tier, ts))
        positions: list[tuple[Tier, Lsn, int]] = []
        entries: list[Pending] = []
        try:
            await self._write(tiers, positions, [], entries)
            await batch.seal(positions, hold=self._reporter.hold)
        except (StoreError, TransientError, OSError) as exc:
            batch.discard()
            log.error("%s", exc)
            self._drop_unwritten(set(), "the spool failed")
            with contextlib.suppress(IllegalStateError, KafkaError):
                await consumer.seek_to_committed()
            return
        finally:
            self.writer.batch = None
        for entry in entries:
            entry.spooled = True
        await self._commit(consumer, self.tracker.checkpoint)

    async def _ship(self) -> None:
        """Every spool batch into the store, oldest first; each counts once it is in."""
        assert self.spool is not None
        for batch in self.spool.batches():
            shipped = await self.spool.ship(batch, self.store, self.bucket.take)
            if self.checkpointer:
                self.tracker.records_durable(sorted(shipped.records,
                                                    key=lambda r: r.commit_lsn))
                self.tracker.changes_durable(shipped.changes)
                if shipped.hold:
                    self.tracker.hold()
            else:  # to the checkpointer, through a progress object
                self._unreported.extend(shipped.changes)
                self._unreported_records.extend(shipped.records)
        self._spooled_ts = {}

    def _failed(self, what: str, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = self.clock()
        self.stats.failures += 1
        self.breaker.failure()
        self.stats.breaker = self.breaker.state.value
        log.warning("destination %s: %s (%s); breaker %s", self.destination.name, what, exc,
                    self.breaker.state.value)

    def _succeeded(self) -> None:
        self._down_since, self._respooled = None, False
        self._spooling()
        if self.breaker.state is not BreakerState.CLOSED:
            log.warning("destination %s recovered", self.destination.name)
        self.breaker.success()
        self.stats.breaker = self.breaker.state.value

    async def _flush(self, consumer: AIOKafkaConsumer, tiers: list[Tier]) -> None:
        # 1. segments, then transaction records (create-only)
        written_positions: list[tuple[Tier, Lsn, int]] = []
        records: list[dict[str, Any]] = []
        try:
            await self._write(tiers, written_positions, records, [])
        finally:
            # A write that failed part-way leaves the earlier ones written and out of the
            # buffers: count them as durable now, or their transactions never complete (the
            # checkpoint would stay behind until a restart).
            if self.checkpointer:
                self._durable(written_positions, records)
            else:
                self._unreported.extend(written_positions)
        self._last_pass = self.clock()
        if not self.checkpointer:  # 2'. report to the checkpointer; 3. commit what it passed
            await self._member_pass(consumer)
            return
        if not self.solo or self._progress.pending:  # 2. what the other members wrote
            changes, hold, found = await self._progress.read_new()
            self.tracker.records_durable(found)
            self.tracker.changes_durable(changes)
            if hold:
                self.tracker.hold()
        checkpoint = self.tracker.advance()
        checkpoint = self.tracker.advance()
        tiers_moved = {tier: lsn for tier, lsn in self.tracker.tier_checkpoints.items()
                       if lsn > self.stats.tier_checkpoints.get(tier, INVALID_LSN)}
        if tiers_moved or checkpoint > self.stats.checkpoint:
            await self._gaps.archive()
        async def moved(lsn: Lsn, tier: Tier | None) -> None:
            await self.checkpoints.write(lsn, tier)
            if tier is None:
                self.stats.checkpoint = max(self.stats.checkpoint, lsn)
            else:
                self.stats.tier_checkpoints[tier] = lsn
        await run_bounded([partial(moved, lsn, tier) for tier, lsn in tiers_moved.items()]
                          + ([partial(moved, checkpoint, None)]
                             if checkpoint > self.stats.checkpoint else []), WRITES_AT_ONCE)
        # 3. offsets of what is at or below the checkpoint
        await self._commit(consumer, checkpoint)
        self._note_pending()
        await self.checkpoints.prune()
        await self._progress.prune(checkpoint)
        if self.spool is not None:
            await self.spool.release(checkpoint)
        self.stats.flushes += 1
        self.stats.last_flush_at = time.time()

    async def _write(self, tiers: list[Tier], positions: list[tuple[Tier, Lsn, int]],
                     records: list[dict[str, Any]], entries: list[Pending]) -> None:
        """Step 1 of a flush: dead letters, schemas, then the segments and transaction records
        at once, through `writer` (the store, or a spool batch); what was written is added to
        *positions*, *records* and *entries* as it is."""
        tx_since = self._oldest.get(Tier.CRITICAL)
        epoch = self._epoch  # a rebalance meanwhile replaces the buffers (`_drop_unwritten`)
        dead, schemas, txs = self._dead_buffer, self._schema_buffer, self._tx_buffer
        try:
            while dead:
                key, content, dead_entry = dead[0]
                await self.writer.put(key, content)
                dead.pop(0)
                if dead_entry is not None:
                    dead_entry.mark_written()
                    entries.append(dead_entry)
            while schemas:  # schemas first: they describe the changes after them
                schema, entry = schemas[0]
                await self.writer.schema(schema)
                schemas.pop(0)
                entry.mark_written()
                entries.append(entry)
            async def segment(tier: Tier, table: str, items: list[Buffered]) -> None:
                await self.writer.segment(table, items, tier)
                for item in items:
                    item.entry.mark_written()
                    entries.append(item.entry)
                positions.extend((tier, *i.position) for i in items)
                if epoch == self._epoch:
                    self._rows -= len(items)
                    self._bytes -= sum(i.size for i in items)
                if self._buffers[tier].get(table) is items:
                    del self._buffers[tier][table]

            async def transactions() -> None:
                await self.writer.transactions([(value, body) for value, body, _ in txs])
                for value, _, entry in txs:
                    entry.mark_written()
                    entries.append(entry)
                    records.append(value)
                if self._tx_buffer is txs:
                    self._tx_buffer = []
                    self._tx_pending_ts = {}

            # The segments and the transaction records at once (each object is independent;
            # only the checkpoint below waits for all of them): a flush takes about its
            # slowest write, not their sum.
            jobs = [partial(segment, tier, table, items) for tier in tiers
                    for table, items in list(self._buffers[tier].items())]
            await run_bounded([*jobs, transactions] if txs else jobs, WRITES_AT_ONCE)
            for tier in tiers:
                self._oldest.pop(tier, None)
                if epoch == self._epoch:
                    self._pending_ts.pop(tier, None)
        finally:
            # Unwritten transaction records, schemas and dead letters stay due.
            if self._tx_buffer or self._schema_buffer or self._dead_buffer:
                self._oldest.setdefault(Tier.CRITICAL,
                                        self.clock() if tx_since is None else tx_since)

    async def _member_pass(self, consumer: AIOKafkaConsumer) -> None:
        """A member that is not the checkpointer: one progress object for the changes made
        durable since the last (sink/members.py), then the offsets below the newest stored
        checkpoint."""
        if self._unreported or self._unreported_records or self._reporter.hold:
            key, content = self._reporter.next(self._unreported, self._unreported_records)
            await self.writer.put_stored(key, content)
            self._unreported, self._unreported_records = [], []
            await self.spool.release() if self.spool is not None else None
        checkpoint = max(self.tracker.checkpoint, await self.checkpoints.latest(None))
        self.tracker.checkpoint = self.stats.checkpoint = checkpoint
        await self._commit(consumer, checkpoint)
        self._note_pending()
        self.stats.flushes += 1
        self.stats.last_flush_at = time.time()

    def _assigned(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        """Kafka assigned *assigned*: this member's role (sink/members.py), taken before the
        next poll (`_take_role`)."""
        self.stats.role = role_of(consumer, assigned, [*self.tiers.values(), self.schema_topic],
                                  self.tx_topic)
        self.checkpointer = self.stats.role in ("solo", "checkpointer")
        self._assignment = assigned
        self.solo, self._reassigned = self.stats.role == "solo", True

    async def _take_role(self, consumer: AIOKafkaConsumer) -> None:
        """After an assignment: a checkpointer starts its tracker again from the stored
        checkpoints (every record above them is read again, its own and, through their
        progress objects, the other members'); a member keeps no tracker."""
        self._reassigned = False
        self._next_offset = {}  # from the committed offsets: a record below them is gone
        for tp in self._assignment:
            with contextlib.suppress(KafkaError, IllegalStateError):
                if (committed := await consumer.committed(tp)) is not None:
                    self._next_offset[tp] = committed
        if self.checkpointer:
            restored = await self._restore_checkpoints()
            if restored is None:
                return
            self.tracker = CompletenessTracker(*restored)
            self._progress.reset()  # and a solo reads once what members left (then prunes)
        else:
            self.tracker = CompletenessTracker(self.tracker.checkpoint)
        log.info("destination %s: this process is %s of its sink group", self.destination.name,
                 ROLES[self.stats.role])

    def _durable(self, positions: list[tuple[Tier, Lsn, int]],
                 records: list[dict[str, Any]]) -> None:
        """Changes and transaction records now written: tell the tracker."""
        self.tracker.changes_durable(positions)
        self.tracker.records_durable(
            transaction_from_dict(r) for r in sorted(records, key=lambda r: r["commit_lsn"]))

    async def _commit(self, consumer: AIOKafkaConsumer, checkpoint: Lsn) -> None:
        offsets = self.offsets.committable(checkpoint)
        if not offsets:
            return
        try:
            await consumer.commit({tp: OffsetAndMetadata(offset, "")
                                   for tp, offset in offsets.items()})
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced (e.g. this process was paused past its session timeout):
            # the partitions' next owner, maybe this sink again, reads from the offsets
            # committed before. Nothing written is lost; some is read twice.
            log.warning("destination %s: offsets not committed, the group rebalanced (%s); "
                        "the records are read again from the last committed offsets",
                        self.destination.name, exc)

    def _drop_unwritten(self, revoked: set[TopicPartition], why: str | None = None) -> None:
        """The group took *revoked* away (or, with *why*, the sink reads again from the
        committed offsets): drop what was read and not yet committed.

        aiokafka's rebalance is eager (every partition is revoked, and the new assignment
        starts from the committed offsets), so every buffer goes; what a flush running now
        writes still counts (the tracker keeps it) and the flush's own bookkeeping is kept
        apart by `_epoch`."""
        self._epoch += 1
        self.stats.rebalances += why is None
        self.offsets = OffsetLedger()  # every partition's entries: their buffers are gone
        self._read_lsn, self._next_offset = {}, {}
        self._buffers = {t: defaultdict(list) for t in TIER_ORDER}
        self._tx_buffer, self._schema_buffer, self._dead_buffer = [], [], []
        self._oldest = {}
        self._pending_ts, self._tx_pending_ts = {}, {}
        self._rows = self._bytes = 0
        log.warning("destination %s: %s; what was read and not yet committed is read again "
                    "from the committed offsets", self.destination.name,
                    why or f"{len(revoked)} partitions revoked, the group rebalanced")
