"""Several sink processes for one destination: scale-out through Kafka's consumer group.

Every sink process with the same configuration (`replicator run --only sinks`, as many as the
destination's partitions at most: the four tier topics' partitions plus the transactions and
schemas topics' one each) joins the destination's consumer group `<prefix>.sink.<destination>`,
and Kafka assigns each member some of the partitions. aiokafka's assignment is eager: every
rebalance revokes every partition and assigns them all again (its cooperative-sticky protocol
is not implemented); each member then reads its partitions from their committed offsets.

A member writes the segments of the changes it reads, exactly as a single sink does. The
*checkpointer* is the member that owns the transactions topic's one partition: Kafka's own
assignment elects it, and nothing else coordinates. It alone reads the transaction records,
so it alone can tell when a transaction is complete. Every other member, after each flush,
writes a progress object (`progress_key`): the (tier, commit LSN, seq) of every change that
flush made durable, and whether it parked a record that must hold every checkpoint (a
schema it cannot decode). The checkpointer lists the destination's progress objects at each
of its flushes, counts their changes as it counts its own, writes the checkpoints, and
deletes the progress objects the checkpoint has passed.

Offsets: every member commits a partition's offset only past records that are written and
below the checkpoint (for a member that is not the checkpointer, the newest checkpoint object
in the store). So after any rebalance, crash or kill, every record above the checkpoint is
read again by its partition's next owner and written again (its segment may then exist twice
under different digests; replay de-duplicates by position), and reported again: a new
checkpointer needs nothing of the old one's but the checkpoint objects. The checkpoint can
only pass a change some member reported durable after writing it.

Progress objects are sealed like checkpoints (encrypted under their name with the archive's
keys): one that does not decrypt is not counted (logged), so a forged object cannot make a
checkpoint claim a change that is not in the store; the checkpoint waits instead.

A member that owns every partition (one process, the usual case) writes no progress objects;
after it takes that role it reads and prunes those an earlier member left (one killed and
started again runs beside its own old session until that times out), and then stops listing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any, Final, Protocol

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from connectors.base import ObjectStore
from connectors.errors import NotFound, StoreError
from replicator.archive.layout import progress_key, progress_prefix
from replicator.crypto import CryptoError, Keyring, decrypt
from replicator.events import TIER_BY_NAME, Tier, TransactionRecord
from replicator.position import INVALID_LSN, Lsn

log = logging.getLogger(__name__)


def encode_progress(destination: str, member: str,
                    changes: Iterable[tuple[Tier, Lsn, int]], *, hold: bool,
                    records: Iterable[TransactionRecord] = ()) -> bytes:
    """The plaintext of a progress object: JSON, changes grouped by tier and commit LSN;
    *records*: transaction records it made durable (shipped from a spool by a member that
    is no longer the checkpointer)."""
    grouped: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    top = INVALID_LSN
    for tier, commit_lsn, seq in changes:
        grouped[tier.value][int(commit_lsn)].append(seq)
        top = max(top, commit_lsn)
    return json.dumps({
        "destination": destination, "member": member, "hold": hold, "max_lsn": int(top),
        "changes": {tier: [[lsn, seqs] for lsn, seqs in sorted(by_lsn.items())]
                    for tier, by_lsn in grouped.items()},
        "records": [dataclasses.asdict(r) for r in records],
    }, sort_keys=True).encode()


def _record(doc: Any) -> TransactionRecord:
    if not isinstance(doc, dict):
        raise ValueError("a transaction record is not an object")
    return TransactionRecord(
        commit_lsn=Lsn(doc["commit_lsn"]), end_lsn=Lsn(doc["end_lsn"]),
        commit_ts_us=int(doc["commit_ts_us"]), xid=int(doc["xid"]),
        counts=dict(doc.get("counts") or {}), origin=doc.get("origin"),
        tier_counts=dict(doc.get("tier_counts") or {}), digests=dict(doc.get("digests") or {}))


def decode_progress(doc: dict[str, Any]) -> tuple[list[tuple[Tier, Lsn, int]], bool, Lsn]:
    """(changes, hold, highest commit LSN) of a progress object's JSON; `ValueError` when it
    is not one. Its transaction records: `decode_records`."""
    changes: list[tuple[Tier, Lsn, int]] = []
    raw = doc.get("changes")
    if not isinstance(raw, dict) or not isinstance(doc.get("hold"), bool):
        raise ValueError("not a progress object")
    for name, entries in raw.items():
        tier = TIER_BY_NAME.get(name)
        if tier is None or not isinstance(entries, list):
            raise ValueError(f"unknown tier {name!r}")
        for lsn, seqs in entries:
            if not isinstance(lsn, int) or not isinstance(seqs, list) \
                    or not all(isinstance(s, int) for s in seqs):
                raise ValueError("a change's position is not a number")
            commit_lsn = Lsn(lsn)
            changes.extend((tier, commit_lsn, seq) for seq in seqs)
    top = doc.get("max_lsn")
    if not isinstance(top, int):
        raise ValueError("no max_lsn")
    return changes, doc["hold"], Lsn(top)


def decode_records(doc: dict[str, Any]) -> list[TransactionRecord]:
    """The transaction records of a progress object's JSON; `ValueError` if malformed."""
    try:
        return [_record(r) for r in doc.get("records") or ()]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"a malformed transaction record ({exc})") from None


class ProgressWriter:
    """A member's progress objects: numbered in the order written, under a name of its own
    (a new one each time the process starts)."""

    def __init__(self, destination: str, member: str | None = None) -> None:
        self.destination = destination
        self.member = member or uuid.uuid4().hex[:16]
        self._number = 0
        self.hold = False  # a record that holds every checkpoint was parked here

    def next(self, changes: list[tuple[Tier, Lsn, int]],
             records: Iterable[TransactionRecord] = ()) -> tuple[str, bytes]:
        self._number += 1
        return (progress_key(self.destination, self.member, self._number),
                encode_progress(self.destination, self.member, changes, hold=self.hold,
                                records=records))


class ProgressReader:
    """The checkpointer's view of the other members' progress objects."""

    def __init__(self, store: ObjectStore, destination: str, keyring: Keyring) -> None:
        self.store = store
        self.destination = destination
        self.keyring = keyring
        self._read: dict[str, Lsn] = {}  # name -> highest commit LSN (INVALID: holds)
        self.seen_any = False  # some progress object was found (other members exist)
        self.refused = 0  # objects that did not decrypt or parse
        # Objects may be left to read or prune. A solo member (every partition its own) reads
        # them only while this holds: after a start or a rebalance, what an earlier member
        # of the group reported and the checkpoint has not passed yet, until all are pruned.
        self.pending = True

    def reset(self) -> None:
        """Read every object again (a new tracker starts from the stored checkpoint)."""
        self._read = {}
        self.pending = True

    async def read_new(self) -> tuple[list[tuple[Tier, Lsn, int]], bool,
                                      list[TransactionRecord]]:
        """The changes of the progress objects not read yet, whether one holds every
        checkpoint, and the transaction records they carry (in commit order). Store errors
        propagate (the flush fails and is retried)."""
        changes: list[tuple[Tier, Lsn, int]] = []
        records: list[TransactionRecord] = []
        hold = False
        names = [info.key async for info in self.store.list(progress_prefix(self.destination))
                 if info.key not in self._read]
        for name in names:
            self.seen_any = True
            try:
                data = await self.store.get(name)
            except NotFound:
                continue  # pruned meanwhile by an earlier checkpointer
            try:
                doc = json.loads(decrypt(data, name, self.keyring))
                found, holds, top = decode_progress(doc)
                records.extend(decode_records(doc))
            except (CryptoError, ValueError, TypeError) as exc:
                self._read[name] = Lsn(2**64 - 1)  # never pruned, never counted
                self.refused += 1
                log.error("destination %s: progress object %s is not sealed by this "
                          "archive's keys or is not a progress object (%s); its changes are "
                          "not counted, and the checkpoint waits for them to be written and "
                          "reported again", self.destination, name, exc)
                continue
            changes.extend(found)
            hold = hold or holds
            self._read[name] = INVALID_LSN if holds else max(
                [top, *(r.commit_lsn for r in records)])
        return changes, hold, sorted(records, key=lambda r: r.commit_lsn)

    async def prune(self, checkpoint: Lsn) -> None:
        """Delete the objects read whose changes are all below *checkpoint* (not those that
        hold); a failure is only logged (the next pass tries again)."""
        old = [name for name, top in self._read.items() if top and top < checkpoint]
        if not old:
            self.pending = bool(self._read)
            return
        try:
            await self.store.delete(old)
        except (StoreError, OSError) as exc:
            log.warning("destination %s: cannot delete old progress objects (%s)",
                        self.destination, exc)
            return
        for name in old:
            del self._read[name]
        self.pending = bool(self._read)


class _Member(Protocol):
    def _drop_unwritten(self, revoked: set[TopicPartition], why: str | None = None) -> None: ...

    def _assigned(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None: ...


class Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    """Tells the sink when a rebalance takes its partitions away, and what it was given."""

    def __init__(self, worker: _Member, consumer: AIOKafkaConsumer) -> None:
        self.worker = worker
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            self.worker._drop_unwritten(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker._assigned(self.consumer, set(assigned))


#: A sink process's place in its destination's group, as its log says it.
ROLES: Final = {"solo": "the only member", "checkpointer": "the checkpointer",
                "member": "a member"}


def role_of(consumer: AIOKafkaConsumer, assigned: set[TopicPartition], topics: list[str],
            tx_topic: str) -> str:
    """"solo" (every partition of *topics* and *tx_topic* is in *assigned*), "checkpointer"
    (the transactions partition is) or "member"."""
    every = {TopicPartition(topic, partition) for topic in (*topics, tx_topic)
             for partition in consumer.partitions_for_topic(topic) or ()}
    if every and every <= assigned:
        return "solo"
    return "checkpointer" if TopicPartition(tx_topic, 0) in assigned else "member"
