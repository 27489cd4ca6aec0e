"""Draining a Kafka backlog into one destination with 1 and 2 sink processes, against a raw
upload of the same bytes.

Backlog: a fresh database of its own with `benchmarks.rpo`'s sample (the capture tests'
schema; 400 weddings, 100 in each tier, 64 guests each) and N changes (default 1,000,000;
`--quick` 100,000) made of small transactions: two server-side procedures (`CALL
bench_drain_load`, one connection each, `synchronous_commit = off`) commit in a loop, each
transaction updating one or two guests (alternately) of one wedding, the tier going
round-robin, so changes are spread evenly over the four tiers and over each tier topic's two
partitions. The capture (the service's `Capture`, in this process, `snapshot = "never"`)
streams them into Kafka meanwhile and runs until it has published every change and confirmed
the last transaction's end LSN to the slot; then it is stopped, so the two cores are left to
the sinks.

Drain: sink processes (`replicator run --only sinks --config FILE`, each its own Python
process on uvloop, as deployed) for ONE destination (a local folder by default; `--store s3`:
a bucket on the local stack's moto), first 1 process, then, into a fresh destination (a new
folder or bucket and a new destination name, so a new consumer group that reads the topics
from their start), 2 processes with the same configuration, which share the destination's
partitions through Kafka's consumer group (replicator/sink/members.py). Flush intervals:
critical 1 s, high 5 s, normal 10 s, low 15 s (`benchmarks.rpo`'s setting); size bounds at
their defaults; compaction disabled. The time of a drain runs from the start of the processes
(interpreter start-up and the group's first assignment included) until the destination's
overall checkpoint (`replicator.archive.reader.checkpoint`, polled every 0.1 s) reaches the
end LSN of the last transaction. `scale_out` = {"1": changes/s, "2": changes/s};
`scale_out_ratio` = two / one.

Raw upload (same run, after the 1-process drain, nothing else of the benchmark running): the
objects the 1-process sink left in its destination (segments, transaction records, schemas,
checkpoints: `sink_bytes` in all) are read back and put again, as plain PUTs of the same
sizes, under `raw-upload/` with the same store client (`connectors.registry.open_store`), at
most `WRITES_AT_ONCE` (the sink's) at a time; only the PUTs are timed.
`ratio_sink_vs_raw_upload` = (sink_bytes / the 1-process drain's seconds) / (sink_bytes / the
raw upload's seconds).

Also reported per drain: every checkpoint seen (seconds since the start, changes it covers,
from the capture's end LSNs), the seconds until the first one, each process's CPU and role in
the group (from its log), rebalances, and how busy the machine was meanwhile (other work on a
shared machine shows there).

Targets (reported, not asserted): scale-out >= 1.6x, sink >= 0.5x raw upload.

    .venv/bin/python -m benchmarks.drain [--changes 1000000] [--quick] [--store local|s3]
        [--json]

`--json` prints one JSON object on the last line: `changes`, `scale_out`, `scale_out_ratio`,
`sink_bytes`, `sink_bytes_per_s`, `raw_upload_bytes_per_s`, `ratio_sink_vs_raw_upload`,
`targets`, `meets`, and details beside them. `run_drain` is what `benchmarks.rpo` calls.
Everything it creates (database, slot, topics and consumer groups of its prefix, folders,
buckets) is removed, and every process it started is stopped, on failure too.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import psycopg

from benchmarks import rpo
from benchmarks.capture import delete_topics
from connectors.base import ObjectInfo, ObjectStore, run_bounded
from connectors.errors import NotFound
from connectors.registry import open_store
from replicator.archive.reader import checkpoint
from replicator.capture import Capture
from replicator.config import CompactionConfig, Config, DestinationConfig, FlushConfig
from replicator.devstack.settings import S3_REGION, StackSettings
from replicator.devstack.stack import Stack
from replicator.position import Lsn
from replicator.sink.worker import WRITES_AT_ONCE
from replicator.source.assembler import Assembler, Committed
from tests.integration.archive_helpers import keyring, sink_environ, with_destinations
from tests.integration.capture_helpers import make_config
from tests.integration.test_archive_faults import write_config

DEFAULT_CHANGES = 1_000_000
QUICK_CHANGES = 100_000
TARGETS = {"scale_out": 1.6, "ratio_sink_vs_raw_upload": 0.5}
MEMBERS = (1, 2)  # sink processes of the two drains
WRITERS = 2  # load procedures
POLL_S = 0.1  # the destination's checkpoint
RAW_PREFIX = "raw-upload/"
RAW_BATCH_BYTES = 256 << 20  # read back (untimed), then put (timed), this much at a time
STOP_S = 60.0  # a sink process's graceful stop, before it is killed
CHECKPOINTS_SHOWN = 60  # checkpoint values kept in the result, per drain (12 printed)

# One writer: *changes* changes in transactions of one or two guest updates (alternately),
# each transaction committed; the wedding's tier goes round-robin (i + w) % 4. Writer w owns
# its own guest slots of every wedding (as in bench_rpo_load), so writers never wait on each
# other's row locks. Returns the transactions committed.
FILL_PROCEDURE = """
CREATE PROCEDURE bench_drain_load(w int, n_workers int, changes bigint,
    INOUT transactions bigint DEFAULT NULL)
LANGUAGE plpgsql AS $$
DECLARE
  slots int := @GUESTS@ / n_workers;
  i bigint := 0; done bigint := 0; k int; wedding bigint; g bigint;
BEGIN
  WHILE done < changes LOOP
    k := (i + w) % 4;
    wedding := 1 + ((i / 4 + w * 7) % @PER_TIER@) * 4 + k;
    g := wedding * 100 + w * slots + ((i / 4) % greatest(1, slots / 2)) * 2;
    IF i % 2 = 0 OR done + 1 = changes THEN
      UPDATE guests SET notes = 'w' || w || ' tx ' || i WHERE id = g;
      done := done + 1;
    ELSE
      UPDATE guests SET notes = 'w' || w || ' tx ' || i WHERE id IN (g, g + 1);
      done := done + 2;
    END IF;
    COMMIT;
    i := i + 1;
  END LOOP;
  transactions := i;
END
$$
""".replace("@GUESTS@", str(rpo.GUESTS_PER_WEDDING)).replace(
    "@PER_TIER@", str(rpo.WEDDINGS_PER_TIER))


# --- the backlog ----------------------------------------------------------------------------


class BacklogCapture(Capture):
    """A Capture that notes, for every published transaction with changes, its end LSN and
    the changes published up to it (in commit order: the end LSNs ascend)."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.streaming = asyncio.Event()
        self.ends = array("q")
        self.covered = array("q")  # changes published up to and including that transaction

    async def _stream_forever(self, start_lsn: Lsn) -> None:
        self.streaming.set()
        await super()._stream_forever(start_lsn)

    async def _publish(self, tx: Committed, assembler: Assembler) -> None:
        await super()._publish(tx, assembler)
        if tx.events:
            self.ends.append(int(tx.record.end_lsn))
            self.covered.append(self.stats.events)


@dataclass
class Backlog:
    changes: int
    transactions: int
    end_lsn: int  # of the last transaction with changes
    ends: array[int]  # every such transaction's end LSN, ascending
    covered: array[int]  # changes up to and including it
    load_s: float  # the procedures' commits
    captured_s: float  # from the load's start until the capture confirmed the end LSN
    capture_cpu_s: float  # this process's CPU meanwhile

    def changes_at(self, lsn: int) -> int:
        """Changes a checkpoint at *lsn* covers."""
        i = bisect.bisect_right(self.ends, lsn)
        return self.covered[i - 1] if i else 0


async def fill(dsn: str, capture: BacklogCapture, changes: int, say: Callable[[str], None]
               ) -> Backlog:
    """The load, captured as it runs; returns once the capture confirmed its last commit."""
    task = asyncio.create_task(capture.run(), name="capture")
    try:
        await rpo.wait_until(capture.streaming.is_set, 120, "capture to start streaming", task)
        say(f"capture streaming; committing {changes:,} changes with {WRITERS} writers ...")
        share = [changes // WRITERS + (1 if w < changes % WRITERS else 0)
                 for w in range(WRITERS)]

        async def one(w: int) -> int:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute("SET synchronous_commit = off")
                cur = await conn.execute("CALL bench_drain_load(%s, %s, %s)",
                                         (w, WRITERS, share[w]))
                row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        started, cpu = time.perf_counter(), time.process_time()
        transactions = sum(await asyncio.gather(*(one(w) for w in range(WRITERS))))
        load_s = time.perf_counter() - started
        say(f"load committed in {load_s:.1f}s ({transactions:,} transactions, "
            f"{changes / load_s:,.0f} changes/s); capture at {capture.stats.events:,} changes")
        within = max(600.0, changes / 1000)
        await rpo.wait_until(lambda: capture.stats.events >= changes, within,
                             f"capture to publish {changes:,} changes", task)
        end_lsn = capture.ends[-1]
        await rpo.wait_until(lambda: int(capture.stats.confirmed_lsn) >= end_lsn, within,
                             "capture to confirm the last transaction", task)
        captured_s = time.perf_counter() - started
        capture_cpu_s = time.process_time() - cpu
    finally:
        capture.stop()
        await asyncio.wait_for(task, 120)
    if capture.stats.events != changes:
        raise RuntimeError(f"captured {capture.stats.events:,} changes, expected {changes:,}")
    return Backlog(changes, transactions, end_lsn, capture.ends, capture.covered, load_s,
                   captured_s, capture_cpu_s)


# --- the sink processes ---------------------------------------------------------------------


def start_sink(config: Path, log: Path, environ: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "replicator", "run", "--only", "sinks", "--config",
             str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=rpo.PROJECT_ROOT,
            env={**environ, "PYTHONUNBUFFERED": "1"})


def stop_sink(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, and SIGKILL if it has not exited within STOP_S; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def kill_sink(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def process_cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return float("nan")


def machine_busy_s() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


@dataclass
class Drain:
    """One drain's measurement."""

    members: int
    seconds: float = 0.0
    first_checkpoint_s: float | None = None
    seen: list[tuple[float, int]] = field(default_factory=list)  # (s since start, lsn)
    cpu_s: list[float] = field(default_factory=list)  # per process, at the end
    machine_busy_cores: float = 0.0
    roles: list[str] = field(default_factory=list)
    rebalances: list[int] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)


async def drain(config: Config, dest: DestinationConfig, members: int, work: Path,
                environ: dict[str, str], backlog: Backlog) -> Drain:
    """*members* sink processes for *dest*, from their start until its checkpoint reaches
    the backlog's end LSN; then they are stopped."""
    path = write_config(work / f"{dest.name}.toml", with_destinations(config, (dest,)))
    logs = [work / f"{dest.name}-{n}.log" for n in range(members)]
    store = open_store(dest.url, environ)
    ring = keyring()
    result = Drain(members)
    procs: list[subprocess.Popen[bytes]] = []
    timeout = max(600.0, backlog.changes / 500)
    try:
        busy0 = machine_busy_s()
        started = time.perf_counter()
        procs = [start_sink(path, log, environ) for log in logs]
        last = -1
        while True:
            try:
                lsn = int(await checkpoint(store, dest.name, keyring=ring))
            except NotFound:  # pruned between the LIST and the GET
                lsn = last
            elapsed = time.perf_counter() - started
            if lsn > last and lsn > 0:
                if result.first_checkpoint_s is None:
                    result.first_checkpoint_s = elapsed
                result.seen.append((elapsed, lsn))
                last = lsn
            if lsn >= backlog.end_lsn:
                break
            for proc, log in zip(procs, logs, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"a sink process exited with code {proc.returncode}:"
                                       f"\n{tail(log)}")
            if elapsed > timeout:
                raise TimeoutError(f"the checkpoint of {dest.name} did not reach "
                                   f"{Lsn(backlog.end_lsn)} within {timeout:.0f}s (at "
                                   f"{Lsn(max(last, 0))})")
            await asyncio.sleep(POLL_S)
        result.seconds = time.perf_counter() - started
        result.machine_busy_cores = (machine_busy_s() - busy0) / result.seconds
        result.cpu_s = [process_cpu_s(p.pid) for p in procs]
        result.exit_codes = list(await asyncio.gather(
            *(asyncio.to_thread(stop_sink, p) for p in procs)))
    finally:
        for proc in procs:
            kill_sink(proc)
        await store.close()
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        roles = [r for r in ("the only member", "the checkpointer", "a member")
                 if f"this process is {r}" in text]
        result.roles.append("/".join(roles) or "?")
        result.rebalances.append(text.count("partitions revoked, the group rebalanced"))
    return result


# --- the raw upload -------------------------------------------------------------------------


@dataclass
class RawUpload:
    objects: int
    bytes: int
    seconds: float  # the PUTs only
    by_prefix: dict[str, list[int]]  # first key segment -> [objects, bytes]


async def raw_upload(url: str, environ: dict[str, str]) -> RawUpload:
    """Every object under *url* read back and put again under RAW_PREFIX, WRITES_AT_ONCE at
    a time; only the puts are timed."""
    store = open_store(url, environ)
    try:
        infos = [i async for i in store.list("") if not i.key.startswith(RAW_PREFIX)]
        by_prefix: dict[str, list[int]] = {}
        for info in infos:
            entry = by_prefix.setdefault(info.key.split("/", 1)[0], [0, 0])
            entry[0] += 1
            entry[1] += info.size
        batches: list[list[ObjectInfo]] = [[]]
        size = 0
        for info in infos:
            if size + info.size > RAW_BATCH_BYTES and batches[-1]:
                batches.append([])
                size = 0
            batches[-1].append(info)
            size += info.size
        seconds = 0.0
        for batch in batches:
            data = await run_bounded([_getter(store, i.key) for i in batch], WRITES_AT_ONCE)
            puts = [_putter(store, RAW_PREFIX + i.key, d)
                    for i, d in zip(batch, data, strict=True)]
            started = time.perf_counter()
            await run_bounded(puts, WRITES_AT_ONCE)
            seconds += time.perf_counter() - started
        return RawUpload(len(infos), sum(i.size for i in infos), seconds, by_prefix)
    finally:
        await store.close()


def _getter(store: ObjectStore, key: str) -> Callable[[], Any]:
    return lambda: store.get(key)


def _putter(store: ObjectStore, key: str, data: bytes) -> Callable[[], Any]:
    return lambda: store.put(key, data)


# --- the run --------------------------------------------------------------------------------


def thin(values: list[Any], most: int) -> list[Any]:
    """At most *most* of *values*, evenly spaced, the first and the last included."""
    if len(values) <= most:
        return list(values)
    step = (len(values) - 1) / (most - 1)
    return [values[round(i * step)] for i in range(most)]


def drain_details(d: Drain, backlog: Backlog) -> dict[str, Any]:
    return {
        "processes": d.members,
        "seconds": round(d.seconds, 2),
        "changes_per_s": round(backlog.changes / d.seconds, 1),
        "first_checkpoint_s": (None if d.first_checkpoint_s is None
                               else round(d.first_checkpoint_s, 2)),
        # checkpoint values seen (at most CHECKPOINTS_SHOWN, evenly picked, the last
        # included): [seconds since the start, changes it covers]
        "checkpoints": [[round(t, 2), backlog.changes_at(lsn)]
                        for t, lsn in thin(d.seen, CHECKPOINTS_SHOWN)],
        "cpu_s": [round(c, 2) for c in d.cpu_s],
        "cpu_us_per_change": round(sum(d.cpu_s) / backlog.changes * 1e6, 1),
        "machine_busy_cores": round(d.machine_busy_cores, 2),
        "roles": d.roles,
        "rebalances": d.rebalances,
        "exit_codes": d.exit_codes,
    }


async def run_drain(changes: int, *, store: str = "local",
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark (module docstring) in a database, topics and destinations of its
    own, all removed at the end; returns the result (the `--json` object)."""
    services = ["pg15", "kafka"] + (["s3"] if store == "s3" else [])
    stack = Stack(StackSettings.from_env(os.environ))
    await stack.up(services)
    admin = stack.services["pg15"].address()
    bootstrap = stack.services["kafka"].address()
    s3_endpoint = stack.services["s3"].address() if store == "s3" else ""
    tag = uuid.uuid4().hex[:8]
    db, prefix = f"bench_drain_{tag}", f"bench-drain-{tag}"
    work = Path(tempfile.mkdtemp(prefix=f"wedsync-drain-{tag}-"))
    environ = sink_environ()
    flush = FlushConfig(critical_s=rpo.BENCH_FLUSH["critical"], high_s=rpo.BENCH_FLUSH["high"],
                        normal_s=rpo.BENCH_FLUSH["normal"], low_s=rpo.BENCH_FLUSH["low"])
    buckets: list[str] = []

    def destination(members: int) -> DestinationConfig:
        name = f"drain{members}"
        if store == "s3":
            bucket = f"{prefix}-{members}"
            buckets.append(bucket)
            url = f"s3://{bucket}/?endpoint={s3_endpoint}&region={S3_REGION}"
        else:
            folder = work / name
            folder.mkdir()
            url = f"file://{folder}"
        return DestinationConfig(name=name, url=url, flush=flush,
                                 compaction=CompactionConfig(enabled=False))

    result: dict[str, Any] = {"changes": changes, "store": store, "writes_at_once":
                              WRITES_AT_ONCE, "flush_s": dict(rpo.BENCH_FLUSH),
                              "cores": psutil.cpu_count()}
    try:
        say(f"drain: setting up {db} (400 weddings, "
            f"{400 * rpo.GUESTS_PER_WEDDING:,} guests), work folder {work} ...")
        dsn = await rpo.setup_database(admin, db)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(FILL_PROCEDURE)
        config = make_config(dsn, bootstrap, prefix, snapshot="never")
        backlog = await fill(dsn, BacklogCapture(config), changes, say)
        result["transactions"] = backlog.transactions
        result["backlog"] = {"load_s": round(backlog.load_s, 2),
                             "captured_s": round(backlog.captured_s, 2),
                             "captured_changes_per_s": round(changes / backlog.captured_s, 1),
                             "capture_cpu_us_per_change": round(
                                 backlog.capture_cpu_s / changes * 1e6, 1),
                             "end_lsn": str(Lsn(backlog.end_lsn))}
        say(f"backlog in Kafka: {changes:,} changes in {backlog.transactions:,} transactions,"
            f" captured {backlog.captured_s:.1f}s after the load started; capture stopped")

        runs: dict[str, dict[str, Any]] = {}
        raw: RawUpload | None = None
        for members in MEMBERS:
            dest = destination(members)
            if store == "s3":
                await rpo.create_bucket(s3_endpoint, buckets[-1])
            say(f"draining into {dest.name} ({store}) with {members} sink process"
                f"{'es' if members > 1 else ''} ...")
            d = await drain(config, dest, members, work, environ, backlog)
            runs[str(members)] = drain_details(d, backlog)
            say(f"  {d.seconds:.1f}s: {changes / d.seconds:,.0f} changes/s; roles "
                f"{d.roles}, rebalances {d.rebalances}, CPU "
                + ", ".join(f"{c:.1f}s" for c in d.cpu_s)
                + f"; machine {d.machine_busy_cores:.2f} cores busy")
            if members == 1:
                say("raw upload of the same objects ...")
                raw = await raw_upload(dest.url, environ)
                say(f"  {raw.objects:,} objects, {raw.bytes / 1e6:,.1f} MB in "
                    f"{raw.seconds:.2f}s")
        assert raw is not None
        one, two = runs["1"], runs["2"]
        sink_bytes_per_s = raw.bytes / one["seconds"]
        raw_bytes_per_s = raw.bytes / raw.seconds if raw.seconds > 0 else float("inf")
        result.update({
            "scale_out": {"1": one["changes_per_s"], "2": two["changes_per_s"]},
            "scale_out_ratio": round(two["changes_per_s"] / one["changes_per_s"], 3),
            "sink_bytes": raw.bytes,
            "sink_objects": raw.objects,
            "sink_objects_by_prefix": raw.by_prefix,
            "sink_bytes_per_s": round(sink_bytes_per_s, 1),
            "raw_upload_s": round(raw.seconds, 3),
            "raw_upload_bytes_per_s": round(raw_bytes_per_s, 1),
            "ratio_sink_vs_raw_upload": round(sink_bytes_per_s / raw_bytes_per_s, 4),
            "runs": runs,
            "targets": TARGETS,
        })
        result["meets"] = {
            "scale_out": result["scale_out_ratio"] >= TARGETS["scale_out"],
            "ratio_sink_vs_raw_upload": (result["ratio_sink_vs_raw_upload"]
                                         >= TARGETS["ratio_sink_vs_raw_upload"]),
        }
        return result
    finally:
        problems: list[str] = []
        steps: list[tuple[str, Any]] = [
            ("database and slot", rpo.drop_database(admin, db)),
            ("topics", delete_topics(bootstrap, prefix)),
            ("consumer groups", rpo.delete_groups(bootstrap, prefix)),
            *((f"bucket {b}", rpo.delete_bucket(s3_endpoint, b)) for b in buckets)]
        for what, step in steps:
            try:
                left = await step
                if isinstance(left, list) and left:
                    problems.append(f"{what}: not deleted: {left}")
            except Exception as exc:  # report, and go on cleaning the rest
                problems.append(f"{what}: {exc!r}")
        shutil.rmtree(work, ignore_errors=True)
        if problems:
            print("drain cleanup problems: " + "; ".join(problems), file=sys.stderr)


def report(r: dict[str, Any]) -> None:
    one, two = r["runs"]["1"], r["runs"]["2"]
    print(f"\nDrain of a Kafka backlog into one destination ({r['store']}): {r['changes']:,} "
          f"changes in {r['transactions']:,} transactions; flush critical 1 s, high 5 s, "
          f"normal 10 s, low 15 s; compaction off; {r['cores']} CPUs")
    print(f"{'processes':>10}{'seconds':>9}{'changes/s':>11}{'1st ckpt s':>11}"
          f"{'CPU us/chg':>11}{'machine':>9}  roles (rebalances)")
    for d in (one, two):
        print(f"{d['processes']:>10}{d['seconds']:>9.1f}{d['changes_per_s']:>11,.0f}"
              f"{d['first_checkpoint_s'] or 0:>11.1f}{d['cpu_us_per_change']:>11.1f}"
              f"{d['machine_busy_cores']:>9.2f}  "
              + ", ".join(f"{role} ({n})" for role, n in zip(d["roles"], d["rebalances"],
                                                              strict=True)))
    for d in (one, two):
        print(f"  checkpoints with {d['processes']} (s: share of the changes covered): "
              + ", ".join(f"{t:.1f}: {c / r['changes']:.0%}"
                          for t, c in thin(d["checkpoints"], 12)))
    print(f"scale-out: {r['scale_out_ratio']:.2f}x (target >= {TARGETS['scale_out']:g}x)")
    print(f"sink, 1 process: {r['sink_bytes'] / 1e6:,.1f} MB in {r['sink_objects']:,} objects "
          f"= {r['sink_bytes_per_s'] / 1e6:,.2f} MB/s; raw upload of the same objects "
          f"({r['writes_at_once']} at a time): {r['raw_upload_s']:.2f}s = "
          f"{r['raw_upload_bytes_per_s'] / 1e6:,.1f} MB/s; ratio "
          f"{r['ratio_sink_vs_raw_upload']:.3f} (target >= "
          f"{TARGETS['ratio_sink_vs_raw_upload']:g})")


async def main(changes: int, store: str, quick: bool, as_json: bool) -> None:
    logging.basicConfig(level=logging.WARNING)
    # before the capture creates its state topic, the client logs each lookup as an error
    logging.getLogger("aiokafka.cluster").setLevel(logging.CRITICAL)

    def say(text: str) -> None:
        print(text, flush=True)

    result = await run_drain(changes, store=store, say=say)
    result["quick"] = quick
    report(result)
    if as_json:
        print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--changes", type=int, default=None,
                        help=f"changes in the backlog (default {DEFAULT_CHANGES:,}; --quick "
                             f"{QUICK_CHANGES:,})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CHANGES:,} changes")
    parser.add_argument("--store", choices=["local", "s3"], default="local",
                        help="the destination: a local folder (default) or S3 on moto")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    n = args.changes or (QUICK_CHANGES if args.quick else DEFAULT_CHANGES)
    if n < 1000:
        parser.error("--changes must be at least 1000")
    from replicator.cli.run import tune_gc

    tune_gc()  # the collector settings `replicator run` uses (the capture runs here)
    import uvloop

    uvloop.run(main(n, args.store, args.quick, args.json))
