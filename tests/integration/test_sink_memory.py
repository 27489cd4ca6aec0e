"""A sink's memory is bounded by its read-ahead, not by the backlog in Kafka.

What a sink has read and not yet committed (the offset ledger's entries, and the transactions
the completeness tracker follows) is released only when the checkpoint passes it. The
transactions topic is small and quick to read, and lower tiers wait while critical partitions
are behind: under a backlog the sink used to read the transactions topic to its end, so the
tracker and the ledger held one entry per transaction of the whole backlog (the soak's sinks
grew by about 300 MB a minute while they were behind). Here a backlog several times the
read-ahead bound is archived, and what is held stays within the bound all along.
"""

from __future__ import annotations

import asyncio

from connectors.registry import open_store
from replicator.config import DestinationConfig, FlushConfig, KafkaConfig
from replicator.events import TIER_ORDER
from replicator.sink.worker import SinkWorker
from tests.integration.archive_helpers import keyring, sink_environ
from tests.integration.sink_helpers import NO_COMPACTION, archived_ids, running, traffic

TRANSACTIONS = 12_000
MAX_ROWS = 1_000
POLL = 500


async def test_backlog_is_archived_within_the_read_ahead_bound(kafka_bootstrap: str,
                                                                topic_prefix: str) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix,
                        partitions=1, linger_ms=20)
    async with traffic(kafka) as produced:
        # The backlog: tiers in turn, so critical partitions are far behind at the start.
        for i in range(TRANSACTIONS):
            await produced.transaction(1 + i % 2, TIER_ORDER[i % len(TIER_ORDER)])
    flush = FlushConfig(critical_s=0.5, high_s=1, normal_s=2, low_s=3, max_rows=MAX_ROWS)
    destination = DestinationConfig(name="mem", url=f"mem://{topic_prefix}", flush=flush,
                                    compaction=NO_COMPACTION)
    store = open_store(destination.url, sink_environ())
    worker = SinkWorker(destination, kafka, store, keyring())
    worker.poll_records = POLL
    bound = worker.read_ahead
    assert bound < TRANSACTIONS // 2  # the backlog is well above what may be held
    held: list[tuple[int, int]] = []  # after each poll: ledger entries, tracked transactions
    poll = worker._poll

    async def measured(consumer: object) -> None:
        await poll(consumer)  # type: ignore[arg-type]
        held.append((len(worker.offsets), worker.tracker.tracked))

    worker._poll = measured  # type: ignore[method-assign]
    async with running(worker):
        for _ in range(1200):
            if worker.stats.checkpoint >= produced.end:
                break
            await asyncio.sleep(0.1)
        assert worker.stats.checkpoint >= produced.end, (
            f"checkpoint {worker.stats.checkpoint} below {produced.end:x}; "
            f"held at the end {held[-1:]}")
    assert await archived_ids(store) == produced.ids
    peak_entries = max(entries for entries, _ in held)
    peak_tracked = max(tracked for _, tracked in held)
    # Each partition may read one poll past the bound before it is paused: four tier
    # topics, the transactions and the schemas topic, one partition each. (Unbounded, the
    # whole backlog was held: about 29,000 entries.)
    slack = 6 * POLL
    assert peak_entries <= bound + slack, (peak_entries, bound)
    assert peak_tracked <= bound + slack, (peak_tracked, bound)
