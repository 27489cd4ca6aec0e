"""`wedsync_rpo_seconds{destination,tier}`, against real Kafka and a real store: the age of the
oldest committed change not yet durable in the destination. It is 0 once everything is
durable, grows with the wall clock while the store is down, and is 0 again once the store
is back and the checkpoint passes the changes."""

from __future__ import annotations

import re
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from connectors.registry import open_store
from replicator.config import DestinationConfig, KafkaConfig
from replicator.events import Tier
from replicator.ops.metrics import PipelineCollector
from replicator.sink.worker import SinkWorker
from tests.integration.archive_helpers import FAST, keyring, sink_environ
from tests.integration.capture_helpers import wait_for
from tests.integration.sink_helpers import NO_COMPACTION, covered, running, traffic


def now_us() -> int:
    return int(time.time() * 1_000_000)


def scraped(worker: SinkWorker) -> dict[str, float]:
    """`wedsync_rpo_seconds` per tier, as Prometheus scrapes it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(lambda: None, lambda: {"local": worker.stats}))
    text = generate_latest(registry).decode()
    return {tier: float(value) for tier, value in re.findall(
        r'^wedsync_rpo_seconds\{destination="local",tier="(\w+)"\} (\S+)$', text, re.M)}


async def test_rpo_metric_is_zero_when_durable_and_grows_during_an_outage(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix,
                        partitions=1)
    root = tmp_path / "archive"
    root.mkdir()
    dest = DestinationConfig(name="local", url=f"file://{root}", flush=FAST,
                             compaction=NO_COMPACTION)
    store = open_store(dest.url, sink_environ())
    worker = SinkWorker(dest, kafka, store, keyring())
    try:
        async with traffic(kafka) as load, running(worker) as task:
            def alive() -> None:
                assert not task.done(), task.result()

            await load.transaction(3, Tier.CRITICAL, ts=now_us())
            await load.transaction(2, Tier.LOW, ts=now_us())
            await load.producer.flush()
            await covered(store, "local", load.end, alive=alive)

            async def nothing_pending() -> bool:
                alive()
                return set(scraped(worker).values()) == {0.0}
            await wait_for(nothing_pending, within=30, what="every tier's RPO at 0")
            assert set(scraped(worker)) == {t.value for t in Tier}

            # The store goes away; a critical change commits and cannot become durable.
            away = tmp_path / "archive.unmounted"
            root.rename(away)
            committed = time.time()
            await load.transaction(2, Tier.CRITICAL, ts=now_us())
            await load.producer.flush()

            async def waited(seconds: float) -> bool:
                alive()
                return time.time() - committed >= seconds
            await wait_for(lambda: waited(6), within=30, what="six seconds")
            first = scraped(worker)
            assert 5.0 <= first["critical"] <= time.time() - committed + 1.0, first
            assert first["low"] == 0.0, first  # nothing of the low tier is pending
            await wait_for(lambda: waited(9), within=30, what="three more seconds")
            later = scraped(worker)
            assert later["critical"] >= first["critical"] + 2.0, (first, later)

            away.rename(root)  # the volume is back
            await covered(store, "local", load.end, alive=alive, within=120)
            await wait_for(nothing_pending, within=60, what="the RPO back at 0")
    finally:
        await store.close()
