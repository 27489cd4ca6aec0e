"""The capture's own durable state, kept in Kafka next to the data it describes.

Topic `<prefix>.capture-state`: one partition, compacted, JSON values keyed by what they
describe. On restart the capture reads it from the beginning, so its state comes from the
durable side, never from local memory (like Kafka Connect's offsets topic for Debezium):

- `slot` -> `{"slot", "created_lsn", "system_id"}`: which slot this capture created, so a
  missing slot later is known to be *lost*, not new;
- `snapshot/<schema.table>` -> `{"table", "lsn", "rows"}`: the table's snapshot is complete in
  Kafka at that LSN; a crash mid-snapshot redoes only the tables without one;
- `gap/<from>-<to>` -> `{"from_lsn", "to_lsn", "reason", "recorded_at"}`: changes between
  these LSNs may be missing (a lost slot replaced after the operator confirmed); each sink
  archives it as `gaps/<from>-<to>.json` before its checkpoint passes it (`StateFollower`),
  so a replay from the store alone refuses points inside it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from replicator.errors import TransientError
from replicator.position import Lsn


class StateUnavailable(TransientError):
    """The capture-state topic could not be read now."""


def state_topic(prefix: str) -> str:
    return f"{prefix}.capture-state"


class CaptureState:
    """A read-everything-then-append view of the state topic."""

    def __init__(self, bootstrap: str, prefix: str, replication_factor: int = 1) -> None:
        self.bootstrap = bootstrap
        self.topic = state_topic(prefix)
        self.replication_factor = replication_factor
        self.entries: dict[str, dict[str, Any]] = {}
        self._producer: AIOKafkaProducer | None = None

    async def load(self) -> None:
        """Create the topic if missing, then read it to the end."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            await admin.start()  # inside: a client whose start failed is closed too
            await admin.create_topics([NewTopic(
                self.topic, num_partitions=1, replication_factor=self.replication_factor,
                topic_configs={"cleanup.policy": "compact"})])
        except TopicAlreadyExistsError:
            pass
        finally:
            await admin.close()
        follower = StateFollower(self.bootstrap, self.topic, exists=True)
        try:
            for key, value in await follower.read_new():
                if value is None:
                    self.entries.pop(key, None)
                else:
                    self.entries[key] = value
        finally:
            await follower.close()

    async def put(self, key: str, value: dict[str, Any]) -> None:
        """Write one entry and wait until Kafka has it (acks=all)."""
        if self._producer is None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                        enable_idempotence=True)
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
            self._producer = producer
        await self._producer.send_and_wait(self.topic, json.dumps(value, sort_keys=True).encode(),
                                           key=key.encode())
        self.entries[key] = value

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    # --- typed views ----------------------------------------------------------------------

    def snapshot_done(self, table: str) -> Lsn | None:
        """The LSN of the table's last complete snapshot; None when it has none, or when a
        DDL since (a rewrite, a rename, a creation) left it due for another."""
        entry = self.entries.get(f"snapshot/{table}")
        return Lsn(entry["lsn"]) if entry and "due_from" not in entry else None

    async def mark_resnapshot_due(self, table: str, lsn: Lsn) -> None:
        """A DDL at *lsn* rewrote, renamed or created *table*: the next start snapshots it
        again unless a snapshot is recorded after this."""
        await self.put(f"snapshot/{table}", {"table": table, "due_from": int(lsn)})

    async def mark_snapshot(self, table: str, lsn: Lsn, rows: int) -> None:
        await self.put(f"snapshot/{table}", {"table": table, "lsn": int(lsn), "rows": rows})

    @property
    def slot(self) -> dict[str, Any] | None:
        return self.entries.get("slot")

    async def mark_slot(self, slot: str, created_lsn: Lsn, system_id: str) -> None:
        await self.put("slot", {"slot": slot, "created_lsn": int(created_lsn),
                                "system_id": system_id})

    def gaps(self) -> list[tuple[Lsn, Lsn]]:
        return sorted((Lsn(v["from_lsn"]), Lsn(v["to_lsn"]))
                      for k, v in self.entries.items() if k.startswith("gap/"))

    async def record_gap(self, start: Lsn, end: Lsn, reason: str) -> None:
        await self.put(f"gap/{start.hex_key()}-{end.hex_key()}", {
            "from_lsn": int(start), "to_lsn": int(end), "reason": reason,
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


class StateFollower:
    """Reads the state *topic* from the start and then whatever was added since, without a
    consumer group and without creating the topic: unless told it *exists*, a topic not in
    the cluster's metadata reads as empty (a sink may run before any capture has).
    `read_new()` reads up to the end offset as of the call, so an entry put (acks=all)
    before the call is among what it returns."""

    def __init__(self, bootstrap: str, topic: str, *, exists: bool = False) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._tp = TopicPartition(topic, 0)
        self._consumer: AIOKafkaConsumer | None = None
        self._assigned = False
        self._exists = exists

    async def read_new(self) -> list[tuple[str, dict[str, Any] | None]]:
        """The entries put since the last call, in order: (key, value), None for a removal.
        `StateUnavailable` when Kafka does not answer (try again later)."""
        try:
            return await self._read_new()
        except KafkaError as exc:
            raise StateUnavailable(f"cannot read the capture state topic {self.topic}: "
                                   f"{exc}") from exc

    async def _read_new(self) -> list[tuple[str, dict[str, Any] | None]]:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                        enable_auto_commit=False, auto_offset_reset="earliest")
            try:
                await consumer.start()
            except BaseException:
                await consumer.stop()  # a failed start leaves nothing open
                raise
            self._consumer = consumer
        consumer, tp = self._consumer, self._tp
        if not self._assigned:
            if not self._exists and self.topic not in await consumer.topics():
                return []  # no capture has run yet: nothing recorded
            consumer.assign([tp])
            consumer.seek(tp, (await consumer.beginning_offsets([tp]))[tp])
            self._assigned = True
        end = (await consumer.end_offsets([tp]))[tp]
        out: list[tuple[str, dict[str, Any] | None]] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            for record in batch.get(tp, []):
                if record.key is not None:
                    out.append((record.key.decode(),
                                None if record.value is None else json.loads(record.value)))
        return out

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
            self._assigned = False


async def last_transaction_lsn(bootstrap: str, topic: str) -> Lsn | None:
    """The commit LSN of the newest transaction record in *topic* (its `lsn` header)."""
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        await consumer.start()  # inside: a consumer whose start failed is closed too
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        if end == 0:
            return None
        consumer.seek(tp, end - 1)
        batch = await consumer.getmany(tp, timeout_ms=5000)
        for record in reversed(batch.get(tp, [])):
            headers = dict(record.headers)
            if "lsn" in headers:
                return Lsn.parse(headers["lsn"].decode())
        return None
    finally:
        await consumer.stop()
