"""Shared pieces of the capture tests: the sample wedding schema, a config, reading Kafka back."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from replicator.config import Config, KafkaConfig, PriorityConfig, SourceConfig, WeddingLink
from replicator.position import Lsn
from replicator.transport.avro import EventCodec, to_python
from replicator.transport.kafka import all_topics

SCHEMA = """
CREATE TABLE weddings (id bigint PRIMARY KEY, couple text NOT NULL, wedding_date date);
CREATE TABLE guests (id bigint PRIMARY KEY, wedding_id bigint, name text, dietary jsonb,
                     notes text);
CREATE TABLE vendors (id bigint PRIMARY KEY, name text, fee numeric(12,2));
"""


def setup_schema(dsn: str, today: date | None = None) -> None:
    today = today or date.today()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("INSERT INTO weddings VALUES (1, 'Ada & Bo', %s), (2, 'Cy & Di', %s), "
                     "(3, 'Ed & Flo', %s)",
                     (today + timedelta(days=3), today + timedelta(days=60),
                      today + timedelta(days=400)))


def make_config(dsn: str, bootstrap: str, prefix: str, **source: Any) -> Config:
    name = "s" + uuid.uuid4().hex[:12]
    return Config(
        source=SourceConfig(dsn=dsn, slot=name, publication=name, heartbeat_interval_s=0.5,
                            status_interval_s=0.2, **source),
        priority=PriorityConfig(tables={"public.guests": WeddingLink(column="wedding_id")}),
        kafka=KafkaConfig(bootstrap_servers=bootstrap, topic_prefix=prefix, partitions=2,
                          linger_ms=2),
        shutdown_deadline_s=10,
    )


@dataclass
class Record:
    topic: str
    headers: dict[str, str]
    value: dict[str, Any]

    @property
    def position(self) -> tuple[int, int]:
        return int(self.value["source"]["lsn"]), int(self.value["source"]["seq"])


async def read_all(bootstrap: str, prefix: str) -> list[Record]:
    """Every record of every topic of *prefix*, decoded."""
    codec = EventCodec()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    out: list[Record] = []
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            wanted = [t for t in all_topics(prefix) if t in existing]
            described = await admin.describe_topics(wanted) if wanted else []
        finally:
            await admin.close()
        tps = [TopicPartition(d["topic"], p["partition"])
               for d in described for p in d["partitions"]]
        if not tps:
            return out
        consumer.assign(tps)
        for tp, offset in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, offset)
        end = await consumer.end_offsets(tps)
        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in tps])

        while await behind():
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, records in batch.items():
                for r in records:
                    headers = {k: v.decode() for k, v in r.headers}
                    assert r.value is not None
                    if tp.topic.endswith(".transactions"):
                        value = codec.decode_transaction(r.value)
                    else:
                        value = codec.decode_event(r.value)
                        for part in ("before", "after", "key"):
                            if value[part] is not None:
                                value[part] = to_python(value[part])
                    out.append(Record(tp.topic, headers, value))
    finally:
        await consumer.stop()
    return out


async def slot_confirmed(dsn: str, slot: str) -> Lsn | None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (slot,))
        row = await cur.fetchone()
    return Lsn.parse(row[0]) if row and row[0] else None


async def holds(value: bool) -> bool:
    """For `wait_for` on a plain condition: `wait_for(lambda: holds(x > 3))`."""
    return value


async def wait_for(predicate: Any, within: float = 30.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if await predicate():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.2)
