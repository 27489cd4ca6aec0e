"""How far the replication slot may be confirmed: the Kafka acknowledgement watermark.

The guarantee: the slot's flush LSN advances only to a position below
which every change is acknowledged by Kafka. Acknowledgements arrive out of order (different
partitions, different topics), so this keeps, per transaction in commit order, how many of
its messages are still unacknowledged:

1. The capture calls `begin_tx(commit_lsn, end_lsn, n)` for each transaction, in commit order,
   before sending its n messages (its change events and its transaction record).
2. Each delivery calls `ack(commit_lsn)`; a failed one calls `fail(commit_lsn)` (or never
   acks). `track()` wires both to a delivery future.
3. `confirmable()` pops the fully acknowledged prefix and returns the `end_lsn` of its newest
   transaction: the flush LSN to send in the next standby status update.

A failed transaction stays at the head forever: nothing after it is ever confirmable by this
watermark. Recovery is a restart, which resumes from the slot (its last confirmed position)
and sends the transaction again; the duplicates that causes are harmless by design.

Confirming LSN L tells Postgres to skip every transaction whose commit record starts before
L. So `idle_lsn(L)` (a keepalive's position, when the server has nothing to send) becomes
confirmable only once every registered transaction with `commit_lsn < L` is acknowledged;
the caller must only pass positions received after all transactions committing before them
were registered, which holds when keepalives and transactions are handled in stream order.

Pure logic: no I/O, no clock, no locks (one event loop thread calls it).
"""

from __future__ import annotations

from asyncio import Future
from collections import deque
from typing import Any

from replicator.position import Lsn

__all__ = ["AckWatermark"]


class _Tx:
    __slots__ = ("commit_lsn", "end_lsn", "failed", "remaining")

    def __init__(self, commit_lsn: Lsn, end_lsn: Lsn, remaining: int) -> None:
        self.commit_lsn = commit_lsn
        self.end_lsn = end_lsn
        self.remaining = remaining
        self.failed = False


class AckWatermark:
    """Transactions awaiting Kafka acknowledgements, in commit order."""

    def __init__(self) -> None:
        self._queue: deque[_Tx] = deque()
        self._by_commit: dict[int, _Tx] = {}
        self._last_commit: Lsn | None = None
        self._confirmed: Lsn | None = None
        self._idle: Lsn | None = None
        self._failure: BaseException | None = None
        self._failed_at: Lsn | None = None

    def begin_tx(self, commit_lsn: Lsn, end_lsn: Lsn, n_messages: int) -> None:
        """Register a transaction before sending its *n_messages* (changes + boundary record)."""
        if n_messages < 1:
            raise ValueError(f"transaction {commit_lsn} must have at least one message "
                             "(its transaction record)")
        if end_lsn < commit_lsn:
            raise ValueError(f"transaction end LSN {end_lsn} is before its commit LSN {commit_lsn}")
        if self._last_commit is not None and commit_lsn <= self._last_commit:
            raise ValueError(f"transaction {commit_lsn} registered out of commit order (after "
                             f"{self._last_commit})")
        if self._confirmed is not None and commit_lsn < self._confirmed:
            raise ValueError(f"transaction {commit_lsn} commits before the already confirmable "
                             f"{self._confirmed}")
        tx = _Tx(commit_lsn, end_lsn, n_messages)
        self._queue.append(tx)
        self._by_commit[commit_lsn] = tx
        self._last_commit = commit_lsn

    def ack(self, commit_lsn: Lsn) -> None:
        """One message of the transaction committed at *commit_lsn* is durable in Kafka."""
        tx = self._by_commit.get(commit_lsn)
        if tx is None or tx.remaining == 0:
            raise ValueError(f"acknowledgement for transaction {Lsn(commit_lsn)}, which has no "
                             "unacknowledged message")
        tx.remaining -= 1

    def fail(self, commit_lsn: Lsn, error: BaseException | None = None) -> None:
        """A message of that transaction was not delivered: it and all later ones stay
        unconfirmable until a restart."""
        tx = self._by_commit.get(commit_lsn)
        if tx is None:
            raise ValueError(f"failure for transaction {Lsn(commit_lsn)}, which is not pending")
        tx.failed = True
        if self._failed_at is None or commit_lsn < self._failed_at:
            self._failed_at = commit_lsn
            self._failure = error

    def delivered(self, commit_lsn: Lsn, error: BaseException | None) -> None:
        """A delivery report without a future (`EventProducer.publish_event`): *error* None
        acknowledges one message of the transaction, anything else fails it."""
        if error is None:
            self.ack(commit_lsn)
        else:
            self.fail(commit_lsn, error)

    def track(self, commit_lsn: Lsn, delivery: Future[Any]) -> None:
        """Ack or fail *commit_lsn* when the delivery future resolves. A cancelled future counts
        as a failure: the message may or may not have been written, and doubt never advances."""

        def settle(done: Future[Any]) -> None:
            if done.cancelled():
                self.fail(commit_lsn)
                return
            error = done.exception()
            if error is None:
                self.ack(commit_lsn)
            else:
                self.fail(commit_lsn, error)

        delivery.add_done_callback(settle)

    def idle_lsn(self, lsn: Lsn) -> None:
        """A keepalive position: confirmable once no registered transaction committing before
        it is unacknowledged."""
        if self._idle is None or lsn > self._idle:
            self._idle = lsn

    def confirmable(self) -> Lsn | None:
        """The highest LSN the slot may be confirmed to, or None if nothing is yet."""
        queue = self._queue
        while queue and queue[0].remaining == 0 and not queue[0].failed:
            tx = queue.popleft()
            del self._by_commit[tx.commit_lsn]
            if self._confirmed is None or tx.end_lsn > self._confirmed:
                self._confirmed = tx.end_lsn
        idle = self._idle
        if (
            idle is not None
            and (self._confirmed is None or idle > self._confirmed)
            and (not queue or queue[0].commit_lsn >= idle)
        ):
            self._confirmed = idle
        return self._confirmed

    @property
    def failed_at(self) -> Lsn | None:
        """Commit LSN of the earliest failed transaction; nothing from it on is confirmable."""
        return self._failed_at

    @property
    def failure(self) -> BaseException | None:
        """The delivery error of `failed_at`, when one was given."""
        return self._failure

    @property
    def pending_transactions(self) -> int:
        """Transactions registered but not yet popped by `confirmable()`."""
        return len(self._queue)

    @property
    def pending_messages(self) -> int:
        return sum(tx.remaining for tx in self._queue)
