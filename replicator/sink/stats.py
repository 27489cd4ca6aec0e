"""What `status` and the metrics show about one destination's sink."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from replicator.events import TIER_ORDER, Tier
from replicator.position import INVALID_LSN, Lsn

__all__ = ["SinkStats"]


@dataclass
class SinkStats:
    """What `status` and the metrics show about one destination."""

    checkpoint: Lsn = INVALID_LSN
    tier_checkpoints: dict[Tier, Lsn] = field(default_factory=dict)
    segments_written: int = 0
    bytes_written: int = 0
    changes_written: int = 0
    flushes: int = 0
    failures: int = 0
    breaker: str = "closed"
    lag: dict[str, int] = field(default_factory=dict)  # "topic/partition" -> records behind
    last_flush_at: float = 0.0
    dead_letters: int = 0  # undecodable records parked
    raw_changes: int = 0  # changes taken without decoding (sink/raw.py)
    raw_transactions: int = 0  # transaction records likewise
    paused: bool = False  # intake paused: buffers at their bound, or the breaker open
    rebalances: int = 0  # partitions revoked by a rebalance
    # Its place in the destination's consumer group (sink/members.py): "solo" (every
    # partition), "checkpointer" (the transactions partition) or "member".
    role: str = "solo"
    spooling: bool = False  # flushes go into the local spool (the store is out)
    spool_bytes: int = 0  # what the local spool holds, not yet shipped
    waiting: str | None = None  # why the sink is not running yet (Kafka does not answer)
    # tier -> commit time (us) of the oldest change its checkpoint has not passed
    # (`SinkWorker._note_pending`); a tier with nothing pending is absent
    pending_since_us: dict[str, int] = field(default_factory=dict)
    # What the sink holds in memory now (`SinkWorker._note_pending`): "buffered_rows",
    # "buffered_bytes" (changes read, not yet written), "uncommitted_runs" (the offset
    # ledger's runs: records read whose offsets are not committed yet), "tracked_transactions"
    # (the completeness tracker's), "transaction_records" (read, not yet written).
    held: dict[str, int] = field(default_factory=dict)
    # Cross-origin conflicts seen (sink/conflicts.py): (table, rule, group) -> count; and the
    # keys the watch let go of early to stay within its bound.
    conflicts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    conflicts_forgotten: int = 0

    def rpo_seconds(self, now: float) -> dict[str, float]:
        """Per tier, the age at *now* (epoch seconds) of the oldest committed change not yet
        durable here; 0 when nothing is pending."""
        return {tier.value: max(0.0, now - self.pending_since_us[tier.value] / 1e6)
                if tier.value in self.pending_since_us else 0.0 for tier in TIER_ORDER}
