"""Fault injection for the sinks (positions and guarantees, the object layout, encryption):
`kill -9` of the sink service at random moments, an Azure outage, tampered
objects and wrong keys, setup mistakes and an unreachable store, a flush that fails part-way.

The workload keeps its own ground truth, as in `test_capture_faults`: every committed write
sets a unique `version` on its row (guests.notes, vendors.name), and the test records
`(table, id, version)` only after COMMIT returned, with the LSN read inside the transaction.
A destination's checkpoint above that LSN covers the transaction (one workload connection,
so the transactions commit in the order they run).

The capture side is covered on every PostgreSQL version elsewhere; these run on 15 only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from connectors.base import ObjectInfo, ObjectStore
from connectors.errors import AlreadyExists, Retriable
from connectors.local import LocalStore
from connectors.registry import open_store
from replicator.archive.layout import parse_part_key, parse_segment_key
from replicator.archive.reader import CHECKPOINTS_KEPT
from replicator.archive.segment import decode_transaction_segment
from replicator.capture import Capture
from replicator.config import Config, DestinationConfig, MetricsConfig, load_config
from replicator.crypto import (
    Keyring,
    ObjectTampered,
    UnknownKey,
    WrongKey,
    decrypt,
    generate_key,
    read_header,
)
from replicator.devstack.settings import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY
from replicator.devstack.stack import Stack
from replicator.sink.service import Sinks, SinkSetupError
from replicator.sink.worker import SinkWorker
from replicator.transport.avro import to_python
from replicator.transport.kafka import all_topics
from tests.conftest import StoreTarget
from tests.integration import archive_readers as archive
from tests.integration.archive_helpers import (
    FAST,
    KEK,
    destinations,
    keyring,
    sink_environ,
    with_destinations,
)
from tests.integration.capture_helpers import make_config, setup_schema, slot_confirmed, wait_for

pytestmark = pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])

Fact = tuple[str, int, int]  # (table, id, version)


# --- the workload -----------------------------------------------------------------------------


@dataclass
class Workload:
    """Upserts into guests (all three weddings, so every tier) and vendors, each setting a
    unique version; `truth`, `commits` and `by_xid` grow only after COMMIT returned."""

    dsn: str
    seed: int = 7
    pause_s: float = 0.02
    truth: set[Fact] = field(default_factory=set)
    commits: list[tuple[float, int]] = field(default_factory=list)  # (loop time, LSN inside)
    # xid (as pgoutput gives it: mod 2^32) -> the versions that transaction committed
    by_xid: dict[int, list[Fact]] = field(default_factory=dict)

    @property
    def end(self) -> int:
        """The LSN inside the last committed transaction: a checkpoint above it covers all."""
        assert self.commits, "the workload committed nothing"
        return self.commits[-1][1]

    async def run(self, stop: asyncio.Event, transactions: int | None = None) -> None:
        rnd = random.Random(self.seed)
        version = len(self.truth)
        loop = asyncio.get_running_loop()
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            done = 0
            while not stop.is_set() and (transactions is None or done < transactions):
                writes: list[Fact] = []
                async with conn.transaction():
                    for _ in range(rnd.randint(1, 4)):
                        version += 1
                        gid = rnd.randint(1, 300)
                        await conn.execute(
                            "INSERT INTO guests (id, wedding_id, name, notes) VALUES "
                            "(%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET notes = "
                            "EXCLUDED.notes", (gid, 1 + gid % 3, f"guest {gid}", str(version)))
                        writes.append(("guests", gid, version))
                    if rnd.random() < 0.4:
                        version += 1
                        vid = rnd.randint(1, 40)
                        await conn.execute(
                            "INSERT INTO vendors VALUES (%s, %s, 1) ON CONFLICT (id) DO UPDATE "
                            "SET name = EXCLUDED.name", (vid, str(version)))
                        writes.append(("vendors", vid, version))
                    cur = await conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0', "
                                             "txid_current() % 4294967296")
                    row = await cur.fetchone()
                assert row is not None
                self.truth.update(writes)  # only after COMMIT returned
                self.commits.append((loop.time(), int(row[0])))
                self.by_xid[int(row[1])] = writes
                done += 1
                await asyncio.sleep(self.pause_s)


def lag_s(at: float, checkpoint: int, commits: list[tuple[float, int]]) -> float:
    """Seconds since the oldest transaction committed before *at* that *checkpoint* does not
    cover yet (0 when it covers them all)."""
    for when, inside in commits:
        if when > at:
            break
        if inside >= checkpoint:
            return at - when
    return 0.0


# --- reading an archive back ------------------------------------------------------------------


@dataclass
class ArchiveContents:
    facts: set[Fact]
    segments: int
    transaction_objects: int
    transactions: int


def fact_of(record: dict[str, Any]) -> Fact | None:
    """The version a `Workload` change wrote, from its archived record (None: a delete, or a
    row the workload did not version)."""
    if record["after"] is None:
        return None
    table = record["source"]["table"]
    after = to_python(record["after"])
    value = after.get("notes" if table == "guests" else "name")
    if value is None or not str(value).isdigit():
        return None
    return table, int(after["id"]), int(value)


async def read_whole_archive(store: ObjectStore, ring: Keyring) -> ArchiveContents:
    """Decrypt, decode and verify every object under segments/ and transactions/ (any
    corrupt, partial or misnamed object raises), and collect the versions archived."""
    facts: set[Fact] = set()
    segments = objects = transactions = 0

    async def every_record() -> AsyncIterator[dict[str, Any]]:
        nonlocal segments
        async for info in store.list("segments/"):
            parse_segment_key(info.key)
            _, records = await archive.read_segment(store, info.key, ring)
            segments += 1
            for record in records:
                yield record
        # Snapshot rows written as parts (COPY text): decoded and checked the same way.
        async for record in archive.part_records(store, ring):
            yield record

    async for record in every_record():
        fact = fact_of(record)
        if fact is not None:
            facts.add(fact)
    async for info in store.list("transactions/"):
        parse_segment_key(info.key)
        _, txs = decode_transaction_segment(decrypt(await store.get(info.key), info.key, ring))
        transactions += len(list(txs))  # exhausting the iterator runs the header checks
        objects += 1
    return ArchiveContents(facts, segments, objects, transactions)


def assert_all_archived(name: str, contents: ArchiveContents, truth: set[Fact]) -> None:
    missing = truth - contents.facts
    assert not missing, (f"{name}: {len(missing)} of {len(truth)} committed changes are not "
                         f"archived, e.g. {sorted(missing)[:5]}")
    assert contents.segments and contents.transaction_objects, name


async def checkpoint_of(store: ObjectStore, name: str) -> int:
    return int(await archive.checkpoint(store, name, keyring=keyring()))


def local_files(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under *root* outside the store's private `.partial/` directory:
    relative path -> (bytes, mtime_ns, inode)."""
    out: dict[str, tuple[bytes, int, int]] = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel == ".partial" or rel.startswith(".partial/") or not path.is_file():
            continue
        st = path.stat()
        out[rel] = (path.read_bytes(), st.st_mtime_ns, st.st_ino)
    return out


def assert_local_folder_clean(root: Path, listed: set[str]) -> None:
    """No temporary or partial file is visible under an archive name: every file outside
    `.partial/` is an object the store lists, under segments/, transactions/, schemas/ or
    checkpoints/."""
    files = set(local_files(root))
    assert files == listed, sorted(files ^ listed)[:10]
    for rel in files:
        top = rel.split("/", 1)[0]
        assert top in ("segments", "transactions", "schemas", "checkpoints", "snapshots"), rel
        if top in ("segments", "transactions"):
            parse_segment_key(rel)
        if top == "snapshots":
            parse_part_key(rel)
    leftovers = [p for p in (root / ".partial").glob("*")] if (root / ".partial").exists() else []
    assert all(p.suffix == ".tmp" for p in leftovers), leftovers


# --- configuration and processes --------------------------------------------------------------


def _toml_table(table: Mapping[str, Any], path: tuple[str, ...], array: bool = False) -> list[str]:
    lines: list[str] = []
    if path:
        header = ".".join(json.dumps(part) for part in path)
        lines.append(f"[[{header}]]" if array else f"[{header}]")
    nested: list[tuple[str, Any]] = []
    for key, value in table.items():
        if isinstance(value, dict) or (isinstance(value, list) and value
                                       and all(isinstance(v, dict) for v in value)):
            nested.append((key, value))
        else:
            lines.append(f"{json.dumps(key)} = {json.dumps(value)}")
    for key, value in nested:
        if isinstance(value, dict):
            lines += _toml_table(value, (*path, key))
        else:
            for item in value:
                lines += _toml_table(item, (*path, key), array=True)
    return lines


def write_config(path: Path, config: Config) -> Path:
    """*config* as the TOML file `replicator run` reads (checked by loading it back), with
    the metrics endpoint on a free port (capture and sinks run as two processes)."""
    config = config.model_copy(update={"metrics": MetricsConfig(listen="127.0.0.1:0")})
    data = config.model_dump(mode="json", exclude_none=True)
    path.write_text("\n".join(_toml_table(data, ())) + "\n")
    assert load_config(path, {}) == config
    return path


def start_run(config: Path, only: str, log: Path, environ: Mapping[str, str]
              ) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "replicator", "run", "--only", only, "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env={**environ, "PYTHONUNBUFFERED": "1"})


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


async def stop_gracefully(proc: subprocess.Popen[bytes], log: Path, within: float = 60) -> None:
    proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(proc.wait, within)
    assert code == 0, f"exit code {code} after SIGTERM:\n{tail(log)}"


def kill_quietly(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def assert_running(tasks: list[asyncio.Task[None]]) -> None:
    """Fail at once, with its error, if a pipeline task stopped."""
    for task in tasks:
        if task.done():
            task.result()
            raise AssertionError("a task stopped early")


async def wait_for_slot(dsn: str, slot: str, alive: Callable[[], None]) -> None:
    """Versions overwritten before the slot existed were never capturable one by one: the
    ground truth starts once the slot does."""
    async def ready() -> bool:
        alive()
        return await slot_confirmed(dsn, slot) is not None
    await wait_for(ready, within=60, what=f"replication slot {slot}")


async def finish(tasks: Iterable[asyncio.Task[Any]], within: float = 60) -> None:
    """Await stopped tasks; an exception in any of them fails the test."""
    for task in tasks:
        await asyncio.wait_for(task, within)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def rewind_group(bootstrap: str, group: str, topics: Iterable[str]) -> None:
    """Commit the beginning of every partition for *group* (which has no live member), so
    the next sink reads everything again."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    tps = [TopicPartition(d["topic"], p["partition"]) for d in described
           for p in d["partitions"]]
    assert tps
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        await consumer.commit(dict(starts))
    finally:
        await consumer.stop()


# --- 1. kill -9 of the sink -------------------------------------------------------------------

KILLS = ("after-progress", "early", "after-progress", "after-progress")


async def test_sink_survives_kill9(pg_dsn: str, kafka_bootstrap: str, topic_prefix: str,
                                   tmp_path: Path, s3_target: StoreTarget) -> None:
    setup_schema(pg_dsn)
    dests = destinations(tmp_path, s3_target)  # local folder + S3 (moto)
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), dests)
    cfg = write_config(tmp_path / "replicator.toml", config)
    env = sink_environ()
    capture_log, sink_log = tmp_path / "capture.log", tmp_path / "sink.log"
    rnd = random.Random(23)
    stores = {d.name: open_store(d.url, env) for d in dests}
    load = Workload(pg_dsn)
    stop = asyncio.Event()
    capture = start_run(cfg, "capture", capture_log, os.environ)
    sink: subprocess.Popen[bytes] | None = None
    load_task: asyncio.Task[None] | None = None

    def capture_alive() -> None:
        assert capture.poll() is None, tail(capture_log)

    def sink_alive() -> None:
        assert sink is not None and sink.poll() is None, tail(sink_log)

    try:
        await wait_for_slot(pg_dsn, config.source.slot, capture_alive)
        load_task = asyncio.create_task(load.run(stop))
        sink = start_run(cfg, "sinks", sink_log, env)
        kinds: list[str] = []
        for kind in KILLS:
            if kind == "early":
                # during start-up: reading checkpoints, joining the consumer groups
                await asyncio.sleep(rnd.uniform(0.5, 4.0))
            else:
                before = {n: await checkpoint_of(s, n) for n, s in stores.items()}

                async def progressed(before: dict[str, int] = before) -> bool:
                    sink_alive()
                    capture_alive()
                    return all([await checkpoint_of(s, n) > before[n]
                                for n, s in stores.items()])
                # (a restarted sink waits for the killed member's session to time out)
                await wait_for(progressed, within=90, what="the restarted sink's progress")
                await asyncio.sleep(rnd.uniform(0.0, 2.5))  # a random moment, often mid-flush
            sink_alive()
            sink.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(sink.wait, 30) == -signal.SIGKILL
            kinds.append(kind)
            await asyncio.sleep(rnd.uniform(0.1, 1.0))
            sink = start_run(cfg, "sinks", sink_log, env)
        await asyncio.sleep(3)
        stop.set()
        await load_task
        end = load.end

        async def all_durable() -> bool:
            sink_alive()
            return all([await checkpoint_of(s, n) > end for n, s in stores.items()])
        await wait_for(all_durable, within=150, what="every checkpoint past the workload's end")
        await stop_gracefully(sink, sink_log)
        await stop_gracefully(capture, capture_log)
    finally:
        stop.set()
        if load_task is not None and not load_task.done():
            load_task.cancel()
        kill_quietly(sink)
        kill_quietly(capture)
    assert kinds == list(KILLS)
    assert len(load.truth) > 500
    try:
        for name, store in stores.items():
            assert_all_archived(name, await read_whole_archive(store, keyring()), load.truth)
        listed = {info.key async for info in stores["local"].list("")}
        assert_local_folder_clean(tmp_path / "archive", listed)
    finally:
        for store in stores.values():
            await store.close()


# --- 2. an Azure outage -----------------------------------------------------------------------

OUTAGE_S = 60.0
SAMPLE_EVERY_S = 3.0
#: "within a few flush intervals": FAST flushes every 0.5-1.5 s per tier (measured: under 2 s).
LAG_BOUND_S = 5 * FAST.low_s


async def test_azure_outage_holds_back_only_azure(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        s3_target: StoreTarget, azure_target: StoreTarget, dev_stack: Stack) -> None:
    azurite = dev_stack.services["azure"]
    assert azurite.managed, "this test stops Azurite: it needs the native one"
    setup_schema(pg_dsn)
    dests = destinations(tmp_path, s3_target, azure_target)  # local, s3, azure
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), dests)
    cfg = write_config(tmp_path / "replicator.toml", config)
    capture_log = tmp_path / "capture.log"
    loop = asyncio.get_running_loop()
    load = Workload(pg_dsn)
    stop = asyncio.Event()
    capture = start_run(cfg, "capture", capture_log, os.environ)
    sinks = Sinks(config, sink_environ())
    tasks: list[asyncio.Task[Any]] = []
    samples: list[tuple[float, dict[str, int], str]] = []
    stopped_azurite = False

    def capture_alive() -> None:
        assert capture.poll() is None, tail(capture_log)

    def sinks_alive() -> None:
        for task in tasks:
            if task.done():
                task.result()  # raises what stopped it
                raise AssertionError("a task stopped early")

    def checkpoints() -> dict[str, int]:
        return {name: int(stats.checkpoint) for name, stats in sinks.stats.items()}

    try:
        await sinks.open()
        tasks.append(asyncio.create_task(sinks.run()))
        await wait_for_slot(pg_dsn, config.source.slot, capture_alive)
        tasks.append(asyncio.create_task(load.run(stop)))
        await asyncio.sleep(4)
        mark = load.end

        async def all_past_mark() -> bool:
            sinks_alive()
            return all(c > mark for c in checkpoints().values())
        await wait_for(all_past_mark, within=60, what="every destination under way")

        await asyncio.to_thread(azurite.stop)
        stopped_azurite = True
        outage_started = loop.time()
        await asyncio.sleep(1.0)
        frozen = checkpoints()["azure"]
        while loop.time() - outage_started < OUTAGE_S:
            await asyncio.sleep(SAMPLE_EVERY_S)
            sinks_alive()
            capture_alive()
            samples.append((loop.time(), checkpoints(), sinks.stats["azure"].breaker))
        await azurite.start()
        stopped_azurite = False
        health = await azurite.health()
        assert health.state == "healthy", health
        await asyncio.sleep(5)
        stop.set()
        await tasks.pop()
        end = load.end

        async def all_durable() -> bool:
            sinks_alive()
            return all(c > end for c in checkpoints().values())
        await wait_for(all_durable, within=180, what="every checkpoint (Azure's too) past the end")
        sinks.stop()
        await finish(tasks)
        await stop_gracefully(capture, capture_log)
    finally:
        stop.set()
        sinks.stop()
        for task in tasks:
            if not task.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 30)
        kill_quietly(capture)
        if stopped_azurite:
            await azurite.start()

    assert len(samples) >= OUTAGE_S / SAMPLE_EVERY_S - 2
    report = [(round(t - samples[0][0], 1), {n: round(lag_s(t, c, load.commits), 1)
                                             for n, c in cps.items()}) for t, cps, _ in samples]
    for name in ("local", "s3"):
        lags = [lag_s(t, cps[name], load.commits) for t, cps, _ in samples]
        assert max(lags) <= LAG_BOUND_S, (name, report)
        values = [cps[name] for _, cps, _ in samples]
        assert all(b > a for a, b in itertools.pairwise(values)), (name, values)
    assert all(cps["azure"] == frozen for _, cps, _ in samples), report
    last_t, last_cps, _ = samples[-1]
    assert lag_s(last_t, last_cps["azure"], load.commits) >= OUTAGE_S - 2 * SAMPLE_EVERY_S - 5
    assert "open" in {breaker for _, _, breaker in samples}
    for d in dests:
        store = open_store(d.url, sink_environ())
        try:
            assert_all_archived(d.name, await read_whole_archive(store, keyring()), load.truth)
        finally:
            await store.close()


# --- 3. tampered objects, unknown and wrong keys, create-only re-runs -------------------------


async def run_pipeline(config: Config, sinks: Sinks, load: Workload, transactions: int,
                       within: float = 60) -> None:
    """Capture and sinks in process until every destination's checkpoint covers a workload
    of *transactions* transactions; then both stop."""
    capture = Capture(config)
    await sinks.open()
    tasks = [asyncio.create_task(capture.run()), asyncio.create_task(sinks.run())]

    alive = functools.partial(assert_running, tasks)
    try:
        await wait_for_slot(config.source.dsn, config.source.slot, alive)
        await load.run(asyncio.Event(), transactions)
        end = load.end

        async def durable() -> bool:
            alive()
            return all(int(s.checkpoint) > end for s in sinks.stats.values())
        await wait_for(durable, within=within, what="every checkpoint past the workload's end")
    finally:
        capture.stop()
        sinks.stop()
    await finish(tasks)


async def test_tampered_objects_and_wrong_keys(pg_dsn: str, kafka_bootstrap: str,
                                              topic_prefix: str, tmp_path: Path) -> None:
    setup_schema(pg_dsn)
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix),
                               destinations(tmp_path))  # the local folder only
    load = Workload(pg_dsn, pause_s=0.05)
    first = Sinks(config, sink_environ())
    await run_pipeline(config, first, load, transactions=60)
    written_first = first.stats["local"].changes_written
    root = tmp_path / "archive"
    store = LocalStore(root)
    keys = [info.key async for info in store.list("segments/")]
    assert len(keys) >= 3, keys
    tx_keys = [info.key async for info in store.list("transactions/")]
    assert tx_keys

    # one flipped byte inside a segment's encrypted chunks
    victim, other = keys[len(keys) // 2], keys[0]
    path = root / victim
    original = path.read_bytes()
    header = read_header(original, victim)
    assert len(original) > header.size + 32
    tampered = bytearray(original)
    tampered[header.size + (len(original) - header.size) // 2] ^= 0x10
    path.write_bytes(bytes(tampered))
    with pytest.raises(ObjectTampered) as flipped:
        await archive.read_segment(store, victim, keyring())
    assert victim in str(flipped.value)
    await archive.read_segment(store, other, keyring())  # the others still read

    # a keyring without the object's key, and one with another key of the same name
    stranger_key, impostor_key = generate_key(), generate_key()
    secrets = [KEK, base64.b64encode(stranger_key).decode(),
               base64.b64encode(impostor_key).decode()]
    stranger = Keyring({"OTHER": stranger_key})
    with pytest.raises(UnknownKey) as unknown:
        await archive.read_segment(store, other, stranger)
    assert unknown.value.key_name == "TEST1"
    assert "TEST1" in str(unknown.value) and other in str(unknown.value)
    impostor = Keyring({"TEST1": impostor_key})
    with pytest.raises(WrongKey) as wrong:
        await archive.read_segment(store, other, impostor)
    assert wrong.value.key_name == "TEST1" and other in str(wrong.value)
    with pytest.raises(WrongKey):
        async for _ in archive.transaction_records(store, impostor):
            pass
    for message in (str(unknown.value), str(wrong.value), repr(stranger), repr(impostor)):
        assert not any(secret in message for secret in secrets), message

    # a re-run over the same Kafka data writes only new objects
    before = local_files(root)
    assert before[victim][0] == bytes(tampered)
    await rewind_group(kafka_bootstrap, f"{topic_prefix}.sink.local", all_topics(topic_prefix))
    again = Sinks(config, sink_environ())
    await again.open()
    task = asyncio.create_task(again.run())
    try:
        worker = again.workers["local"]
        with pytest.raises(AlreadyExists):
            await worker.store.put(victim, original)  # create-only, through the sink's store

        async def reread() -> bool:
            if task.done():
                task.result()
            return worker.stats.changes_written >= written_first
        await wait_for(reread, within=60, what="the re-run to write everything again")
    finally:
        again.stop()
    await finish([task])
    after = local_files(root)
    rewritten = [rel for rel, state in before.items()
                 if rel in after and after[rel] != state]
    assert not rewritten, f"existing objects rewritten: {rewritten[:10]}"
    # Removed: only checkpoints the re-run superseded (it may flush past the first run's last
    # checkpoint, and a sink keeps the newest CHECKPOINTS_KEPT of each tier).
    removed = [rel for rel in before if rel not in after]
    for rel in removed:
        assert rel.startswith("checkpoints/local/"), f"existing object removed: {rel}"
        folder = rel.rsplit("/", 1)[0]
        kept = sorted(name for name in after if name.rsplit("/", 1)[0] == folder)
        assert len(kept) == CHECKPOINTS_KEPT and all(name > rel for name in kept), (
            f"checkpoint {rel} removed while newer ones are not kept: {kept}")
    assert path.read_bytes() == bytes(tampered)
    with pytest.raises(ObjectTampered):
        await archive.read_segment(store, victim, keyring())


# --- 4. setup mistakes and an unreachable store -----------------------------------------------


async def test_setup_mistakes_and_unreachable_store(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        s3_target: StoreTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    # No credentials anywhere botocore's default chain looks either.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    base = make_config(pg_dsn, kafka_bootstrap, topic_prefix)
    config = with_destinations(base, destinations(tmp_path, s3_target))
    without_keys = {k: v for k, v in sink_environ().items()
                    if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}

    with pytest.raises(SinkSetupError) as missing:
        await Sinks(config, without_keys).open()
    assert "'s3'" in str(missing.value) and "AWS_ACCESS_KEY_ID" in str(missing.value)
    with pytest.raises(SinkSetupError) as half:
        await Sinks(config, {**without_keys, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY}).open()
    assert "'s3'" in str(half.value) and "AWS_SECRET_ACCESS_KEY" in str(half.value)
    assert S3_SECRET_KEY not in str(half.value)
    unmounted = with_destinations(base, (DestinationConfig(
        name="usb", url=f"file://{tmp_path / 'not-mounted'}", flush=FAST),))
    with pytest.raises(SinkSetupError) as no_root:
        await Sinks(unmounted, sink_environ()).open()
    assert "'usb'" in str(no_root.value) and "does not exist" in str(no_root.value)

    # A store nobody answers at: the others go on while its breaker opens.
    setup_schema(pg_dsn)
    offline = DestinationConfig(
        name="offline", flush=FAST,
        url=f"s3://{s3_target.bucket}/?endpoint=http://127.0.0.1:{closed_port()}"
            f"&region={S3_REGION}")
    local = destinations(tmp_path)[0]
    config = with_destinations(base, (local, offline))
    capture = Capture(config)
    sinks = Sinks(config, sink_environ())
    await sinks.open()  # unreachable is not a setup mistake
    load = Workload(pg_dsn, pause_s=0.05)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(capture.run()), asyncio.create_task(sinks.run())]

    alive = functools.partial(assert_running, tasks)
    try:
        await wait_for_slot(pg_dsn, config.source.slot, alive)
        tasks.append(asyncio.create_task(load.run(stop)))
        offline_stats = sinks.workers["offline"].stats

        async def breaker_open() -> bool:
            alive()
            return offline_stats.breaker == "open"
        await wait_for(breaker_open, within=120, what="the unreachable store's breaker to open")
        mark = load.end
        local_stats = sinks.workers["local"].stats

        async def local_past_mark() -> bool:
            alive()
            return int(local_stats.checkpoint) > mark
        await wait_for(local_past_mark, within=30, what="the local checkpoint to advance")
        alive()
        assert offline_stats.failures >= 3
        assert int(offline_stats.checkpoint) == 0
        assert local_stats.breaker == "closed"
    finally:
        stop.set()
        capture.stop()
        sinks.stop()
    await finish(tasks)


# --- 5. a flush that fails part-way -----------------------------------------------------------


class FlakyStore(ObjectStore):
    """A store whose n-th put under each given prefix fails once (after the puts before it
    in the same flush succeeded)."""

    def __init__(self, inner: ObjectStore, fail_at: Mapping[str, int]) -> None:
        self.inner = inner
        self.url = inner.url
        self.fail_at = dict(fail_at)
        self.puts: dict[str, int] = dict.fromkeys(fail_at, 0)
        self.failed: list[str] = []

    async def put(self, key: str, data: bytes, *,
                  metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        for prefix, nth in self.fail_at.items():
            if key.startswith(prefix):
                self.puts[prefix] += 1
                if self.puts[prefix] == nth:
                    self.failed.append(key)
                    raise Retriable("injected failure", url=self.url, key=key)
        return await self.inner.put(key, data, metadata=metadata)

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        return await self.inner.get(key, start=start, end=end)

    async def stat(self, key: str) -> ObjectInfo:
        return await self.inner.stat(key)

    async def list(self, prefix: str = "", *, after: str | None = None
                   ) -> Any:  # AsyncIterator[ObjectInfo]
        async for info in self.inner.list(prefix, after=after):
            yield info

    async def delete(self, keys: Iterable[str]) -> None:
        await self.inner.delete(keys)

    async def close(self) -> None:
        await self.inner.close()


async def test_flush_failing_part_way_loses_no_progress(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    setup_schema(pg_dsn)
    local = destinations(tmp_path)[0]
    config = with_destinations(make_config(pg_dsn, kafka_bootstrap, topic_prefix), (local,))
    # The 3rd transaction-record put fails after that flush's segments were written; the
    # 6th segment put fails after others of its flush were.
    store = FlakyStore(LocalStore(tmp_path / "archive"),
                       {"transactions/": 3, "segments/": 6})
    worker = SinkWorker(local, config.kafka, store, keyring())
    capture = Capture(config)
    load = Workload(pg_dsn, pause_s=0.1)
    tasks = [asyncio.create_task(capture.run()), asyncio.create_task(worker.run())]

    alive = functools.partial(assert_running, tasks)

    try:
        await wait_for_slot(pg_dsn, config.source.slot, alive)
        await load.run(asyncio.Event(), 80)
        end = load.end

        async def durable() -> bool:
            alive()
            return int(worker.stats.checkpoint) > end
        await wait_for(durable, within=45, what="the checkpoint past the workload's end "
                       "(without a restart)")
    finally:
        capture.stop()
        worker.stop()
    await finish(tasks)
    assert len(store.failed) == 2, store.failed
    assert worker.stats.failures == 2
    assert int(await archive.checkpoint(store, "local", keyring=keyring())) > end
    assert_all_archived("local", await read_whole_archive(store, keyring()), load.truth)
