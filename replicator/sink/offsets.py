"""Which Kafka offsets a sink may commit.

A sink commits a partition's offset only past records that are (a) written to the store and
(b) at or below the checkpoint, so that everything above the committed offset is read again
after a restart (step 3 of the flush in `sink.worker`). `OffsetLedger` keeps, per partition
and in offset order, the records read and not yet committed as `Pending` runs: consecutive
offsets of one transaction share one entry, which counts its records not yet written (a
5M-row snapshot is one transaction: a few entries, not 5M). A flush marks each record written
(`Pending.mark_written`), and `committable(checkpoint)` takes the longest prefix of each
partition that may be committed: whole runs only, so a run whose first records are written
and whose last are still buffered is committed later, never sooner.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError

from replicator.position import INVALID_LSN, Lsn

__all__ = ["OffsetLedger", "Pending", "align", "backlog"]


@dataclass(slots=True)
class Pending:
    """A run of records read and not yet committed: offsets `offset` to `last` of one
    transaction (a record of no transaction is a run of its own)."""

    offset: int
    # The commit LSN of its transaction; INVALID_LSN for a record of no transaction (a
    # schema), which is committable as soon as it is written.
    commit_lsn: Lsn
    last: int  # the run's last offset
    unwritten: int = 1  # its records not yet written
    spooled: bool = False  # written into the local spool: committable whatever the checkpoint

    @property
    def written(self) -> bool:
        return self.unwritten == 0

    def mark_written(self) -> None:
        """One record of the run is written (each record is marked once)."""
        self.unwritten -= 1


class OffsetLedger:
    """The records read and not yet committed, per partition, in offset order."""

    def __init__(self) -> None:
        self._pending: dict[TopicPartition, list[Pending]] = defaultdict(list)
        self._records = 0  # held, over every partition

    def track(self, tp: TopicPartition, offset: int, commit_lsn: Lsn = INVALID_LSN) -> Pending:
        """A record read: it waits here until written and covered by the checkpoint."""
        self._records += 1
        entries = self._pending[tp]
        if entries and commit_lsn:
            last = entries[-1]
            if (last.commit_lsn == commit_lsn and last.last + 1 == offset
                    and last.unwritten > 0):
                last.last = offset
                last.unwritten += 1
                return last
        entry = Pending(offset, commit_lsn, offset)
        entries.append(entry)
        return entry

    def committable(self, checkpoint: Lsn) -> dict[TopicPartition, int]:
        """The next offset to commit per partition (only where it moves), for the records
        written and below *checkpoint*; those entries leave the ledger. The checkpoint is an
        end LSN: a commit at it is not yet covered."""
        offsets: dict[TopicPartition, int] = {}
        for tp, entries in self._pending.items():
            done = 0
            for entry in entries:
                if not entry.written or (entry.commit_lsn and entry.commit_lsn >= checkpoint
                                         and not entry.spooled):
                    break
                done += 1
            if done:
                offsets[tp] = entries[done - 1].last + 1
                self._records -= sum(e.last - e.offset + 1 for e in entries[:done])
                del entries[:done]
        return offsets

    def lowest(self, checkpoint: Lsn) -> Lsn | None:
        """The lowest commit LSN at or above *checkpoint* of the records held (the first such
        of each partition: a partition is read in commit order); None if there is none."""
        lowest: Lsn | None = None
        for entries in self._pending.values():
            for entry in entries:
                if entry.commit_lsn and entry.commit_lsn >= checkpoint:
                    if lowest is None or entry.commit_lsn < lowest:
                        lowest = entry.commit_lsn
                    break
        return lowest

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop what was read from *partitions* (revoked: their next owner reads them again
        from the committed offsets)."""
        for tp in partitions:
            for entry in self._pending.pop(tp, ()):
                self._records -= entry.last - entry.offset + 1

    def __len__(self) -> int:
        """The records held (not the runs)."""
        return self._records

    def runs(self) -> int:
        return sum(len(entries) for entries in self._pending.values())


def align(assigned: set[TopicPartition], lag: dict[str, int], offsets: OffsetLedger,
          checkpoint: Lsn, read_lsn: dict[TopicPartition, Lsn], read_ahead: int,
          unwritten: bool) -> tuple[set[TopicPartition], set[TopicPartition], bool]:
    """The read-ahead bound (`sink.worker`'s docstring): once *read_ahead* records are held,
    the partitions to pause (already past the lowest commit LSN held above the checkpoint)
    and those to read whatever the tiers' priority (not yet past it, and not at their end);
    and whether to flush now (none is left to read and something is *unwritten*). *lag*:
    records behind per "topic/partition"; *read_lsn*: the commit LSN last read of each."""
    if len(offsets) < read_ahead:
        return set(), set(), False
    horizon = offsets.lowest(checkpoint)
    if horizon is None:
        return set(), set(), False
    ahead: set[TopicPartition] = set()
    needed: set[TopicPartition] = set()
    for tp in assigned:
        last = read_lsn.get(tp)
        if last is not None and last > horizon:
            ahead.add(tp)
        elif lag.get(f"{tp.topic}/{tp.partition}") != 0:  # behind, or not known yet
            needed.add(tp)
    if needed:
        return ahead, needed, False
    if unwritten:
        return ahead, needed, True  # all the checkpoint waits for is read: write it
    # Everything read is written and the checkpoint still cannot pass the horizon: waiting
    # would be forever; read on.
    return set(), set(), False


async def backlog(consumer: AIOKafkaConsumer) -> dict[str, int]:
    """Records not read yet, per assigned partition (`"<topic>/<partition>"`). Before the
    first fetch the consumer knows no high-water marks: it asks for them, so that a backlog
    found at start-up is already read critical-first."""
    lag: dict[str, int] = {}
    assignment = consumer.assignment()
    unknown = [tp for tp in assignment if consumer.highwater(tp) is None]
    ends = await consumer.end_offsets(unknown) if unknown else {}
    for tp in assignment:
        high = consumer.highwater(tp)
        if high is None:
            high = ends.get(tp)
        if high is None:
            continue
        try:
            lag[f"{tp.topic}/{tp.partition}"] = max(0, high - await consumer.position(tp))
        except IllegalStateError:
            continue  # revoked meanwhile by a rebalance
    return lag
