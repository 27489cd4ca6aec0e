"""Kafka side of the transport: topic names, topic creation, and the event producer.

Topics: `<prefix>.critical`, `.high`, `.normal`, `.low` carry
the change events of each wedding tier; `<prefix>.transactions` carries one boundary record
per transaction, always in partition 0 so they stay in commit order.

Message key of a change event: `keys.message_key` (`schema.table`, a NUL byte, then the
row's canonical key). The same row always gets the same key, so the partitioner (librdkafka's
`murmur2_random`: the Java client's default for a keyed message) keeps one row's changes in
one partition, in order.

Headers of a change event: `table` (schema.table), `op`, `lsn` (commit LSN, Postgres text
form), `seq`, `tier`, `ts_us` (commit time, microseconds since the epoch) and `wedding`
(the wedding id, when the change has one), all UTF-8. With them a sink writes the value into
its segment without decoding it (`sink/raw.py`); a change whose wedding id is longer than
128 characters sends neither `ts_us` nor `wedding`, and the sinks decode it. Of a
transaction record: `lsn`, `end_lsn`, then `ts_us`, `xid`, `counts` (table -> changes) and
`tiers` (tier -> changes) as compact JSON, for the sinks' raw path (left out when `counts`
would be over 2 KiB).

The producer is librdkafka (confluent-kafka): `produce()` queues, librdkafka's threads batch,
compress and send, and its delivery reports are read by `poll()` on the event loop (a task
every `POLL_S`, and every `POLL_EVERY` sends). Delivery is at-least-once: `send_event` returns
the delivery future without awaiting it (awaiting each would send one message per round
trip), and `publish_event` hands the report to a callback instead; either way the caller
feeds an `AckWatermark`. The first failed delivery makes every later
call raise `ProducerError`: after a lost message the partition order is no longer trusted, and
the remedy is a restart from the slot.

Large changes (the claim check): the producer's `message.max.bytes` and the created topics'
`max.message.bytes` are both `kafka.max_message_bytes`, so what the producer takes the broker
takes. A change whose key, value and headers would exceed `kafka.claim_check_bytes` is written
to the claims store (`ClaimCheck`: `claims/<commit lsn>-<seq>-<digest>.avro`, encrypted like
every object) before its reference is sent in its place: the same headers plus `claim` (the
object's name), and a JSON value `{"claim", "size", "sha256", "store"}` (docs/EVENTS.md). The
sinks read the change back (`sink/claims.py`), so the archive holds it whole. Without a claims
store such a change stops capture with `ChangeTooLarge` (exit 2), never a retry loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache, partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from confluent_kafka import KafkaError as CKafkaError
from confluent_kafka import KafkaException, Message, Producer

from connectors.base import ObjectStore
from connectors.errors import AlreadyExists
from replicator.archive.layout import claim_key
from replicator.config import KafkaConfig
from replicator.crypto import Keyring, encrypt
from replicator.errors import OperatorError, TransientError
from replicator.events import TIER_ORDER, ChangeEvent, Op, Tier, TransactionRecord
from replicator.keys import message_key
from replicator.position import Lsn
from replicator.transport.avro import EventCodec
from replicator.transport.registry import RegistryClient, subject_for

__all__ = [
    "CLAIM_HEADER",
    "TS_HEADER",
    "WEDDING_HEADER",
    "ChangeTooLarge",
    "ClaimCheck",
    "DeliveryFailed",
    "EventProducer",
    "ProducerError",
    "all_topics",
    "ensure_topics",
    "schemas_topic",
    "topic_names",
    "transactions_topic",
]

logger = logging.getLogger(__name__)

TRANSACTIONS_PARTITION: Final = 0
COMPACT: Final = {"cleanup.policy": "compact"}


START_TIMEOUT_S: Final = 10.0
STOP_FLUSH_S: Final = 30.0
POLL_S: Final = 0.002  # delivery reports wait at most this long to be read
POLL_EVERY: Final = 1_000  # messages between reads of the delivery reports while sending
_Headers = list[tuple[str, str | bytes | None]]
_LIBRDKAFKA_LOG: Final = logging.getLogger("replicator.transport.librdkafka")


class ProducerError(TransientError):
    """The producer cannot send: it is not started, or an earlier delivery failed."""


class DeliveryFailed(ProducerError):
    """Kafka did not take one message; `code` is librdkafka's error name (e.g.
    `MSG_SIZE_TOO_LARGE`)."""

    def __init__(self, topic: str, code: str, reason: str) -> None:
        super().__init__(f"Kafka did not take a message for {topic}: {code} ({reason})")
        self.code = code


def _report(delivery: asyncio.Future[Any], on_failure: Callable[[BaseException], None],
            error: CKafkaError | None, message: Message) -> None:
    """librdkafka's delivery report for one message (called by `poll`, on the loop)."""
    if delivery.done():
        return
    if error is None:
        delivery.set_result(message)
        return
    failure = DeliveryFailed(message.topic() or "?", error.name(), error.str())
    on_failure(failure)
    delivery.set_exception(failure)


def _report_to(on_delivered: Callable[[BaseException | None], None],
               on_failure: Callable[[BaseException], None],
               error: CKafkaError | None, message: Message) -> None:
    """A delivery report handed to a callback instead of a future."""
    failure = None if error is None else \
        DeliveryFailed(message.topic() or "?", error.name(), error.str())
    if failure is not None:
        on_failure(failure)
    try:
        on_delivered(failure)
    except Exception as exc:  # a bug in the callback must not stop the delivery reports
        logger.exception("a delivery report's callback failed")
        on_failure(exc)


def _ignore_report(error: CKafkaError | None, message: Message) -> None:
    """A placeholder until the first callback-reported message (`_report_to`)."""


def _compact_json(values: Mapping[str, int]) -> bytes:
    """`json.dumps(values, separators=(",", ":"), sort_keys=True)`, encoded; the common
    one-entry map of an exact int without the encoder's set-up (a header per transaction)."""
    if len(values) == 1:
        for name, count in values.items():
            if type(name) is str and type(count) is int:
                return b"{%s:%d}" % (_json_name(name), count)
    return json.dumps(values, separators=(",", ":"), sort_keys=True).encode()


@lru_cache(maxsize=1024)
def _json_name(name: str) -> bytes:
    return json.dumps(name).encode()


def topic_names(prefix: str) -> dict[Tier, str]:
    """The change-event topic of each tier."""
    return {tier: f"{prefix}.{tier.value}" for tier in TIER_ORDER}


def transactions_topic(prefix: str) -> str:
    return f"{prefix}.transactions"


def schemas_topic(prefix: str) -> str:
    """Table schemas as captured (JSON, keyed `<table>/<lsn>`), compacted: the history stays."""
    return f"{prefix}.schemas"


def all_topics(prefix: str) -> list[str]:
    return [*topic_names(prefix).values(), transactions_topic(prefix)]


async def ensure_topics(
    bootstrap: str, prefix: str, partitions: int, replication_factor: int, *,
    max_message_bytes: int | None = None,
) -> dict[str, int]:
    """Create the missing topics; return every topic's partition count.

    The tier topics get *partitions*, the transactions topic 1; with *max_message_bytes*, the
    tier and transactions topics are created with that `max.message.bytes` (the producer's
    `message.max.bytes`). An existing topic is never
    deleted or recreated (that would drop data); if it has fewer partitions than asked, a
    warning says so and it is used as it is.
    """
    wanted = {name: partitions for name in topic_names(prefix).values()}
    wanted[transactions_topic(prefix)] = 1
    wanted[schemas_topic(prefix)] = 1
    compacted = {schemas_topic(prefix)}
    sized = {} if max_message_bytes is None else {"max.message.bytes": str(max_message_bytes)}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()  # inside: a failed start is closed too
        existing = await _partition_counts(admin, list(wanted))
        missing = [name for name in wanted if name not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(name, wanted[name], replication_factor,
                          topic_configs=COMPACT if name in compacted else sized or None)
                 for name in missing]
            )
            for name, code, *rest in response.topic_errors:
                # Another replicator may have created it meanwhile (36): that is fine.
                if code not in (0, TopicAlreadyExistsError.errno):
                    message = rest[0] if rest else ""
                    raise KafkaError(f"cannot create topic {name}: error {code} {message}")
                if code == 0:
                    logger.info("created topic %s with %d partitions", name, wanted[name])
            existing = await _partition_counts(admin, list(wanted), wait_for=missing)
    finally:
        await admin.close()
    for name, count in existing.items():
        if count < wanted[name]:
            logger.warning(
                "topic %s has %d partitions, fewer than the %d configured; using it as it is "
                "(add partitions with kafka-topics --alter if needed)", name, count, wanted[name],
            )
    return existing


async def _partition_counts(
    admin: AIOKafkaAdminClient, names: list[str], wait_for: Sequence[str] = (), attempts: int = 50
) -> dict[str, int]:
    """Partition counts of the topics of *names* that exist; waits (briefly) until the topics
    of *wait_for* show up in the metadata, which lags their creation.

    Only topics already listed are described: a metadata request naming a missing topic
    creates it on brokers with `auto.create.topics.enable`, with the broker's default
    partition count instead of ours.
    """
    counts: dict[str, int] = {}
    for _ in range(attempts):
        counts = {}
        listed = set(await admin.list_topics())
        present = [name for name in names if name in listed]
        for topic in await admin.describe_topics(present) if present else []:
            if topic["error_code"] == 0 and topic["partitions"]:
                counts[topic["topic"]] = len(topic["partitions"])
        if all(name in counts for name in wait_for):
            return counts
        await asyncio.sleep(0.1)
    raise KafkaError(f"topics {', '.join(sorted(set(wait_for) - set(counts)))} were created but "
                     "do not appear in the cluster metadata")


# --- producer --------------------------------------------------------------------------------


class EventProducer:
    """Sends encoded change events to their tier's topic and transaction records to the
    transactions topic, with an idempotent `acks=all` producer.

    Use as `async with EventProducer(config, codec) as producer:`; `start()` and `stop()` are
    idempotent, and a producer is one-shot: once stopped it does not start again (a restart
    makes a new one, as the capture does after a failed delivery). `stop()` flushes what was
    sent. With `config.schema_registry_url`, `start()` registers the schemas under
    `<topic>-value` and messages use the Confluent wire format.
    Call `ensure_topics` first: sending to a missing topic waits for it (or, on a broker with
    automatic topic creation, creates it with the broker's defaults).
    """

    def __init__(self, config: KafkaConfig, codec: EventCodec, *,
                 registry: RegistryClient | None = None, claims: ClaimCheck | None = None
                 ) -> None:
        self._config = config
        self._claims = claims
        # A message whose key and value pass this goes by claim check (read once per change).
        self._claim_above = config.claim_check_bytes - MESSAGE_OVERHEAD
        self._codec = codec
        self._registry = registry
        self._owns_registry = False
        self._producer: Producer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sent = 0
        # The headers that repeat: per table, op and tier; and the last commit's LSN.
        self._headers: dict[tuple[str, Op, Tier], tuple[tuple[str, bytes], ...]] = {}
        self._lsn_header: tuple[int, tuple[str, bytes]] = (-1, ("lsn", b""))
        self._ts_header: tuple[int, tuple[str, bytes]] = (-1, (TS_HEADER, b""))
        self._topics = topic_names(config.topic_prefix)
        self._transactions = transactions_topic(config.topic_prefix)
        self._schemas = schemas_topic(config.topic_prefix)
        self._schema_ids: dict[str, int] = {}
        # The common message key's start, per table and key column (`_key`).
        self._key_prefixes: dict[tuple[str, str], bytes] = {}
        # The last delivery callback and the report made for it (`_report_to`).
        self._reported_to: Callable[[BaseException | None], None] | None = None
        self._report: Callable[[CKafkaError | None, Message], None] = _ignore_report
        self._failure: BaseException | None = None
        self._stopped = False

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._stopped:
            raise RuntimeError("a stopped EventProducer does not start again: make a new one")
        if self._producer is not None:
            return
        config = self._config
        if config.schema_registry_url is not None:
            await self._register_schemas(config.schema_registry_url)
        producer = Producer({
            "bootstrap.servers": config.bootstrap_servers,
            "client.id": f"wedsync-replicator-{config.topic_prefix}",
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": config.compression,
            "linger.ms": config.linger_ms,
            # A topic deleted under the capture must fail the delivery (the capture creates it
            # again, with its configuration, at the reconnect), not be auto-created by the
            # broker with the broker's defaults.
            "allow.auto.create.topics": False,
            "batch.size": min(config.max_batch_bytes, config.max_message_bytes),
            # As the topics' max.message.bytes (ensure_topics): what is taken here fits there.
            "message.max.bytes": config.max_message_bytes,
            # The Java client's partition for a key (`murmur2` here), so consumers in any
            # language agree on where a row's changes are.
            "partitioner": "murmur2_random",
            "error_cb": self._on_error,
            "logger": _LIBRDKAFKA_LOG,
        })
        try:
            # librdkafka connects lazily: ask for the cluster's metadata, so an unreachable
            # broker is an error here, as it is for the other stages.
            await asyncio.to_thread(producer.list_topics, timeout=START_TIMEOUT_S)
        except KafkaException as exc:
            raise ProducerError(f"cannot reach Kafka at {config.bootstrap_servers}: "
                                f"{exc.args[0].str() if exc.args else exc}") from None
        self._failure = None
        self._loop = asyncio.get_running_loop()
        self._producer = producer
        self._poller = asyncio.create_task(self._poll_forever(producer),
                                           name="kafka-delivery-reports")

    async def stop(self) -> None:
        """Flush pending messages (their futures resolve) and close; safe to call twice.
        What Kafka has not taken within `STOP_FLUSH_S` is dropped: its futures fail, so
        nothing after it counts as delivered."""
        self._stopped = True
        producer, self._producer = self._producer, None
        try:
            if producer is not None:
                try:
                    await asyncio.wait_for(self._drain(producer), STOP_FLUSH_S)
                except TimeoutError:
                    logger.warning("Kafka did not take %d message(s) within %.0fs; dropped",
                                   len(producer), STOP_FLUSH_S)
                    producer.purge()
                    producer.poll(0)
        finally:
            poller, self._poller = self._poller, None
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            if producer is not None:
                producer.poll(0)
            if self._owns_registry and self._registry is not None:
                await self._registry.close()
                self._registry = None
                self._owns_registry = False

    async def _poll_forever(self, producer: Producer) -> None:
        """Deliver librdkafka's delivery reports (they resolve the futures) on this loop."""
        while True:
            if producer.poll(0) == 0:
                await asyncio.sleep(POLL_S)
            else:
                await asyncio.sleep(0)

    async def _drain(self, producer: Producer) -> None:
        while len(producer) > 0:
            producer.poll(0)
            await asyncio.sleep(POLL_S)
        producer.poll(0)

    def _on_error(self, error: CKafkaError) -> None:
        """librdkafka's client-level errors: a fatal one (the idempotent producer's state is
        lost) fails the producer; the others (a broker down, being retried) are logged."""
        if error.fatal():
            logger.error("Kafka producer failed: %s", error.str())
            self._failure = self._failure or ProducerError(f"fatal Kafka error: {error.str()}")
        else:
            logger.warning("Kafka: %s", error.str())

    async def _register_schemas(self, url: str) -> None:
        if self._registry is None:
            self._registry = RegistryClient(url)
            self._owns_registry = True
        for topic in self._topics.values():
            self._schema_ids[topic] = await self._registry.register(
                subject_for(topic), self._codec.event_schema)
        self._schema_ids[self._transactions] = await self._registry.register(
            subject_for(self._transactions), self._codec.transaction_schema)

    def _ready(self) -> Producer:
        if self._failure is not None:
            raise ProducerError(f"an earlier Kafka delivery failed ({self._failure!r}); restart "
                                "the producer and resume from the slot") from self._failure
        if self._producer is None:
            raise ProducerError("the producer is not started; call start() first")
        return self._producer

    async def send_event(
        self, event: ChangeEvent, column_types: Mapping[str, str] | None = None,
        digests: dict[str, int] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue *event* on its tier's topic; returns the delivery future (librdkafka's
        `Message`). With *digests*, the event's content digest (`avro.content_digest`) is added
        to its table's entry."""
        producer = self._ready()
        topic, value, key, headers = self._event_message(event, column_types, digests)
        if len(value) + len(key) > self._claim_above:
            value = await self._claimed(event, value, headers)
            producer = self._ready()
        delivery = await self._send(producer, topic, value, key, None, headers)
        assert delivery is not None
        return delivery

    async def publish_event(
        self, event: ChangeEvent, column_types: Mapping[str, str] | None,
        digests: dict[str, int] | None, on_delivered: Callable[[BaseException | None], None],
    ) -> None:
        """`send_event` without a future, for the capture's stream: *on_delivered* is called
        once, on the loop, with None when Kafka has the message or with the error."""
        producer = self._ready()
        topic, value, key, headers = self._event_message(event, column_types, digests)
        if len(value) + len(key) > self._claim_above:
            value = await self._claimed(event, value, headers)
            producer = self._ready()
        if not self._produce(producer, topic, value, key, None, headers,
                             self._report_to(on_delivered)):
            await self._send(producer, topic, value, key, None, headers, on_delivered)

    def _report_to(self, on_delivered: Callable[[BaseException | None], None]
                   ) -> Callable[[CKafkaError | None, Message], None]:
        """The delivery report handing to *on_delivered*: made once for a run of messages
        with the same callback (the capture passes one per transaction)."""
        if on_delivered is not self._reported_to:
            self._reported_to = on_delivered
            self._report = partial(_report_to, on_delivered, self._on_failure)
        return self._report

    def _event_message(
        self, event: ChangeEvent, column_types: Mapping[str, str] | None,
        digests: dict[str, int] | None,
    ) -> tuple[str, bytes, bytes, _Headers]:
        """The topic, value, key and headers of *event*'s message."""
        tier = event.tier
        topic = self._topics[tier]
        table = event.qualified_table
        if digests is not None:
            value, digest = self._codec.encode_event_digested(
                event, column_types, schema_id=self._schema_ids.get(topic))
            digests[table] = digests.get(table, 0) + digest
        else:
            value = self._codec.encode_event(event, column_types,
                                             schema_id=self._schema_ids.get(topic))
        commit_lsn, seq = event.position
        op = event.op
        fixed = self._headers.get((table, op, tier))
        if fixed is None:
            fixed = self._headers[table, op, tier] = (
                ("table", table.encode()), ("op", str(op).encode()), ("tier", str(tier).encode()))
        if commit_lsn != self._lsn_header[0]:  # the same for every change of a transaction
            self._lsn_header = (commit_lsn, ("lsn", str(commit_lsn).encode()))
        headers: _Headers = [fixed[0], fixed[1], self._lsn_header[1],
                             ("seq", str(seq).encode()), fixed[2]]
        # The rest of what the sink's segment header needs, so that it need not decode the
        # value (`sink/raw.py`): the commit time, and the wedding when it is short.
        wedding = event.wedding_id
        if wedding is None or len(wedding) <= MAX_WEDDING_HEADER:
            if commit_lsn != self._ts_header[0]:
                self._ts_header = (commit_lsn, (TS_HEADER, b"%d" % event.commit_ts_us))
            headers.append(self._ts_header[1])
            if wedding is not None:
                headers.append((WEDDING_HEADER, wedding.encode()))
        return topic, value, self._key(event, table), headers

    def _key(self, event: ChangeEvent, table: str) -> bytes:
        """`keys.message_key`, with the common key (one integer column) from a prefix made
        once per table and column."""
        key = event.key
        if len(key) == 1:
            for name, value in key.items():
                if type(value) is int:
                    prefix = self._key_prefixes.get((table, name))
                    if prefix is None:
                        prefix = message_key(event)[:-len(b"%d}" % value)]
                        if len(self._key_prefixes) < 4096:
                            self._key_prefixes[table, name] = prefix
                    return prefix + b"%d}" % value
        return message_key(event)

    async def _claimed(self, event: ChangeEvent, value: bytes, headers: _Headers) -> bytes:
        """A change too large for Kafka: its value goes to the claims store, the reference
        takes its place (and a header names the claim)."""
        claim, value = await self._claim(event, value)
        headers.append((CLAIM_HEADER, claim.encode()))
        return value

    async def _claim(self, event: ChangeEvent, value: bytes) -> tuple[str, bytes]:
        if self._claims is None:
            commit_lsn, seq = event.position
            raise ChangeTooLarge(
                f"the change {event.qualified_table} at {commit_lsn}/{seq} is {len(value)} "
                f"bytes, more than kafka.claim_check_bytes ({self._config.claim_check_bytes}), "
                f"and no claims store is configured: set kafka.claims_url (or add a "
                f"destination) so large changes go there, then start again")
        return await self._claims.reference(*event.position, value)

    async def send_transaction(self, record: TransactionRecord) -> asyncio.Future[Any]:
        """Queue *record* on the transactions topic, partition 0; returns the delivery future."""
        producer = self._ready()
        value, key, headers = self._transaction_message(record)
        delivery = await self._send(producer, self._transactions, value, key,
                                    TRANSACTIONS_PARTITION, headers)
        assert delivery is not None
        return delivery

    async def publish_transaction(self, record: TransactionRecord,
                                  on_delivered: Callable[[BaseException | None], None]) -> None:
        """`send_transaction` without a future, as `publish_event`."""
        producer = self._ready()
        value, key, headers = self._transaction_message(record)
        if not self._produce(producer, self._transactions, value, key, TRANSACTIONS_PARTITION,
                             headers, self._report_to(on_delivered)):
            await self._send(producer, self._transactions, value, key, TRANSACTIONS_PARTITION,
                             headers, on_delivered)

    def _transaction_message(self, record: TransactionRecord
                             ) -> tuple[bytes, bytes, _Headers]:
        value = self._codec.encode_transaction(
            record, schema_id=self._schema_ids.get(self._transactions))
        commit_lsn = record.commit_lsn
        if commit_lsn != self._lsn_header[0]:
            self._lsn_header = (commit_lsn, ("lsn", str(commit_lsn).encode()))
        headers: _Headers = [self._lsn_header[1], ("end_lsn", str(record.end_lsn).encode())]
        # What a sink's completeness tracker needs, so that it need not decode the value
        # (`sink/raw.py`); a transaction of very many tables sends none of it.
        counts = _compact_json(record.counts)
        if len(counts) <= MAX_COUNTS_HEADER:
            headers += [(TS_HEADER, b"%d" % record.commit_ts_us), ("xid", b"%d" % record.xid),
                        ("counts", counts), ("tiers", _compact_json(record.tier_counts))]
        return value, commit_lsn.hex_key().encode(), headers

    async def _send(self, producer: Producer, topic: str, value: bytes, key: bytes,
                    partition: int | None, headers: _Headers,
                    on_delivered: Callable[[BaseException | None], None] | None = None,
                    ) -> asyncio.Future[Any] | None:
        assert self._loop is not None
        delivery: asyncio.Future[Any] | None = None
        if on_delivered is None:
            delivery = self._loop.create_future()
            report = partial(_report, delivery, self._on_failure)
        else:
            report = partial(_report_to, on_delivered, self._on_failure)
        while not self._produce(producer, topic, value, key, partition, headers, report):
            # librdkafka's queue is full: wait for deliveries
            producer.poll(0)
            await asyncio.sleep(POLL_S)
            self._ready()
        return delivery  # None with on_delivered

    def _produce(self, producer: Producer, topic: str, value: bytes, key: bytes,
                 partition: int | None, headers: _Headers,
                 report: Callable[[CKafkaError | None, Message], None]) -> bool:
        """Hand one message to librdkafka; False when its queue is full (nothing was sent)."""
        try:
            if partition is None:
                producer.produce(topic, value, key, headers=headers, on_delivery=report)
            else:
                producer.produce(topic, value, key, partition, headers=headers,
                                 on_delivery=report)
        except BufferError:
            return False
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            failure = ProducerError(f"cannot queue a message for {topic}: "
                                    f"{error.str() if error is not None else exc}")
            self._failure = self._failure or failure
            raise failure from None
        self._sent += 1
        if self._sent % POLL_EVERY == 0:
            producer.poll(0)
        return True

    def _on_failure(self, error: BaseException) -> None:
        if self._failure is None:
            logger.error("Kafka delivery failed: %s", error)
            self._failure = error

    async def send_schema(self, schema: Mapping[str, Any]) -> asyncio.Future[Any]:
        """Queue a table schema (`Capture.table_schema`) on the schemas topic, partition 0."""
        producer = self._ready()
        key = f"{schema['table']}/{Lsn(schema['lsn']).hex_key()}".encode()
        value = json.dumps(schema, sort_keys=True).encode()
        delivery = await self._send(producer, self._schemas, value, key, TRANSACTIONS_PARTITION,
                                    [("table", str(schema["table"]).encode())])
        assert delivery is not None
        return delivery

    async def flush(self) -> None:
        """Wait until every queued message is delivered or failed; raises if one failed."""
        await self._drain(self._ready())
        self._ready()


# --- the claim check ---------------------------------------------------------------------------

#: The header that marks a reference to a claimed change (its value: the object's name).
CLAIM_HEADER: Final = "claim"
#: What a change event's headers and the record's framing add to its key and value, at most
#: (seven short headers; a record batch's header is 61 bytes).
MESSAGE_OVERHEAD: Final = 768
#: A change's commit time (us since the epoch, decimal), sent only when the wedding header,
#: if any, goes too: with `table`, `op`, `lsn` and `seq` they are its segment facts.
TS_HEADER: Final = "ts_us"
#: The change's wedding id, when it has one of at most MAX_WEDDING_HEADER characters.
WEDDING_HEADER: Final = "wedding"
#: A transaction record's table counts as JSON, sent as a header up to this size.
MAX_COUNTS_HEADER: Final = 2048
MAX_WEDDING_HEADER: Final = 128


class ChangeTooLarge(OperatorError):
    """A change is larger than `kafka.claim_check_bytes` and no claims store is configured."""


def claims_opener(url: str, keyring_file: Path | None, environ: Mapping[str, str]
                  ) -> Callable[[], tuple[ObjectStore, Keyring]]:
    """What `ClaimCheck` calls at the first claim: the store at *url* (with retries) and the
    keyring (from *keyring_file*, else the environment); `ChangeTooLarge` if either fails."""
    def opener() -> tuple[ObjectStore, Keyring]:
        from connectors.errors import StoreError, safe_url
        from connectors.registry import open_store
        from connectors.retry import RetryingStore
        from replicator.crypto import CryptoError

        try:
            keyring = Keyring.from_file(keyring_file) if keyring_file else \
                Keyring.from_env(environ)
            return RetryingStore(open_store(url, environ)), keyring
        except (CryptoError, StoreError, OSError, ValueError) as exc:
            raise ChangeTooLarge(f"a change is larger than kafka.claim_check_bytes, and the "
                                 f"claims store {safe_url(url)} cannot be used: {exc}") from None
    return opener


class ClaimCheck:
    """The claim-check pattern for changes too large for Kafka: the message value as it would
    have been sent goes to the claims store as `claims/<commit lsn>-<seq>-<digest>.avro`
    (create-only, encrypted with the keyring like every object), and the topic gets a small
    reference instead (`reference`, documented in docs/EVENTS.md). The store and keyring come
    from *opener*, called at the first claim (so a capture that never meets a large change
    needs neither)."""

    def __init__(self, opener: Callable[[], tuple[ObjectStore, Keyring]]) -> None:
        self._opener = opener
        self._opened: tuple[ObjectStore, Keyring] | None = None
        self.claimed = 0

    async def reference(self, commit_lsn: Lsn, seq: int, value: bytes) -> tuple[str, bytes]:
        """Store *value*; return its object name and the reference to send in its place (the
        store has it before this returns, so a reference never points at nothing)."""
        if self._opened is None:
            self._opened = self._opener()
        store, keyring = self._opened
        digest = hashlib.sha256(value).hexdigest()
        key = claim_key(commit_lsn, seq, digest[:16])
        sealed = await asyncio.to_thread(encrypt, value, key, keyring)
        with contextlib.suppress(AlreadyExists):  # sent before: the same bytes
            await store.put(key, sealed)
        self.claimed += 1
        return key, json.dumps({"claim": key, "store": store.url, "size": len(value),
                                "sha256": digest}, sort_keys=True).encode()

    async def close(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            await opened[0].close()
