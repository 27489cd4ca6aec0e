"""An undecodable record on a tier topic: parked as a dead letter (encrypted, with its raw
bytes and the error), counted in a metric, and the sink goes on; the checkpoint never covers
its transaction, and a replay past it is refused naming the dead letter."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, generate_latest

from connectors.registry import open_store
from replicator.archive import reader
from replicator.archive.layout import dead_letter_key
from replicator.config import (
    DestinationConfig,
    KafkaConfig,
)
from replicator.crypto import decrypt
from replicator.events import Tier
from replicator.ops.metrics import PipelineCollector
from replicator.replay.plan import ReplayRefused
from replicator.replay.run import prepare
from replicator.sink.worker import SinkWorker
from replicator.transport.kafka import topic_names
from tests.integration.archive_helpers import (
    FAST,
    keyring,
    sink_environ,
)
from tests.integration.capture_helpers import wait_for
from tests.integration.sink_helpers import (
    NO_COMPACTION,
    covered,
    running,
    traffic,
)

# --- an undecodable record ----------------------------------------------------------------


async def test_undecodable_record_is_parked(kafka_bootstrap: str, topic_prefix: str,
                                            tmp_path: Path) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix,
                        partitions=1)
    root = tmp_path / "archive"
    root.mkdir()
    dest = DestinationConfig(name="dl", url=f"file://{root}", flush=FAST,
                             compaction=NO_COMPACTION)
    store = open_store(dest.url, sink_environ())
    garbage = b"\x00not an envelope \xff\xfe"
    critical = topic_names(topic_prefix)[Tier.CRITICAL]
    async with traffic(kafka) as load:
        await load.snapshot(3)
        await load.transaction(2)
        first_end = load.end
        parked = await load.transaction(3, skip=1)  # its record counts 3 changes
        raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await raw.start()
        try:
            sent = await raw.send_and_wait(critical, garbage, key=b"k", partition=0)
        finally:
            await raw.stop()
        later = await load.transaction(2)
        await load.producer.flush()
    worker = SinkWorker(dest, kafka, store, keyring())
    try:
        async with running(worker) as task:
            def alive() -> None:
                assert not task.done(), task.result()

            async def past_it() -> bool:
                alive()  # the sink goes on, and archives what comes after the record
                return worker.stats.changes_written >= 3 + 2 + 2 + 2
            await wait_for(past_it, within=60, what="the changes after the record archived")
            await covered(store, "dl", first_end, alive=alive)
            await asyncio.sleep(3 * FAST.low_s)  # several flushes more
            alive()
            checkpoint = await reader.checkpoint(store, "dl", keyring=keyring())
            critical_checkpoint = await reader.checkpoint(store, "dl", Tier.CRITICAL,
                                                          keyring=keyring())
        assert worker.stats.dead_letters == 1
        # The checkpoint is an end LSN: it covers commits below it, never the parked one's.
        assert first_end <= checkpoint <= parked, (checkpoint, parked)
        assert critical_checkpoint <= parked
        registry = CollectorRegistry(auto_describe=False)
        registry.register(PipelineCollector(lambda: None, lambda: {"dl": worker.stats}))
        assert b'wedsync_sink_dead_letters_total{destination="dl"} 1.0' in generate_latest(
            registry)

        key = dead_letter_key(critical, 0, sent.offset)
        letter = json.loads(decrypt(await store.get(key), key, keyring()))
        assert base64.b64decode(letter["value"]) == garbage
        assert (letter["topic"], letter["partition"], letter["offset"]) == (
            critical, 0, sent.offset)
        assert letter["error"]
        assert await reader.dead_letters(store) == [key]

        with pytest.raises(ReplayRefused) as refused:
            await prepare(store, keyring(), at=later)
        assert key in str(refused.value) and "past" in str(refused.value)
    finally:
        await store.close()
