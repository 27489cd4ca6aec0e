"""How a sink writes what it buffered: segments (or snapshot parts), transaction records and
schemas, each encrypted under its name; into the store, or, while the store is out, into a
spool batch (sink/spool.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from connectors.base import ObjectStore
from connectors.errors import AlreadyExists
from replicator.archive.layout import part_key, schema_key, segment_key, transactions_key
from replicator.archive.part import encode_part, partable
from replicator.archive.segment import (
    EventFacts,
    encode_body_segment,
    encode_transaction_body_segment,
)
from replicator.config import DestinationConfig
from replicator.crypto import Keyring, encrypt
from replicator.events import Tier
from replicator.position import Lsn
from replicator.sink.breaker import TokenBucket
from replicator.sink.offsets import Pending
from replicator.sink.spool import SpoolBatch
from replicator.sink.stats import SinkStats

__all__ = ["ArchiveWriter", "Buffered"]


@dataclass(slots=True)
class Buffered:
    facts: EventFacts  # what the segment's header needs (`archive.segment.event_facts`)
    body: bytes  # the envelope in Avro binary, as it goes into the segment
    value: dict[str, Any] | None  # the decoded envelope, kept only for snapshot rows (parts)
    position: tuple[Lsn, int]
    size: int
    entry: Pending  # its place in the offset ledger


class ArchiveWriter:
    def __init__(self, destination: DestinationConfig, store: ObjectStore, keyring: Keyring,
                 bucket: TokenBucket, stats: SinkStats) -> None:
        self.destination = destination
        self.store = store
        self.keyring = keyring
        self.bucket = bucket
        self.stats = stats
        self.batch: SpoolBatch | None = None  # set while a flush goes into the spool

    async def put(self, key: str, data: bytes) -> None:
        """*data* encrypted under *key*: into the spool batch if one is open, else the store."""
        sealed = await asyncio.to_thread(encrypt, data, key, self.keyring)
        if self.batch is not None:
            await self.batch.put(key, sealed)
            return
        await self.bucket.take(len(sealed))
        try:
            await self.store.put(key, sealed)
        except AlreadyExists:
            return  # same name, same digest: written by an earlier attempt
        self.stats.segments_written += 1
        self.stats.bytes_written += len(sealed)

    async def put_stored(self, key: str, data: bytes) -> None:
        """Into the store only, never the spool (checkpoints, recorded gaps, progress)."""
        batch, self.batch = self.batch, None
        try:
            await self.put(key, data)
        finally:
            self.batch = batch

    async def schema(self, schema: dict[str, Any]) -> None:
        table, lsn = str(schema["table"]), Lsn(schema["lsn"])
        await self.put(schema_key(table, lsn), json.dumps(schema, sort_keys=True).encode())

    async def segment(self, table: str, items: list[Buffered], tier: Tier) -> None:
        snapshot = [i.value for i in items if i.value is not None]
        if snapshot and partable(snapshot):
            # Snapshot rows of one LSN: a part, which a restore streams into COPY
            # (sink.part); whatever else was buffered goes to a segment as usual.
            data, part = await asyncio.to_thread(encode_part, snapshot, table=table,
                                                 tier=tier.value)
            digest = hashlib.sha256(data).hexdigest()[:16]
            await self.put(part_key(table, part.lsn, part.first_seq, part.last_seq, digest),
                           data)
            self.stats.changes_written += part.rows
            items = [i for i in items if i.value is None]
            if not items:
                return
        data, header = await asyncio.to_thread(
            encode_body_segment, [(i.facts, i.body) for i in items], table=table,
            codec=self.destination.compression)
        digest = hashlib.sha256(data).hexdigest()[:16]
        key = segment_key(table, header.first.commit_lsn, header.last.commit_lsn, digest)
        await self.put(key, data)
        self.stats.changes_written += header.rows

    async def transactions(self, records: list[tuple[dict[str, Any], bytes]]) -> None:
        # The encoder orders them and keeps one copy of each (redeliveries).
        data, header = await asyncio.to_thread(encode_transaction_body_segment, records,
                                               codec=self.destination.compression)
        digest = hashlib.sha256(data).hexdigest()[:16]
        await self.put(transactions_key(header.first.commit_lsn, header.last.commit_lsn,
                                        digest), data)
