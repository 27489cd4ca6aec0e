"""Checkpoint and gap objects are sealed: encrypted under their name, holding the LSN their
name says. A forged or unsealed one (an empty object named like a checkpoint far ahead) is
refused by the reader, by replay and by a restarting sink, instead of moving the latest
recoverable point. Old checkpoints are pruned to the newest few per tier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connectors.registry import open_store
from replicator.archive import reader
from replicator.archive.layout import checkpoint_key, gap_key
from replicator.archive.reader import (
    CHECKPOINTS_KEPT,
    UntrustedObject,
    checkpoint_document,
    checkpoint_names,
)
from replicator.config import CompactionConfig, DestinationConfig, KafkaConfig
from replicator.crypto import decrypt, encrypt
from replicator.events import TIER_ORDER
from replicator.position import Lsn
from replicator.replay.run import prepare
from replicator.sink.worker import SinkWorker
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import FAST, keyring, sink_environ
from tests.integration.sink_helpers import covered, running, traffic

FLUSHES = 3 * CHECKPOINTS_KEPT


async def test_checkpoints_sealed_pruned_and_forgeries_refused(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, s3_target: StoreTarget
) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix,
                        partitions=1)
    dest = DestinationConfig(name="s3", url=s3_target.url, flush=FAST,
                             compaction=CompactionConfig(enabled=False))
    store = open_store(dest.url, sink_environ())
    ring = keyring()
    try:
        async with traffic(kafka) as load:
            await load.snapshot(2)
            worker = SinkWorker(dest, kafka, store, ring)
            async with running(worker) as task:
                def alive() -> None:
                    assert not task.done(), task.result()
                for _ in range(FLUSHES):  # each a new checkpoint of every tier
                    await load.transaction(2)
                    await load.producer.flush()
                    await covered(store, "s3", load.end, alive=alive)
        assert worker.stats.checkpoint == load.end
        for tier in (None, *TIER_ORDER):
            names = await checkpoint_names(store, "s3", tier)
            assert 0 < len(names) <= CHECKPOINTS_KEPT, (tier, names)
            for lsn, key in names:
                doc = json.loads(decrypt(await store.get(key), key, ring))
                assert doc["lsn"] == lsn and doc["destination"] == "s3", doc
        newest_key = (await checkpoint_names(store, "s3"))[-1][1]
        assert await reader.checkpoint(store, "s3", keyring=ring) == load.end

        # An empty object named like a checkpoint far ahead (as written before checkpoints
        # were sealed, or forged): refused everywhere, never the latest recoverable point.
        forged = checkpoint_key("s3", Lsn(0xFFFFFFFF))
        await store.put(forged, b"")
        with pytest.raises(UntrustedObject, match=forged):
            await reader.checkpoint(store, "s3", keyring=ring)
        with pytest.raises(UntrustedObject, match=forged):
            await prepare(store, ring, at="latest")
        with pytest.raises(UntrustedObject, match=forged):
            await SinkWorker(dest, kafka, store, ring).run()
        await store.delete([forged])

        # A sealed checkpoint's bytes copied under a later name: the name is bound.
        copied = checkpoint_key("s3", Lsn(0xFFFFFFF0))
        await store.put(copied, await store.get(newest_key))
        with pytest.raises(UntrustedObject, match=copied):
            await reader.checkpoint(store, "s3", keyring=ring)
        await store.delete([copied])
        # Sealed at its name, but recording another LSN.
        lying = checkpoint_key("s3", Lsn(0xFFFFFFF1))
        await store.put(lying, encrypt(checkpoint_document("s3", Lsn(load.end)), lying, ring))
        with pytest.raises(UntrustedObject, match=lying):
            await reader.checkpoint(store, "s3", keyring=ring)
        await store.delete([lying])
        assert await reader.checkpoint(store, "s3", keyring=ring) == load.end

        # Gaps: one sealed with its range is read; an unsealed one is refused.
        gap = gap_key(Lsn(0x10), Lsn(0x20))
        content = json.dumps({"from_lsn": 0x10, "to_lsn": 0x20, "reason": "test"}).encode()
        await store.put(gap, encrypt(content, gap, ring))
        assert await reader.recorded_gaps(store, ring) == [(Lsn(0x10), Lsn(0x20))]
        fake = gap_key(Lsn(0x30), Lsn(0x40))
        await store.put(fake, b"{}")
        with pytest.raises(UntrustedObject, match=fake):
            await reader.recorded_gaps(store, ring)
    finally:
        await store.close()
