"""A destination's checkpoints: the highest LSN at or below which every transaction is
complete in that destination, overall and per wedding tier.

`CompletenessTracker` is pure logic. It learns each transaction from its boundary record
(commit LSN, end LSN, and the number of changes per tier; the transactions topic is in commit
order), and learns which changes are durable from the segments the sink has written. The
checkpoint advances over the longest prefix of transactions whose record and changes are all
durable. A tier's checkpoint advances over the longest prefix whose changes *of that tier*
are durable: critical changes are flushed every few seconds, and their recovery point must
not wait for the low tier's flush every few minutes.

Duplicates are expected (capture resends unconfirmed transactions after a restart; the sink
re-reads uncommitted offsets after its own restart): a change is counted once per position,
and a transaction committed below the overall checkpoint is ignored. The checkpoint is an
end LSN, and the next transaction's commit record can start exactly there: a commit LSN
equal to the checkpoint belongs to a transaction not yet covered.

A record the sink parks as undecodable while its transaction is unknown (a transaction
record, a schema) holds every checkpoint where it is (`hold`), for as long as the process runs.

Checkpoint objects (sealed JSON, create-only; names sort by LSN, so the newest is the last
listed; `archive.reader.checkpoint` reads them): `checkpoints/<destination>/<16 hex digits>`
overall and `checkpoints/<destination>/<tier>/<16 hex digits>` per tier.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

from replicator.events import TIER_BY_NAME, TIER_ORDER, Tier, TransactionRecord
from replicator.position import INVALID_LSN, Lsn, mark_seq

_ANY: Final = "any"  # the tier key of a record without tier counts
#: Advances between full passes over the tracked transactions for those below the checkpoint.
FULL_PASS_EVERY: Final = 256


class SeqSet:
    """The sequence numbers of one transaction's changes seen in one tier, de-duplicated (a
    change read again after a restart counts once): a bitmap, one bit per number, so a 5M-row
    snapshot holds 625 KB instead of a set of 5M ints (about 300 MB). Numbers outside the
    bitmap's range (negative, or from a junk record far past any real transaction) go to a
    set, so a hostile number cannot make it allocate."""

    __slots__ = ("_bits", "_count", "_others")

    #: The bitmap covers 0 .. 2**27 - 1: 16 MB at most.
    LIMIT: Final = 1 << 27

    def __init__(self) -> None:
        self._bits = bytearray()
        self._count = 0
        self._others: set[int] | None = None

    def add(self, seq: int) -> None:
        if 0 <= seq < SeqSet.LIMIT:
            if mark_seq(self._bits, seq):
                self._count += 1
        else:
            if self._others is None:
                self._others = set()
            if seq not in self._others:
                self._others.add(seq)
                self._count += 1

    def __len__(self) -> int:
        return self._count

    def __contains__(self, seq: object) -> bool:
        if isinstance(seq, int) and 0 <= seq < SeqSet.LIMIT:
            byte = seq >> 3
            return byte < len(self._bits) and bool(self._bits[byte] & (1 << (seq & 7)))
        return self._others is not None and seq in self._others


@dataclass(slots=True)
class _Tx:
    commit_lsn: Lsn
    end_lsn: Lsn
    expected: dict[Tier | str, int] | None = None  # None until the record is durable
    seen: dict[Tier, SeqSet] = field(default_factory=dict)
    # Of the snapshot records (xid 0) counted; None for any other transaction (a set costs
    # 216 bytes, and a sink far behind tracks tens of thousands of transactions).
    tables: set[str] | None = None
    commit_ts_us: int = 0  # from its record
    done: bool = False  # passed by `advance`, kept because the checkpoint is below it

    def complete_for(self, tier: Tier) -> bool:
        if self.expected is None:
            return False
        if _ANY in self.expected:  # a record without tier counts: all tiers together
            return sum(len(s) for s in self.seen.values()) >= self.expected[_ANY]
        return len(self.seen.get(tier, ())) >= self.expected.get(tier, 0)

    def complete(self) -> bool:
        return self.expected is not None and all(self.complete_for(t) for t in TIER_ORDER)


def _tier(name: str) -> Tier:
    tier = TIER_BY_NAME.get(name)
    return Tier(name) if tier is None else tier  # (which raises ValueError)


@lru_cache(maxsize=256)
def _expected(tier_counts: tuple[tuple[str, int], ...]) -> dict[Tier | str, int]:
    """A record's changes expected per tier. The same few counts repeat ({low: 1}), so
    transactions share one dict each: never change one in place."""
    return {_tier(t): n for t, n in tier_counts}


class CompletenessTracker:
    def __init__(self, checkpoint: Lsn = INVALID_LSN,
                 tier_checkpoints: dict[Tier, Lsn] | None = None) -> None:
        self.checkpoint = checkpoint
        self.tier_checkpoints = {t: max(checkpoint, (tier_checkpoints or {}).get(t, checkpoint))
                                 for t in TIER_ORDER}
        self._txs: dict[Lsn, _Tx] = {}
        self._order: list[Lsn] = []  # commit LSNs with a durable record, ascending
        self._cursor: dict[Tier, int] = dict.fromkeys(TIER_ORDER, 0)
        self._held = False
        self._advances = 0  # advances that moved the checkpoint
        # Per tier: the commit time (us) of the last transaction its checkpoint passed.
        self.passed_ts_us: dict[Tier, int] = {}

    def hold(self) -> None:
        """Never move a checkpoint again: a record of an unknown transaction was parked."""
        self._held = True

    def _tx(self, commit_lsn: Lsn, end_lsn: Lsn) -> _Tx:
        tx = self._txs.get(commit_lsn)
        if tx is None:
            tx = self._txs[commit_lsn] = _Tx(commit_lsn, end_lsn)
        return tx

    def records_durable(self, records: Iterable[TransactionRecord]) -> None:
        """Boundary records now durable in the destination."""
        for record in records:
            if record.commit_lsn < self.checkpoint:
                continue
            tx = self._tx(record.commit_lsn, record.end_lsn)
            expected = _expected(tuple(record.tier_counts.items()))
            if not expected and record.total:
                # A record without tier counts (written before they existed): its changes
                # count together, whatever their tier.
                expected = {_ANY: record.total}
            if tx.expected is not None:
                # A duplicate; or, for a snapshot (xid 0), another table's rows at one LSN.
                if record.xid == 0 and not (tx.tables or set()) & record.counts.keys():
                    summed = dict(tx.expected)  # (maybe shared: never changed in place)
                    for tier, n in expected.items():
                        summed[tier] = summed.get(tier, 0) + n
                    tx.expected = summed
                    tx.tables = (tx.tables or set()) | record.counts.keys()
                    if tx.done:
                        # Its earlier tables were complete and passed (a snapshot's end LSN is
                        # below its own LSN, so it stayed): wait for this table's rows too.
                        tx.done = False
                        self._queue(record.commit_lsn)
                continue
            tx.end_lsn = record.end_lsn
            tx.commit_ts_us = record.commit_ts_us
            tx.expected = expected
            if record.xid == 0:
                tx.tables = set(record.counts)
            self._queue(record.commit_lsn)

    def _queue(self, commit_lsn: Lsn) -> None:
        """Put a transaction whose record is durable in commit order, for `advance`."""
        if not self._order or commit_lsn > self._order[-1]:
            self._order.append(commit_lsn)
        else:
            index = bisect.bisect_left(self._order, commit_lsn)
            self._order.insert(index, commit_lsn)
            for tier, cursor in self._cursor.items():
                self._cursor[tier] = min(cursor, index)

    def changes_durable(self, changes: Iterable[tuple[Tier, Lsn, int]]) -> None:
        """Changes now durable in the destination: (tier, commit LSN, seq)."""
        for tier, commit_lsn, seq in changes:
            if commit_lsn < self.checkpoint:
                continue
            seen = self._tx(commit_lsn, commit_lsn).seen
            bucket = seen.get(tier)
            if bucket is None:
                bucket = seen[tier] = SeqSet()
            bucket.add(seq)

    def advance(self) -> Lsn:
        """Move the checkpoints over the complete prefix; returns the overall checkpoint."""
        if self._held:
            return self.checkpoint
        order, txs = self._order, self._txs
        for tier in TIER_ORDER:
            cursor = self._cursor[tier]
            while cursor < len(order) and txs[order[cursor]].complete_for(tier):
                tx = txs[order[cursor]]
                self.tier_checkpoints[tier] = max(self.tier_checkpoints[tier], tx.end_lsn)
                self.passed_ts_us[tier] = max(self.passed_ts_us.get(tier, 0), tx.commit_ts_us)
                cursor += 1
            self._cursor[tier] = cursor
        done = min(self._cursor.values())
        if done:
            self.checkpoint = max(self.checkpoint, txs[order[done - 1]].end_lsn)
            for commit_lsn in order[:done]:
                if commit_lsn >= self.checkpoint:
                    # A snapshot (end LSN below its LSN) that the checkpoint has not passed:
                    # another table's boundary record at this LSN may still come, and the
                    # rows already seen must count then.
                    txs[commit_lsn].done = True
                else:
                    del txs[commit_lsn]
            del order[:done]
            for tier in TIER_ORDER:
                self._cursor[tier] -= done
            # Changes of transactions now below the checkpoint (duplicates) need no tracking.
            # Entries come in about commit order, so the oldest are first: they go at once,
            # up to the first one not below; a full pass now and then takes any left behind
            # (every pass over a backlog's entries would cost each advance their number).
            self._advances += 1
            if self._advances % FULL_PASS_EVERY == 0:
                stale = [k for k in txs if k < self.checkpoint]
            else:
                stale = list(itertools.takewhile(lambda k: k < self.checkpoint, txs))
            for commit_lsn in stale:
                del txs[commit_lsn]
        return self.checkpoint

    def oldest_pending(self, tier: Tier) -> int | None:
        """The commit time (us) of the oldest transaction whose record is durable and that
        *tier*'s checkpoint has not passed (some change of that tier is not durable yet), or
        None."""
        order, txs = self._order, self._txs
        for index in range(self._cursor[tier], len(order)):  # `advance` passes the complete
            tx = txs[order[index]]
            if not tx.complete_for(tier):
                return tx.commit_ts_us
        return None

    @property
    def incomplete(self) -> int:
        """Transactions whose record is durable but not yet all of whose changes are."""
        return len(self._order)

    @property
    def tracked(self) -> int:
        """Transactions followed now (a record or changes seen, the checkpoint below them)."""
        return len(self._txs)
