"""The local spool (replicator/sink/spool.py), against real Kafka, Postgres and S3 (moto
behind Toxiproxy, whose proxy is disabled for the outage).

1. The store is out past `spool.after_s`; the sink spools and commits its Kafka offsets
   against the spool; then the records it has committed are deleted from every topic (what
   a retention shorter than the outage does: `DeleteRecords` moves each partition's start
   past them, exactly as retention would, without waiting for the broker's retention
   check). When the store returns, the spool is shipped, the checkpoint passes everything,
   every committed change is archived, and a restore equals the source.
2. The spool's folder fills up (a 256 KiB tmpfs): the sink logs a clear error naming the
   folder, leaves no partial batch or object, keeps running, and once the store returns
   everything is archived (what could not be spooled was read again from Kafka).
3. Without a spool, records deleted from Kafka before the sink read them are never a silent
   loss: a dead letter names them and no checkpoint passes them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from connectors.registry import open_store
from replicator.config import Config, DestinationConfig, SpoolConfig
from replicator.devstack.stack import Stack
from replicator.position import Lsn
from replicator.replay.plan import LATEST, ReplayRefused
from replicator.replay.targets import PostgresTarget
from replicator.sink.service import Sinks
from replicator.transport.kafka import topic_names, transactions_topic
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import FAST, keyring, sink_environ, with_destinations
from tests.integration.capture_helpers import make_config, setup_schema, wait_for
from tests.integration.faults import store_through, toxiproxy
from tests.integration.replay_helpers import restore_db, run_replay, table_state
from tests.integration.sink_helpers import NO_COMPACTION
from tests.integration.test_archive_faults import (
    Workload,
    assert_all_archived,
    assert_running,
    finish,
    kill_quietly,
    read_whole_archive,
    start_run,
    stop_gracefully,
    tail,
    wait_for_slot,
    write_config,
)

pytestmark = pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])


def spool_config(pg_dsn: str, kafka: str, prefix: str, url: str, spool: Path) -> Config:
    dest = DestinationConfig(name="s3", url=url, flush=FAST, compaction=NO_COMPACTION,
                             spool=SpoolConfig(dir=spool, after_s=3))
    return with_destinations(make_config(pg_dsn, kafka, prefix), (dest,))


async def committed_and_ends(kafka: str, group: str, topics: list[str]
                             ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        committed = {tp: meta.offset for tp, meta in
                     (await admin.list_consumer_group_offsets(group)).items()}
        described = await admin.describe_topics(topics)
        partitions = [TopicPartition(t["topic"], p["partition"]) for t in described
                      for p in t["partitions"]]
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return committed, ends


async def expire(kafka: str, upto: dict[TopicPartition, int]) -> None:
    """Delete every record below *upto* (what retention does to old segments)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(offset) for tp, offset in upto.items()
                                    if offset > 0})
    finally:
        await admin.close()


async def pipeline_with_outage(pg_dsn: str, kafka: str, prefix: str, tmp_path: Path,
                               target: StoreTarget, dev_stack: Stack, spool: Path,
                               during_outage: Any) -> tuple[Workload, Sinks, str]:
    """Capture (its own process) and the sinks (here) under load; the store's proxy disabled
    while *during_outage(sinks)* runs; then the load stops and every checkpoint must pass
    its end. Returns the workload, the sinks and the capture's log."""
    setup_schema(pg_dsn)
    with toxiproxy(dev_stack) as proxies:
        proxy, proxied = store_through(proxies, target)
        config = spool_config(pg_dsn, kafka, prefix, proxied.url, spool)
        cfg = write_config(tmp_path / "replicator.toml", config)
        capture_log = tmp_path / "capture.log"
        capture = start_run(cfg, "capture", capture_log, os.environ)
        sinks = Sinks(config, sink_environ())
        await sinks.open()
        worker = sinks.workers["s3"]
        load = Workload(pg_dsn)
        stop = asyncio.Event()
        tasks: list[asyncio.Task[Any]] = []

        def alive() -> None:
            assert capture.poll() is None, tail(capture_log)
            assert_running(tasks)

        async def past(lsn: int, within: float) -> None:
            async def moved() -> bool:
                alive()
                return int(worker.stats.checkpoint) > lsn
            await wait_for(moved, within=within, what=f"the checkpoint past {lsn}")

        try:
            tasks.append(asyncio.create_task(sinks.run()))
            await wait_for_slot(pg_dsn, config.source.slot, alive)
            tasks.append(asyncio.create_task(load.run(stop)))
            await asyncio.sleep(3)
            await past(load.end, 60)
            with proxy.down():
                await during_outage(sinks, alive)
            await asyncio.sleep(2)
            stop.set()
            await tasks.pop()
            await past(load.end, 180)

            async def shipped() -> bool:
                assert worker.spool is not None
                return worker.spool.waiting == 0 and worker.stats.spool_bytes == 0
            await wait_for(shipped, within=60, what="the spool shipped")
            sinks.stop()
            await finish(tasks)
            await stop_gracefully(capture, capture_log)
        finally:
            stop.set()
            sinks.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            kill_quietly(capture)
            proxy.enable()
    return load, sinks, capture_log.read_text(errors="replace")


async def assert_restores(target: StoreTarget, load: Workload, pg_dsn: str,
                          pg_server_dsn: str) -> None:
    store = open_store(target.url, sink_environ())
    try:
        assert_all_archived("s3", await read_whole_archive(store, keyring()), load.truth)
    finally:
        await store.close()
    with restore_db(pg_server_dsn) as restored:
        await run_replay(target.url, PostgresTarget(restored), LATEST)
        with psycopg.connect(pg_dsn) as src, psycopg.connect(restored) as dst:
            for table in ("public.weddings", "public.guests", "public.vendors"):
                assert table_state(dst, table) == table_state(src, table), table


async def test_spool_outlives_kafka_retention(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path, s3_target: StoreTarget, dev_stack: Stack) -> None:
    spool = tmp_path / "spool"
    topics = [*topic_names(topic_prefix).values(), transactions_topic(topic_prefix)]
    group = f"{topic_prefix}.sink.s3"
    expired: dict[TopicPartition, int] = {}

    async def outage(sinks: Sinks, alive: Any) -> None:
        worker = sinks.workers["s3"]
        before, _ = await committed_and_ends(kafka_bootstrap, group, topics)

        async def spooling() -> bool:
            alive()
            return worker.stats.spooling and worker.stats.spool_bytes > 0
        await wait_for(spooling, within=60, what="the sink spooling")
        _, ends = await committed_and_ends(kafka_bootstrap, group, topics)

        async def committed_past_ends() -> bool:  # everything produced so far is spooled
            alive()
            committed, _ = await committed_and_ends(kafka_bootstrap, group, topics)
            return all(committed.get(tp, 0) >= end for tp, end in ends.items())
        await wait_for(committed_past_ends, within=60,
                       what="offsets committed against the spool")
        assert any(ends[tp] > before.get(tp, 0) for tp in ends)  # moved during the outage
        await expire(kafka_bootstrap, ends)
        expired.update(ends)
        await asyncio.sleep(4)  # and more spooled after the expiry
        assert worker.stats.spool_bytes > 0 and worker.spool is not None
        assert worker.spool.waiting >= 2

    load, _, _ = await pipeline_with_outage(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                            s3_target, dev_stack, spool, outage)
    assert sum(expired.values()) > 100  # records really were expired
    # The partitions' data below the expiry is gone from Kafka: the archive has it anyway.
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    await consumer.start()
    try:
        starts = await consumer.beginning_offsets(list(expired))
    finally:
        await consumer.stop()
    assert all(starts[tp] >= offset for tp, offset in expired.items())
    assert not [p for p in spool.rglob("*") if p.is_file()], "the spool was not emptied"
    await assert_restores(s3_target, load, pg_dsn, pg_server_dsn)


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of *size* at *path* (the test runs as root, as the stack does)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"cannot mount a tmpfs for the full-disk test: {done.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_full_spool_disk_stops_cleanly(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path, s3_target: StoreTarget, dev_stack: Stack,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="replicator.sink.worker")
    with small_disk(tmp_path / "disk", "256k") as disk:
        spool = disk / "spool"

        async def outage(sinks: Sinks, alive: Any) -> None:
            worker = sinks.workers["s3"]

            async def full() -> bool:
                alive()
                return any("the disk is full" in r.getMessage() for r in caplog.records)
            await wait_for(full, within=120, what="the spool's disk full")
            # Nothing partial: every batch but the one being written is sealed and whole,
            # and no temporary file is left in a sealed one.
            for _ in range(10):
                for batch in (spool / "s3").iterdir():
                    if batch.name.endswith(".partial"):
                        continue  # being written right now
                    assert batch.name.isdigit(), batch
                    assert (batch / "manifest.json").exists(), batch
                    assert not list(batch.rglob("*.tmp")), batch
                await asyncio.sleep(0.5)
            assert worker.stats.spooling

        load, _, _ = await pipeline_with_outage(pg_dsn, kafka_bootstrap, topic_prefix,
                                                tmp_path, s3_target, dev_stack, spool, outage)
        message = next(r.getMessage() for r in caplog.records
                       if "the disk is full" in r.getMessage())
        assert str(spool / "s3") in message and "nothing partial is left" in message
        assert "SECRET" not in message and "AWS_SECRET" not in message
    await assert_restores(s3_target, load, pg_dsn, pg_server_dsn)


async def test_records_expired_before_archiving_are_never_silent(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Without a spool, a sink stopped for longer than Kafka keeps the records: they are gone,
    and that must show. The sink writes a dead letter naming the lost range, logs it, and no
    checkpoint passes it, so a restore past it is refused instead of missing changes."""
    caplog.set_level(logging.CRITICAL, logger="replicator.sink.objects")
    setup_schema(pg_dsn)
    folder = tmp_path / "archive"
    folder.mkdir()
    dest = DestinationConfig(name="local", url=f"file://{folder}", flush=FAST,
                             compaction=NO_COMPACTION)
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), (dest,))
    cfg = write_config(tmp_path / "replicator.toml", config)
    capture_log = tmp_path / "capture.log"
    capture = start_run(cfg, "capture", capture_log, os.environ)
    topics = [*topic_names(topic_prefix).values(), transactions_topic(topic_prefix)]
    load = Workload(pg_dsn)
    sinks: Sinks | None = None
    tasks: list[asyncio.Task[Any]] = []

    def alive() -> None:
        assert capture.poll() is None, tail(capture_log)
        assert_running(tasks)

    try:
        await wait_for_slot(pg_dsn, config.source.slot, alive)
        sinks = Sinks(config, sink_environ())
        await sinks.open()
        tasks.append(asyncio.create_task(sinks.run()))
        stop = asyncio.Event()
        loading = asyncio.create_task(load.run(stop))
        await asyncio.sleep(3)
        first = sinks.workers["local"]
        mark = load.end

        async def durable() -> bool:
            alive()
            return int(first.stats.checkpoint) > mark
        await wait_for(durable, within=60, what="the first phase durable")
        sinks.stop()
        await finish(tasks)
        tasks.clear()
        held = int(first.stats.checkpoint)
        await asyncio.sleep(3)  # more commits while the sink is stopped
        stop.set()
        await loading
        _, ends = await committed_and_ends(kafka_bootstrap, f"{topic_prefix}.sink.local",
                                           topics)
        await expire(kafka_bootstrap, ends)  # retention deletes what the sink did not read
        sinks = Sinks(config, sink_environ())
        await sinks.open()
        tasks.append(asyncio.create_task(sinks.run()))
        second = sinks.workers["local"]

        async def parked() -> bool:
            alive()
            return second.stats.dead_letters > 0 and any(folder.glob("deadletters/*/*.json"))
        await wait_for(parked, within=60, what="a dead letter for the expired records")
        await asyncio.sleep(3)
        assert int(second.stats.checkpoint) <= held < load.end + 1000
        sinks.stop()
        await finish(tasks)
        await stop_gracefully(capture, capture_log)
    finally:
        if sinks is not None:
            sinks.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        kill_quietly(capture)
    assert any("were deleted from Kafka" in r.getMessage() for r in caplog.records)
    store = open_store(dest.url, sink_environ())
    try:
        letters = [info.key async for info in store.list("deadletters/")]
        assert letters
        with pytest.raises(ReplayRefused, match="dead letter"):
            await run_replay(dest.url, PostgresTarget("postgresql://unused"), Lsn(load.end))
    finally:
        await store.close()
