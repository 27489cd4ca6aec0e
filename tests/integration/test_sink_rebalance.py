"""The whole service (capture and two sinks in one `replicator run`) stopped with SIGSTOP for
longer than the consumer group's session timeout, under load: after SIGCONT the sinks rejoin
and go on from their committed offsets instead of exiting, and nothing is lost.

While the service is stopped, another member joins one sink's group (as a second sink process
would) and holds part of its partitions for a while after SIGCONT: that sink must give up
what it read from the partitions it lost, and commit only its own."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from connectors.registry import open_store
from replicator.config import (
    Config,
    MetricsConfig,
)
from replicator.sink.worker import SESSION_TIMEOUT_MS
from replicator.transport.kafka import all_topics, schemas_topic
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import (
    destinations,
    keyring,
    sink_environ,
    with_destinations,
)
from tests.integration.capture_helpers import make_config, setup_schema
from tests.integration.sink_helpers import (
    NO_COMPACTION,
    covered,
)
from tests.integration.test_archive_faults import (
    Workload,
    _toml_table,
    assert_all_archived,
    closed_port,
    kill_quietly,
    read_whole_archive,
    stop_gracefully,
    tail,
    wait_for_slot,
)

# --- the service paused past the session timeout ------------------------------------------------

#: The sinks' session timeout, and a pause longer than it.
SESSION_TIMEOUT_S = SESSION_TIMEOUT_MS / 1000
PAUSE_S = SESSION_TIMEOUT_S + 10


async def intrude(bootstrap: str, group: str, topics: list[str], until: asyncio.Event) -> int:
    """A second member of *group*: it reads (never committing) until *until* is set, then
    leaves the group. Returns the records it read."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    read = 0
    try:
        while not until.is_set():
            batch = await consumer.getmany(timeout_ms=200)
            read += sum(len(records) for records in batch.values())
    finally:
        await consumer.stop()
    return read


def write_run_config(path: Path, config: Config, port: int) -> Path:
    config = config.model_copy(update={"metrics": MetricsConfig(listen=f"127.0.0.1:{port}")})
    data = config.model_dump(mode="json", exclude_none=True)
    path.write_text("\n".join(_toml_table(data, ())) + "\n")
    return path


def start_service(config: Path, log: Path, environ: dict[str, str]) -> subprocess.Popen[bytes]:
    """`replicator run` with capture and sinks in one process."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "replicator", "run", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env={**environ, "PYTHONUNBUFFERED": "1"})


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])
async def test_service_paused_past_session_timeout(pg_dsn: str, kafka_bootstrap: str,
                                                   topic_prefix: str, tmp_path: Path,
                                                   s3_target: StoreTarget) -> None:
    setup_schema(pg_dsn)
    dests = tuple(d.model_copy(update={"compaction": NO_COMPACTION})
                  for d in destinations(tmp_path, s3_target))  # local folder + S3
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), dests)
    port = closed_port()
    cfg = write_run_config(tmp_path / "replicator.toml", config, port)
    log = tmp_path / "run.log"
    env = sink_environ()
    stores = {d.name: open_store(d.url, env) for d in dests}
    load = Workload(pg_dsn)
    stop = asyncio.Event()
    proc = start_service(cfg, log, env)
    load_task: asyncio.Task[None] | None = None
    leave = asyncio.Event()
    intruder: asyncio.Task[int] | None = None

    def alive() -> None:
        assert proc.poll() is None, tail(log)

    async def all_past(lsn: int) -> None:
        for name, store in stores.items():
            await covered(store, name, lsn + 1, alive=alive, within=120)

    try:
        await wait_for_slot(pg_dsn, config.source.slot, alive)
        load_task = asyncio.create_task(load.run(stop))
        await asyncio.sleep(3)
        await all_past(load.end)
        proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(SESSION_TIMEOUT_S + 2)  # the service's members are gone
            intruder = asyncio.create_task(intrude(
                kafka_bootstrap, f"{topic_prefix}.sink.local",
                [*all_topics(topic_prefix), schemas_topic(topic_prefix)],
                leave))
            await asyncio.sleep(PAUSE_S - SESSION_TIMEOUT_S - 2)
        finally:
            proc.send_signal(signal.SIGCONT)
        mark = load.end  # committed while the service was stopped
        await asyncio.sleep(10)  # both rejoin; the local sink shares its partitions
        alive()
        assert "wedsync_sink_checkpoint_lsn" in await asyncio.to_thread(metrics_text, port)
        leave.set()
        assert await intruder > 0
        await all_past(mark)  # the sinks rejoined and went on
        stop.set()
        await load_task
        await all_past(load.end)
        alive()
        await stop_gracefully(proc, log)
    finally:
        stop.set()
        leave.set()
        if load_task is not None and not load_task.done():
            load_task.cancel()
        if intruder is not None:
            await asyncio.gather(intruder, return_exceptions=True)
        kill_quietly(proc)
    assert "rebalanced" in log.read_text(), tail(log)
    try:
        for name, store in stores.items():
            assert_all_archived(name, await read_whole_archive(store, keyring()), load.truth)
    finally:
        for store in stores.values():
            await store.close()
