"""Synthetic traffic for the sink tests: transactions of `public.guests` changes, with their
boundary records, produced straight into a test's topics (no Postgres), and a sink run in
its own `replicator run --only sinks` process or in this one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from connectors.base import ObjectStore
from replicator.archive import reader
from replicator.config import (
    CompactionConfig,
    Config,
    DestinationConfig,
    KafkaConfig,
    SourceConfig,
)
from replicator.events import ChangeEvent, Op, Tier, TransactionRecord
from replicator.position import ChangePosition, Lsn
from replicator.sink.worker import SinkWorker
from replicator.transport.avro import EventCodec
from replicator.transport.kafka import EventProducer, ensure_topics
from tests.integration import archive_readers as archive
from tests.integration.archive_helpers import keyring
from tests.integration.capture_helpers import wait_for

TABLE = "public.guests"
TS = 1_700_000_000_000_000
NO_COMPACTION = CompactionConfig(enabled=False)
#: The LSN of the synthetic snapshot; transactions follow it, 0x100 apart.
SNAPSHOT_LSN = 0x1000


def sink_config(kafka: KafkaConfig, *dests: DestinationConfig) -> Config:
    """A configuration for `replicator run --only sinks` (its source is never opened)."""
    return Config(source=SourceConfig(dsn="host=127.0.0.1 dbname=unused"), kafka=kafka,
                  destinations=dests)


def change(lsn: int, seq: int, ident: int, tier: Tier, *, op: Op = Op.CREATE,
           payload: str = "x", ts: int = TS) -> ChangeEvent:
    return ChangeEvent(op, "public", "guests", ChangePosition(Lsn(lsn), seq), ts, 7,
                       {"id": ident}, None, {"id": ident, "name": payload}, tier=tier)


@dataclass
class Traffic:
    """Transactions produced so far: `ids` the guest ids they wrote, `end` the end LSN of
    the last one (a checkpoint at or above it covers them all)."""

    producer: EventProducer
    next_lsn: int = SNAPSHOT_LSN + 0x100
    next_id: int = 1
    ids: set[int] = field(default_factory=set)
    end: int = 0

    async def snapshot(self, rows: int, tier: Tier = Tier.LOW) -> None:
        """A snapshot of *rows* rows at `SNAPSHOT_LSN`, with its boundary record (xid 0)."""
        for seq in range(rows):
            await self.producer.send_event(change(SNAPSHOT_LSN, seq, self.next_id, tier,
                                                  op=Op.READ))
            self.ids.add(self.next_id)
            self.next_id += 1
        await self.producer.send_transaction(TransactionRecord(
            Lsn(SNAPSHOT_LSN), Lsn(SNAPSHOT_LSN - 1), TS, 0, {TABLE: rows}, None,
            {tier.value: rows}))
        await self.producer.flush()

    async def transaction(self, changes: int, tier: Tier = Tier.CRITICAL, *,
                          payload: str = "x", skip: int | None = None, ts: int = TS) -> Lsn:
        """One transaction of *changes* inserts committed at *ts* (us); *skip* leaves that
        change out of the topic (the caller puts something else there) while its record
        still counts it."""
        lsn = self.next_lsn
        self.next_lsn += 0x100
        for seq in range(changes):
            if seq != skip:
                await self.producer.send_event(change(lsn, seq, self.next_id, tier,
                                                      payload=payload, ts=ts))
                self.ids.add(self.next_id)
            self.next_id += 1
        await self.producer.send_transaction(TransactionRecord(
            Lsn(lsn), Lsn(lsn + 0x10), ts, 7, {TABLE: changes}, None, {tier.value: changes}))
        self.end = lsn + 0x10
        return Lsn(lsn)


@contextlib.asynccontextmanager
async def traffic(kafka: KafkaConfig) -> AsyncIterator[Traffic]:
    await ensure_topics(kafka.bootstrap_servers, kafka.topic_prefix, kafka.partitions, 1)
    async with EventProducer(kafka, EventCodec()) as producer:
        yield Traffic(producer)
        await producer.flush()


@contextlib.asynccontextmanager
async def running(worker: SinkWorker) -> AsyncIterator[asyncio.Task[None]]:
    """*worker* running in this process; stopped (and its error raised) at the end."""
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)


async def covered(store: ObjectStore, destination: str, end: int, *,
                  alive: object = None, within: float = 60) -> None:
    """Until *destination*'s checkpoint in *store* covers the end LSN *end*."""
    async def done() -> bool:
        if callable(alive):
            alive()
        return await reader.checkpoint(store, destination, keyring=keyring()) >= end
    await wait_for(done, within=within, what=f"{destination}'s checkpoint at {Lsn(end)}")


async def archived_ids(store: ObjectStore) -> set[int]:
    """The guest ids of every change and snapshot row archived in *store*."""
    ids: set[int] = set()
    async for record in archive.change_records(store, keyring(), TABLE):
        ids.add(int(record["key"]["id"]) if isinstance(record["key"], dict)
                else int(record["key"][1]["id"]))
    return ids
