"""What a sink writes besides segments: its checkpoint objects, and dead letters.

Checkpoint objects are sealed (`archive.reader.checkpoint_document`, encrypted under their
name) and pruned to the newest `CHECKPOINTS_KEPT` per tier after each write.

A dead letter (`deadletters/<topic>/<partition>-<offset>.json`) is encrypted JSON: the raw
key, value and headers in base64, the error, and where the record was read.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from connectors.base import ObjectStore
from connectors.errors import StoreError
from replicator.archive import reader
from replicator.archive.layout import (
    checkpoint_key,
    dead_letter_key,
    eve_key,
    gap_key,
    incident_key,
)
from replicator.archive.reader import CHECKPOINTS_KEPT, checkpoint_document, checkpoint_names
from replicator.crypto import Keyring
from replicator.events import TIER_ORDER, Tier
from replicator.position import Lsn
from replicator.transport.control import StateFollower

log = logging.getLogger(__name__)

__all__ = ["CheckpointObjects", "RecordedGaps", "dead_letter", "expired_letter", "lost_range"]


class CheckpointObjects:
    """One destination's checkpoint objects: the newest read back, new ones written (sealed,
    through *put*, the sink's own encrypting writer), old ones pruned."""

    def __init__(self, store: ObjectStore, destination: str, keyring: Keyring,
                 put: Callable[[str, bytes], Awaitable[None]]) -> None:
        self.store = store
        self.destination = destination
        self.keyring = keyring
        self._put = put
        # Names written or found, oldest first, per tier (None: overall), for pruning.
        self._names: dict[Tier | None, list[str]] = {}

    async def latest(self, tier: Tier | None) -> Lsn:
        return await reader.checkpoint(self.store, self.destination, tier,
                                       keyring=self.keyring)

    async def restore(self) -> tuple[Lsn, dict[Tier, Lsn]]:
        """The newest overall and per-tier checkpoints; the stored names, for pruning."""
        overall = await self.latest(None)
        tiers = {t: await self.latest(t) for t in TIER_ORDER}
        for tier in (None, *TIER_ORDER):
            self._names[tier] = [key for _, key in await checkpoint_names(
                self.store, self.destination, tier)]
        return overall, tiers

    async def write(self, lsn: Lsn, tier: Tier | None) -> None:
        """The checkpoint object, sealed: its JSON names the LSN, encrypted under its name."""
        key = checkpoint_key(self.destination, lsn, tier)
        await self._put(key, checkpoint_document(self.destination, lsn, tier))
        names = self._names.setdefault(tier, [])
        if key not in names:
            names.append(key)

    async def prune(self) -> None:
        """Delete all but the newest `CHECKPOINTS_KEPT` checkpoints of each tier; a failure
        is only logged (the next flush tries again)."""
        for names in self._names.values():
            if len(names) <= CHECKPOINTS_KEPT:
                continue
            old = names[:-CHECKPOINTS_KEPT]
            try:
                await self.store.delete(old)
            except (StoreError, OSError) as exc:
                log.warning("destination %s: cannot delete old checkpoints (%s)",
                            self.destination, exc)
                return
            del names[:len(old)]


class RecordedGaps:
    """The gaps the capture recorded (`gap/<from>-<to>` in its state topic), archived as
    `gaps/<from>-<to>.json`."""

    def __init__(self, state: StateFollower, destination: str,
                 put: Callable[[str, bytes], Awaitable[None]]) -> None:
        self._state = state
        self.destination = destination
        self._put = put
        self._due: dict[str, dict[str, Any]] = {}  # key -> content, not yet written

    async def archive(self) -> None:
        """Write the gaps recorded so far. The capture puts a gap (acks=all) before it
        produces anything after it, and this reads the state topic to its end now: so a
        checkpoint written after this never passes a gap the store does not show."""
        for key, value in await self._state.read_new():
            if key.startswith(("gap/", "eve/", "incident/")) and value is not None:
                self._due[key] = value
        for key, value in list(self._due.items()):
            if key.startswith(("eve/", "incident/")):  # replicator.eve, ops.incidents
                try:
                    name = (eve_key(str(value["wedding"]), str(value["date"]))
                            if key.startswith("eve/") else incident_key(str(value["id"])))
                except (KeyError, ValueError) as exc:
                    log.warning("destination %s: state entry %s is not a record (%s)",
                                self.destination, key, exc)
                else:
                    await self._put(name, json.dumps(value, sort_keys=True).encode())
                del self._due[key]
                continue
            start, end = Lsn(value["from_lsn"]), Lsn(value["to_lsn"])
            await self._put(gap_key(start, end), json.dumps(value, sort_keys=True).encode())
            del self._due[key]
            log.info("destination %s: the recorded gap %s-%s is archived (%s)",
                     self.destination, start, end, value.get("reason", ""))


def dead_letter(tp: TopicPartition, record: ConsumerRecord[Any, Any], exc: Exception,
                destination: str) -> tuple[str, bytes]:
    """The name and (plaintext) content of *record*'s dead letter."""

    def b64(data: bytes | None) -> str | None:
        return None if data is None else base64.b64encode(data).decode()

    return dead_letter_key(tp.topic, tp.partition, record.offset), json.dumps({
        "topic": tp.topic, "partition": tp.partition, "offset": record.offset,
        "timestamp_ms": record.timestamp, "key": b64(record.key), "value": b64(record.value),
        "headers": [[name, b64(value)] for name, value in record.headers or ()],
        "error": f"{type(exc).__name__}: {exc}", "destination": destination,
        "parked_at": time.time(),
    }, sort_keys=True).encode()


def expired_letter(tp: TopicPartition, offset: int, start: int,
                   destination: str) -> tuple[str, bytes]:
    """The dead letter of records *offset* to *start* - 1 of *tp*, deleted from Kafka (its
    retention) before the destination archived them: no checkpoint may pass them, and a
    replay past the checkpoint is refused naming this object."""
    return dead_letter_key(tp.topic, tp.partition, offset), json.dumps({
        "topic": tp.topic, "partition": tp.partition, "offset": offset,
        "expired_to": start, "destination": destination, "parked_at": time.time(),
        "error": f"records {offset} to {start - 1} were deleted from Kafka (retention shorter "
                 "than the destination's outage) before they were archived here",
    }, sort_keys=True).encode()


async def lost_range(consumer: AIOKafkaConsumer, tp: TopicPartition, expected: int,
                     first: int, destination: str) -> tuple[str, bytes] | None:
    """*tp*'s records jumped from *expected* to *first*: if Kafka no longer has *expected*
    (its retention deleted it before this destination archived it), the dead letter naming
    the lost range, logged loudly; else None (offsets taken by something else)."""
    start = (await consumer.beginning_offsets([tp]))[tp]
    if start <= expected:
        return None
    letter = expired_letter(tp, expected, min(start, first), destination)
    log.critical("destination %s: records %s/%d from offset %d to %d were deleted from Kafka "
                 "(its retention) before this destination archived them; every checkpoint of "
                 "the destination holds below them, and the dead letter %s names them",
                 destination, tp.topic, tp.partition, expected, min(start, first) - 1,
                 letter[0])
    return letter
