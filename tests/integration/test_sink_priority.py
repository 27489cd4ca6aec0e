"""Under backlog a sink reads the critical tier first: lower tiers wait while critical
partitions are behind."""

from __future__ import annotations

import asyncio
import contextlib

from connectors.registry import open_store
from replicator.config import DestinationConfig, FlushConfig, KafkaConfig
from replicator.events import ChangeEvent, Op, Tier
from replicator.position import ChangePosition, Lsn
from replicator.sink.worker import CRITICAL_BACKLOG, SinkWorker
from replicator.transport.avro import EventCodec
from replicator.transport.kafka import EventProducer, ensure_topics
from tests.integration.archive_helpers import keyring, sink_environ

BACKLOG = 3000


def event(i: int, tier: Tier) -> ChangeEvent:
    return ChangeEvent(Op.CREATE, "public", "guests", ChangePosition(Lsn(1000 + i), 0),
                       1_700_000_000_000_000, i, {"id": i}, None, {"id": i, "name": "x"},
                       tier=tier)


async def test_backlog_is_read_critical_first(kafka_bootstrap: str, topic_prefix: str) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix,
                        partitions=1, linger_ms=5)
    await ensure_topics(kafka_bootstrap, topic_prefix, 1, 1)
    async with EventProducer(kafka, EventCodec()) as producer:
        for i in range(BACKLOG):  # the low backlog was written first
            await producer.send_event(event(i, Tier.LOW))
        for i in range(BACKLOG, 2 * BACKLOG):
            await producer.send_event(event(i, Tier.CRITICAL))
        await producer.flush()
    slow = FlushConfig(critical_s=3600, high_s=3600, normal_s=3600, low_s=3600,
                       max_rows=10 * BACKLOG)
    destination = DestinationConfig(name="prio", url=f"mem://{topic_prefix}", flush=slow)
    worker = SinkWorker(destination, kafka, open_store(destination.url, sink_environ()),
                        keyring())
    worker.poll_records = 200  # small polls, so the order of reading is visible
    order: list[Tier] = []
    add_change = worker._add_change

    def recording(tp: object, tier: Tier, record: object) -> None:
        order.append(tier)
        add_change(tp, tier, record)  # type: ignore[arg-type]

    worker._add_change = recording  # type: ignore[method-assign]
    task = asyncio.create_task(worker.run())
    try:
        for _ in range(600):
            if len(order) >= 2 * BACKLOG:
                break
            await asyncio.sleep(0.02)
    finally:
        worker.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
    assert order.count(Tier.CRITICAL) == BACKLOG and order.count(Tier.LOW) == BACKLOG
    # No low record was read while critical partitions were more than the threshold behind.
    first_low = order.index(Tier.LOW)
    assert first_low >= BACKLOG - CRITICAL_BACKLOG, first_low
