"""Which Kafka offsets a sink may commit.

A sink commits a partition's offset only past records that are (a) written to the store and
(b) at or below the checkpoint, so that everything above the committed offset is read again
after a restart (step 3 of the flush in `sink.worker`). `OffsetLedger` keeps, per partition
and in offset order, one `Pending` entry per record read and not yet committed; a flush marks
entries written, and `committable(checkpoint)` takes the longest prefix of each partition
that may be committed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import TopicPartition

from replicator.position import INVALID_LSN, Lsn

__all__ = ["OffsetLedger", "Pending"]


@dataclass(slots=True)
class Pending:
    """One record read and not yet committed."""

    offset: int
    # The commit LSN of its transaction; INVALID_LSN for a record of no transaction (a
    # schema), which is committable as soon as it is written.
    commit_lsn: Lsn
    written: bool = False


class OffsetLedger:
    """The records read and not yet committed, per partition, in offset order."""

    def __init__(self) -> None:
        self._pending: dict[TopicPartition, list[Pending]] = defaultdict(list)

    def track(self, tp: TopicPartition, offset: int, commit_lsn: Lsn = INVALID_LSN) -> Pending:
        """A record read: it waits here until written and covered by the checkpoint."""
        entry = Pending(offset, commit_lsn)
        self._pending[tp].append(entry)
        return entry

    def committable(self, checkpoint: Lsn) -> dict[TopicPartition, int]:
        """The next offset to commit per partition (only where it moves), for the records
        written and below *checkpoint*; those entries leave the ledger. The checkpoint is an
        end LSN: a commit at it is not yet covered."""
        offsets: dict[TopicPartition, int] = {}
        for tp, entries in self._pending.items():
            done = 0
            for entry in entries:
                if not entry.written or (entry.commit_lsn and entry.commit_lsn >= checkpoint):
                    break
                done += 1
            if done:
                offsets[tp] = entries[done - 1].offset + 1
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
            self._pending.pop(tp, None)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._pending.values())
