"""The transport against the real Kafka broker: topics, encoded events, keys, headers, and the
acknowledgement watermark fed by real delivery futures."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2 as java_murmur2

from replicator.config import KafkaConfig
from replicator.events import ChangeEvent, Op, Tier, TransactionRecord
from replicator.keys import Infinity, Interval
from replicator.position import ChangePosition, Lsn
from replicator.transport.avro import (
    EventCodec,
    UnknownSchemaError,
    event_from_dict,
    transaction_from_dict,
)
from replicator.transport.kafka import (
    DeliveryFailed,
    EventProducer,
    ProducerError,
    ensure_topics,
    message_key,
    schemas_topic,
    topic_names,
    transactions_topic,
)
from replicator.transport.registry import RegistryClient, adopt_schema_id
from replicator.transport.watermark import AckWatermark

pytestmark = pytest.mark.integration

EVERY_KIND: dict[str, Any] = {
    "id": 1,
    "flag": True,
    "count": -(2**63),
    "ratio": 0.1,
    "name": "Zoë 💍",
    "photo": b"\x00\x01\xff",
    "budget": Decimal("12345678901234567890.000000000000000001"),
    "not_a_number": Decimal("Infinity"),
    "starts": datetime(2025, 6, 14, 15, 30, 0, 1),
    "updated": datetime(2025, 6, 14, 13, 30, 0, 2, tzinfo=UTC),
    "day": date(2025, 6, 14),
    "open_end": Infinity.POSITIVE,
    "ceremony": time(15, 0),
    "local": time(15, 0, tzinfo=timezone(timedelta(hours=2))),
    "lead": Interval(1, 2, 3_000_000),
    "wedding": UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    "prefs": '{"vegan": true, "n": 1.10}',
    "grid": [[1, None], [2, 3]],
    "nothing": None,
}
HINTS = {"prefs": "jsonb", "open_end": "date"}


def change(i: int, seq: int, *, row: int, tier: Tier, after: dict[str, Any] | None = None
           ) -> ChangeEvent:
    commit, _ = tx_lsns(i)
    return ChangeEvent(
        op=Op.UPDATE if seq else Op.CREATE,
        schema="public",
        table="guests",
        position=ChangePosition(commit, seq),
        commit_ts_us=1_718_000_000_000_000 + i,
        xid=1000 + i,
        key={"id": row},
        after=after or {"id": row, "version": i * 100 + seq},
        db="wedsync",
        tier=tier,
        wedding_id=f"w-{row % 3}",
    )


def tx_lsns(i: int) -> tuple[Lsn, Lsn]:
    commit = 0x16_0000_0000 + 0x1000 * i
    return Lsn(commit), Lsn(commit + 0x38)


async def consume(bootstrap: str, topics: list[str], count: int) -> list[Any]:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        records: list[Any] = []
        while len(records) < count:
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, f"only {len(records)} of {count} records arrived"
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        await consumer.stop()


async def partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(topics)}
    finally:
        await admin.close()


async def test_ensure_topics_creates_missing_and_leaves_existing_alone(
    kafka_bootstrap: str, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    high = topic_names(topic_prefix)[Tier.HIGH]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(high, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    with caplog.at_level(logging.WARNING, logger="replicator.transport.kafka"):
        counts = await ensure_topics(kafka_bootstrap, topic_prefix, 3, 1)
    expected = {name: 3 for name in topic_names(topic_prefix).values()}
    expected[high] = 1  # existing: kept as it is, with a warning
    expected[transactions_topic(topic_prefix)] = 1  # one partition keeps commit order
    expected[schemas_topic(topic_prefix)] = 1  # compacted: every table's schema history
    assert counts == expected
    assert await partition_counts(kafka_bootstrap, list(expected)) == expected
    assert any(high in r.getMessage() and "fewer than the 3" in r.getMessage()
               for r in caplog.records)

    # Idempotent: a second run creates nothing and changes nothing.
    assert await ensure_topics(kafka_bootstrap, topic_prefix, 6, 1) == expected


async def test_events_arrive_decoded_keyed_ordered_with_headers(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    await ensure_topics(kafka_bootstrap, topic_prefix, 3, 1)
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix,
                         partitions=3, compression="zstd", linger_ms=20)
    codec = EventCodec(topic_prefix)
    tiers = [Tier.CRITICAL, Tier.NORMAL]
    sent: list[ChangeEvent] = [change(0, 0, row=0, tier=Tier.CRITICAL, after=EVERY_KIND)]
    for i in range(1, 6):  # five transactions, each updating rows 1..6 once
        for row in range(1, 7):
            sent.append(change(i, row, row=row, tier=tiers[row % 2]))
    async with EventProducer(config, codec) as producer:
        futures = [await producer.send_event(ev, HINTS) for ev in sent]
        await producer.flush()
    assert all(f.done() and f.exception() is None for f in futures)

    topics = [topic_names(topic_prefix)[t] for t in tiers]
    records = await consume(kafka_bootstrap, topics, len(sent))
    assert len(records) == len(sent)

    by_position = {ev.position: ev for ev in sent}
    partitions_of_key: dict[bytes, set[tuple[str, int]]] = defaultdict(set)
    versions: dict[tuple[str, int], list[int]] = defaultdict(list)
    for record in records:
        back = event_from_dict(codec.decode_event(record.value))
        original = by_position[back.position]
        assert back == original
        assert record.topic == topic_names(topic_prefix)[original.tier]
        assert record.key == message_key(original)
        headers = {name: value.decode() for name, value in record.headers}
        assert headers == {"table": "public.guests", "op": str(original.op),
                           "lsn": str(original.commit_lsn),
                           "seq": str(original.position.seq), "tier": str(original.tier),
                           "ts_us": str(original.commit_ts_us)} | (
            {"wedding": original.wedding_id} if original.wedding_id is not None else {})
        partitions_of_key[record.key].add((record.topic, record.partition))
        # The partition the Java client's default partitioner gives the key (3 partitions).
        assert record.partition == (java_murmur2(record.key) & 0x7FFFFFFF) % 3
        assert back.after is not None
        versions[record.topic, record.partition].append(back.after.get("version", -1))

    every_kind = next(event_from_dict(codec.decode_event(r.value)) for r in records
                      if r.key == message_key(sent[0]))
    assert every_kind.after == EVERY_KIND
    # One row, one partition; within a partition, each row's versions arrive in order.
    assert all(len(places) == 1 for places in partitions_of_key.values())
    for record_versions in versions.values():
        per_row: dict[int, list[int]] = defaultdict(list)
        for version in record_versions:
            per_row[version % 100].append(version)
        assert all(v == sorted(v) for v in per_row.values())


async def test_watermark_reaches_the_last_end_lsn_only_after_every_delivery(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    await ensure_topics(kafka_bootstrap, topic_prefix, 3, 1)
    # A long linger keeps the first batches in the producer while later ones are queued.
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix,
                         compression="lz4", linger_ms=300)
    codec = EventCodec(topic_prefix)
    watermark = AckWatermark()
    delivered: list[asyncio.Future[Any]] = []
    tx_futures: dict[int, list[asyncio.Future[Any]]] = defaultdict(list)
    violations: list[str] = []

    def check(_: asyncio.Future[Any]) -> None:
        """On every delivery: a confirmable end LSN means all its transaction's messages and
        every earlier transaction's are delivered."""
        confirmed = watermark.confirmable()
        for i, futures in tx_futures.items():
            reached = confirmed is not None and confirmed >= tx_lsns(i)[1]
            if reached and not all(f.done() for f in futures):
                violations.append(f"confirmed {confirmed} before tx {i} was delivered")

    async with EventProducer(config, codec) as producer:
        for i in range(8):
            commit, end = tx_lsns(i)
            events = [change(i, seq, row=seq, tier=list(Tier)[seq % 4]) for seq in range(5)]
            watermark.begin_tx(commit, end, len(events) + 1)
            for ev in events:
                tx_futures[i].append(await producer.send_event(ev))
            record = TransactionRecord(commit, end, ev.commit_ts_us, ev.xid,
                                       {"public.guests": len(events)})
            tx_futures[i].append(await producer.send_transaction(record))
            for future in tx_futures[i]:
                watermark.track(commit, future)
                future.add_done_callback(check)
                delivered.append(future)
        if not all(f.done() for f in delivered):
            assert watermark.confirmable() != tx_lsns(7)[1]
        await asyncio.gather(*delivered)
    await asyncio.sleep(0)  # let the last done-callbacks run
    assert violations == []
    assert watermark.confirmable() == tx_lsns(7)[1]
    assert watermark.pending_transactions == 0

    records = await consume(kafka_bootstrap, [transactions_topic(topic_prefix)], 8)
    assert [r.partition for r in records] == [0] * 8
    assert [transaction_from_dict(codec.decode_transaction(r.value)).commit_lsn
            for r in records] == [tx_lsns(i)[0] for i in range(8)]


async def test_a_failed_delivery_surfaces_on_the_next_call(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The broker rejects a record bigger than the topic allows; the delivery future fails,
    the watermark does not move, and the next send raises instead of hanging."""
    low = topic_names(topic_prefix)[Tier.LOW]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(low, num_partitions=1, replication_factor=1,
                                            topic_configs={"max.message.bytes": "2000"})])
    finally:
        await admin.close()
    await ensure_topics(kafka_bootstrap, topic_prefix, 1, 1)
    config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix)
    codec = EventCodec(topic_prefix)
    watermark = AckWatermark()
    commit, end = tx_lsns(0)
    watermark.begin_tx(commit, end, 1)
    too_big = change(0, 0, row=1, tier=Tier.LOW, after={"id": 1, "bio": os.urandom(20_000).hex()})
    # Without a future (the capture's stream): the callback gets the same error.
    reports: list[BaseException | None] = []
    async with EventProducer(config, codec) as producer:
        await producer.publish_event(too_big, None, None, reports.append)
        for _ in range(3000):
            if reports:
                break
            await asyncio.sleep(0.01)
    assert len(reports) == 1 and isinstance(reports[0], DeliveryFailed)
    assert reports[0].code == "MSG_SIZE_TOO_LARGE"
    async with EventProducer(config, codec) as producer:
        delivery = await producer.send_event(too_big)
        watermark.track(commit, delivery)
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(delivery, 30)
        assert isinstance(info.value, DeliveryFailed) and info.value.code == "MSG_SIZE_TOO_LARGE"
        assert watermark.confirmable() is None
        assert watermark.failed_at == commit
        with pytest.raises(ProducerError, match="an earlier Kafka delivery failed"):
            await producer.send_event(change(1, 0, row=2, tier=Tier.LOW))
        with pytest.raises(ProducerError, match="an earlier Kafka delivery failed"):
            await producer.publish_event(change(1, 0, row=2, tier=Tier.LOW), None, None,
                                         lambda error: None)
        with pytest.raises(ProducerError):
            await producer.flush()


async def test_with_a_schema_registry_messages_use_the_confluent_wire_format(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    """Kafka is real; the registry is a minimal fake of the two Confluent REST endpoints the
    client uses, because no schema registry can run locally without Docker."""
    subjects: dict[str, int] = {}
    schemas: dict[int, str] = {}

    async def register(request: web.Request) -> web.Response:
        schema = (await request.json())["schema"]
        schema_id = next((i for i, s in schemas.items() if s == schema), len(schemas) + 1)
        schemas[schema_id] = schema
        subjects[request.match_info["subject"]] = schema_id
        return web.json_response({"id": schema_id})

    async def fetch(request: web.Request) -> web.Response:
        return web.json_response({"schema": schemas[int(request.match_info["id"])]})

    app = web.Application()
    app.router.add_post("/subjects/{subject}/versions", register)
    app.router.add_get("/schemas/ids/{id}", fetch)
    async with TestServer(app) as server:
        url = str(server.make_url(""))
        await ensure_topics(kafka_bootstrap, topic_prefix, 2, 1)
        config = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix,
                             schema_registry_url=url)
        codec = EventCodec(topic_prefix)
        ev = change(0, 0, row=1, tier=Tier.HIGH, after=EVERY_KIND)
        record = TransactionRecord(*tx_lsns(0), ev.commit_ts_us, ev.xid, {"public.guests": 1})
        async with EventProducer(config, codec) as producer:
            await producer.send_event(ev, HINTS)
            await producer.send_transaction(record)
        high = topic_names(topic_prefix)[Tier.HIGH]
        assert set(subjects) == {f"{topic}-value" for topic in
                                 [*topic_names(topic_prefix).values(),
                                  transactions_topic(topic_prefix)]}

        (message,) = await consume(kafka_bootstrap, [high], 1)
        assert message.value[0] == 0
        assert int.from_bytes(message.value[1:5], "big") == subjects[f"{high}-value"]
        reader = EventCodec(topic_prefix)
        with pytest.raises(UnknownSchemaError):
            reader.decode_event(message.value)
        async with RegistryClient(url) as client:
            await adopt_schema_id(client, reader, subjects[f"{high}-value"])
            (boundary,) = await consume(kafka_bootstrap, [transactions_topic(topic_prefix)], 1)
            await adopt_schema_id(client, reader, int.from_bytes(boundary.value[1:5], "big"))
        assert event_from_dict(reader.decode_event(message.value)) == ev
        assert transaction_from_dict(reader.decode_transaction(boundary.value)) == record


async def test_the_schemas_topic_is_compacted(kafka_bootstrap: str, topic_prefix: str) -> None:
    """Table schemas are kept forever (one record per table and LSN), not aged out."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    await ensure_topics(kafka_bootstrap, topic_prefix, 1, 1)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        result = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, schemas_topic(topic_prefix))])
    finally:
        await admin.close()
    entries = {e[0]: e[1] for r in result for res in r.resources for e in res[4]}
    assert entries["cleanup.policy"] == "compact"


async def test_an_unreachable_broker_is_an_error_at_start(topic_prefix: str) -> None:
    # librdkafka connects lazily; start() asks for metadata so the capture fails at once, with
    # the address, instead of queueing messages for a broker that is not there.
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    producer = EventProducer(KafkaConfig(bootstrap_servers=address, topic_prefix=topic_prefix),
                             EventCodec(topic_prefix))
    with pytest.raises(ProducerError, match=f"cannot reach Kafka at {address}"):
        await producer.start()
    with pytest.raises(ProducerError, match="not started"):
        await producer.send_event(change(0, 0, row=1, tier=Tier.LOW))


async def test_a_stopped_producer_does_not_start_again(kafka_bootstrap: str,
                                                       topic_prefix: str) -> None:
    # One-shot: a restart (after a failed delivery) makes a new producer, so a stale one can
    # never resume sending with partition order no longer trusted.
    producer = EventProducer(KafkaConfig(bootstrap_servers=kafka_bootstrap,
                                         topic_prefix=topic_prefix), EventCodec(topic_prefix))
    await producer.start()
    await producer.start()  # idempotent while running
    await producer.stop()
    await producer.stop()  # and stop too
    with pytest.raises(RuntimeError, match="does not start again"):
        await producer.start()
    with pytest.raises(ProducerError, match="not started"):
        await producer.send_event(change(0, 0, row=1, tier=Tier.LOW))
