"""Three sink processes for one destination share its partitions through Kafka's consumer
group (replicator/sink/members.py), under load, against real Kafka and Postgres: one is
killed with SIGKILL and later started again.

Afterwards every committed change is archived, a restore equals the source, and no
checkpoint ever passed a change that was not durable: a watcher lists the checkpoints every
0.25 s and then the segments, and for each checkpoint it saw, every transaction the
checkpoint covers (its end LSN at or below it, from the archived transaction records) must
have all its committed versions in segments that existed when the checkpoint was seen."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from connectors.base import ObjectStore
from connectors.registry import open_store
from replicator.archive.layout import (
    checkpoints_prefix,
    is_checkpoint_key,
    parse_checkpoint_key,
    progress_prefix,
)
from replicator.archive.segment import decode_transaction_segment
from replicator.crypto import decrypt
from replicator.replay.plan import LATEST
from replicator.replay.targets import PostgresTarget
from tests.integration import archive_readers as archive
from tests.integration.archive_helpers import destinations, keyring, sink_environ, with_destinations
from tests.integration.capture_helpers import make_config, setup_schema, wait_for
from tests.integration.replay_helpers import restore_db, run_replay, table_state
from tests.integration.sink_helpers import NO_COMPACTION
from tests.integration.test_archive_faults import (
    Fact,
    Workload,
    checkpoint_of,
    fact_of,
    kill_quietly,
    start_run,
    stop_gracefully,
    tail,
    wait_for_slot,
    write_config,
)

MEMBERS = 3


@dataclass
class Watcher:
    """Every checkpoint seen, with the segments listed just after it was seen."""

    store: ObjectStore
    name: str
    seen: dict[int, frozenset[str]] = field(default_factory=dict)
    progress_objects: set[str] = field(default_factory=set)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            checkpoints = [parse_checkpoint_key(info.key)
                           async for info in self.store.list(checkpoints_prefix(self.name))
                           if is_checkpoint_key(info.key, self.name)]
            segments = frozenset([info.key async for info in self.store.list("segments/")])
            for lsn in checkpoints:
                self.seen.setdefault(int(lsn), segments)
            self.progress_objects |= {
                info.key async for info in self.store.list(progress_prefix(self.name))}
            await asyncio.sleep(0.25)


async def segment_facts(store: ObjectStore, key: str) -> set[Fact]:
    _, records = await archive.read_segment(store, key, keyring())
    return {fact for fact in map(fact_of, records) if fact is not None}


async def transaction_ends(store: ObjectStore) -> dict[int, int]:
    """xid -> end LSN, from the archived transaction records."""
    ends: dict[int, int] = {}
    async for info in store.list("transactions/"):
        _, records = decode_transaction_segment(
            decrypt(await store.get(info.key), info.key, keyring()))
        for record in records:
            ends[record.xid] = int(record.end_lsn)
    return ends


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])
async def test_three_sink_processes_share_a_destination(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    setup_schema(pg_dsn)
    dests = tuple(d.model_copy(update={"compaction": NO_COMPACTION})
                  for d in destinations(tmp_path))  # the local folder
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), dests)
    cfg = write_config(tmp_path / "replicator.toml", config)
    env = sink_environ()
    name = dests[0].name
    store = open_store(dests[0].url, env)
    capture_log = tmp_path / "capture.log"
    logs = [tmp_path / f"sink{n}.log" for n in range(MEMBERS)]
    load = Workload(pg_dsn, seed=11, pause_s=0.01)
    stop, watching = asyncio.Event(), asyncio.Event()
    watcher = Watcher(store, name)
    capture = start_run(cfg, "capture", capture_log, os.environ)
    sinks: list[subprocess.Popen[bytes] | None] = [None] * MEMBERS
    tasks: list[asyncio.Task[None]] = []

    def alive() -> None:
        assert capture.poll() is None, tail(capture_log)
        for proc, log in zip(sinks, logs, strict=True):
            assert proc is None or proc.poll() is None, tail(log)

    async def past(lsn: int, within: float) -> None:
        async def moved() -> bool:
            alive()
            return await checkpoint_of(store, name) > lsn
        await wait_for(moved, within=within, what=f"the checkpoint past {lsn}")

    try:
        await wait_for_slot(pg_dsn, config.source.slot, alive)
        tasks = [asyncio.create_task(load.run(stop)), asyncio.create_task(watcher.run(watching))]
        sinks = [start_run(cfg, "sinks", log, env) for log in logs]
        await asyncio.sleep(5)
        await past(load.end, 90)  # three members move the checkpoint
        await asyncio.sleep(random.Random(5).uniform(0.2, 1.5))  # often mid-flush
        victim = sinks[1]
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(victim.wait, 30) == -signal.SIGKILL
        sinks[1] = None
        # Its partitions go to the other two once its session times out (30 s).
        await past(load.end, 120)
        sinks[1] = start_run(cfg, "sinks", logs[1], env)
        await asyncio.sleep(8)
        await past(load.end, 120)  # and again with the third member back
        stop.set()
        await tasks[0]
        await past(load.end, 120)
        # Two members leave: the one left owns every partition, and prunes the progress
        # objects the others wrote (and its own from when it was one of three).
        for n in (1, 2):
            proc = sinks[n]
            assert proc is not None
            await stop_gracefully(proc, logs[n])
            sinks[n] = None

        async def no_progress_left() -> bool:
            alive()
            return not [info async for info in store.list(progress_prefix(name))]
        await wait_for(no_progress_left, within=90, what="the progress objects pruned")
        proc = sinks[0]
        assert proc is not None
        await stop_gracefully(proc, logs[0])
        await stop_gracefully(capture, capture_log)
    finally:
        stop.set()
        watching.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proc in sinks:
            kill_quietly(proc)
        kill_quietly(capture)
    try:
        every = "\n".join(log.read_text(errors="replace") for log in logs)
        # Kafka's assignment made one member the checkpointer and others plain members.
        assert "is the checkpointer" in every and "is a member" in every, every[-3000:]
        assert watcher.progress_objects, "no member reported progress"
        assert len(load.by_xid) > 300
        ends = await transaction_ends(store)
        missing_tx = set(load.by_xid) - set(ends)
        assert not missing_tx, f"{len(missing_tx)} committed transactions have no record"
        facts: dict[str, set[Fact]] = {}
        all_segments = frozenset([info.key async for info in store.list("segments/")])
        for key in all_segments:
            facts[key] = await segment_facts(store, key)
        archived = set().union(*facts.values())
        truth = {f for writes in load.by_xid.values() for f in writes}
        assert truth <= archived, f"{len(truth - archived)} committed versions not archived"
        # No checkpoint ever passed a change that was not durable when it was written.
        assert len(watcher.seen) > 10
        for lsn, segments in sorted(watcher.seen.items()):
            there = set().union(*(facts[k] for k in segments if k in facts))
            covered = {f for xid, writes in load.by_xid.items() if ends[xid] <= lsn
                       for f in writes}
            early = covered - there
            assert not early, (f"checkpoint {lsn} passed {len(early)} versions not yet "
                               f"archived, e.g. {sorted(early)[:3]}")
        with restore_db(pg_server_dsn) as target:
            await run_replay(dests[0].url, PostgresTarget(target), LATEST)
            with psycopg.connect(pg_dsn) as src, psycopg.connect(target) as dst:
                for table in ("public.weddings", "public.guests", "public.vendors"):
                    assert table_state(dst, table) == table_state(src, table), table
    finally:
        await store.close()
