"""The initial snapshot of a big table, into Kafka and into the archive, against COPY.

What runs (the local stack's PostgreSQL 15 and Kafka; a local folder as the archive):
- a fresh database with `weddings` (5,000, dated over the four tiers) and `guests` (R rows,
  default 5,000,000; `--quick` 200,000): a pgbench-sized row, about 120 bytes, with a
  wedding id the calendar classifies;
- **the reference**: `COPY guests TO '/dev/null'` on the server (`copy_rows_per_s`), and,
  beside it, `COPY (SELECT ...) TO STDOUT` read and discarded by a client
  (`copy_client_rows_per_s`);
- **into Kafka**: a child process runs `Capture` (the service's capture stage, its garbage
  collector tuned as `replicator run` does) on a new slot with `snapshot = "initial"`, from
  start to the moment every table's snapshot is recorded (every row acknowledged by Kafka):
  slot creation, the catalog, the COPY in the exported snapshot, conversion, tiering, Avro,
  aiokafka with acks=all. `snapshot_rows_per_s` = rows / that time; `peak_rss_mb` is that
  child's peak resident set;
- **into the archive**: then a second child runs the sinks for the local folder until the
  destination's checkpoint passes the snapshot (`archive_rows_per_s`, `archive_peak_rss_mb`):
  decode, merge, Avro OCF segments, compression, encryption, checkpoint.

`ratio_snapshot_vs_copy` = snapshot_rows_per_s / copy_rows_per_s. Targets (reported, not
asserted): ratio >= 0.3, peak RSS <= 512 MB at 5M rows.

    .venv/bin/python -m benchmarks.snapshot [--rows 5000000] [--quick] [--json]

`--json` prints one JSON object on the last line: `rows`, `snapshot_rows_per_s`,
`copy_rows_per_s`, `ratio_snapshot_vs_copy`, `peak_rss_mb`, and details beside them.
Everything it creates (database, slot, topics, archive folder) is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from benchmarks.capture import delete_topics
from benchmarks.common import postgres_and_kafka, print_result
from replicator.capture import Capture
from replicator.cli.run import tune_gc
from replicator.config import Config, DestinationConfig, FlushConfig, WeddingLink
from replicator.sink.service import Sinks
from tests.integration.archive_helpers import destination_checkpoint, sink_environ
from tests.integration.capture_helpers import make_config

WEDDINGS = 5_000
TARGETS = {"ratio_snapshot_vs_copy": 0.3, "peak_rss_mb": 512.0}
FLUSH = FlushConfig(critical_s=1.0, high_s=5.0, normal_s=10.0, low_s=15.0)

SCHEMA = """
CREATE TABLE weddings (id bigint PRIMARY KEY, couple text NOT NULL, wedding_date date NOT NULL);
CREATE TABLE guests (id bigint PRIMARY KEY, wedding_id bigint NOT NULL, name text NOT NULL,
                     rsvp text, balance integer NOT NULL, notes character(60));
"""
FILL = ["""
INSERT INTO weddings SELECT w, 'couple ' || w, current_date + (w %% 400)
  FROM generate_series(1, %(w)s) w
""", """
INSERT INTO guests SELECT g, g %% %(w)s + 1, 'guest ' || g,
       CASE g %% 3 WHEN 0 THEN 'yes' WHEN 1 THEN 'no' END, (g * 7) %% 100000, 'n'
  FROM generate_series(1, %(n)s) g
"""]


def config_for(dsn: str, bootstrap: str, prefix: str, slot: str, archive: Path) -> Config:
    config = make_config(dsn, bootstrap, prefix)
    return config.model_copy(update={
        "source": config.source.model_copy(update={"slot": slot, "publication": slot}),
        "priority": config.priority.model_copy(update={
            "tables": {"public.guests": WeddingLink(column="wedding_id")}}),
        "destinations": (DestinationConfig(name="local", url=f"file://{archive}",
                                           flush=FLUSH),)})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def child_capture(config: Config, tables: list[str]) -> dict[str, Any]:
    tune_gc()
    capture = Capture(config)
    started = time.perf_counter()
    cpu = time.process_time()
    task = asyncio.create_task(capture.run())
    try:
        while any(capture.state.snapshot_done(t) is None for t in tables):
            if task.done():
                task.result()
                raise RuntimeError("the capture returned before its snapshot was recorded")
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
        lsn = max(int(capture.state.snapshot_done(t) or 0) for t in tables)
        return {"seconds": seconds, "cpu_s": time.process_time() - cpu,
                "rows": capture.stats.snapshot_rows, "lsn": lsn, "peak_rss_mb": peak_rss_mb()}
    finally:
        capture.stop()
        await asyncio.wait_for(task, 120)


async def child_sinks(config: Config, lsn: int) -> dict[str, Any]:
    tune_gc()
    sinks = Sinks(config, sink_environ())
    await sinks.open()
    started = time.perf_counter()
    cpu = time.process_time()
    task = asyncio.create_task(sinks.run())
    dest = config.destinations[0]
    try:
        while await destination_checkpoint(dest.url, dest.name) <= lsn:
            if task.done():
                task.result()
                raise RuntimeError("the sinks returned before the snapshot was durable")
            await asyncio.sleep(0.2)
        return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
                "peak_rss_mb": peak_rss_mb()}
    finally:
        sinks.stop()
        await asyncio.wait_for(task, 120)


def child(stage: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one stage in its own process (its peak RSS is its own) and return its report."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.snapshot", "--child", stage,
                          json.dumps(spec)], capture_output=True, text=True,
                         env=sink_environ(), timeout=7200, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"the {stage} child failed:\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def copy_reference(dsn: str) -> tuple[float, float]:
    """Seconds of the server's COPY to /dev/null, and of a client reading COPY TO STDOUT."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM guests")  # warm the cache as the snapshot finds it
        started = time.perf_counter()
        conn.execute("COPY guests TO '/dev/null'")
        server = time.perf_counter() - started
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY (SELECT * FROM guests) TO STDOUT") as copy:
            for _ in copy:
                pass
        client = time.perf_counter() - started
    return server, client


async def run(rows: int, say: Any) -> dict[str, Any]:
    admin, bootstrap, name, work = await postgres_and_kafka("snap")
    archive = work / "archive"
    result: dict[str, Any] = {"rows": rows + WEDDINGS, "guests": rows, "weddings": WEDDINGS}
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        dsn = make_conninfo(admin, dbname=name)
        started = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
            for statement in FILL:
                conn.execute(statement, {"w": WEDDINGS, "n": rows})
            conn.execute("VACUUM ANALYZE")
            size = conn.execute("SELECT pg_total_relation_size('guests')").fetchone()
        result["table_mb"] = round((size[0] if size else 0) / 1e6, 1)
        say(f"database {name}: {rows:,} guests ({result['table_mb']:,.0f} MB) in "
            f"{time.perf_counter() - started:.0f} s")

        server, client = await asyncio.to_thread(copy_reference, dsn)
        result["copy_s"] = round(server, 3)
        result["copy_rows_per_s"] = round(rows / server)
        result["copy_client_s"] = round(client, 3)
        result["copy_client_rows_per_s"] = round(rows / client)
        say(f"COPY to /dev/null: {server:.2f} s ({rows / server:,.0f} rows/s); "
            f"a client reading COPY TO STDOUT: {client:.2f} s ({rows / client:,.0f} rows/s)")

        spec = {"dsn": dsn, "bootstrap": bootstrap, "prefix": name, "slot": name,
                "archive": str(archive), "tables": ["public.weddings", "public.guests"]}
        captured = await asyncio.to_thread(child, "capture", spec)
        seconds = captured["seconds"]
        result["snapshot_s"] = round(seconds, 2)
        result["snapshot_rows"] = captured["rows"]
        result["snapshot_rows_per_s"] = round(captured["rows"] / seconds)
        result["snapshot_cpu_us_per_row"] = round(captured["cpu_s"] / captured["rows"] * 1e6, 1)
        result["peak_rss_mb"] = round(captured["peak_rss_mb"], 1)
        say(f"snapshot into Kafka: {seconds:.1f} s ({result['snapshot_rows_per_s']:,} rows/s, "
            f"{result['snapshot_cpu_us_per_row']} us CPU per row), peak RSS "
            f"{result['peak_rss_mb']:,.0f} MB")

        archived = await asyncio.to_thread(child, "sinks", {**spec, "lsn": captured["lsn"]})
        result["archive_s"] = round(archived["seconds"], 2)
        result["archive_rows_per_s"] = round(captured["rows"] / archived["seconds"])
        result["archive_cpu_us_per_row"] = round(
            archived["cpu_s"] / captured["rows"] * 1e6, 1)
        result["archive_peak_rss_mb"] = round(archived["peak_rss_mb"], 1)
        say(f"into the archive (sinks, from Kafka): {archived['seconds']:.1f} s "
            f"({result['archive_rows_per_s']:,} rows/s), peak RSS "
            f"{result['archive_peak_rss_mb']:,.0f} MB")

        result["ratio_snapshot_vs_copy"] = round(
            result["snapshot_rows_per_s"] / result["copy_rows_per_s"], 3)
        result["ratio_snapshot_vs_copy_client"] = round(
            result["snapshot_rows_per_s"] / result["copy_client_rows_per_s"], 3)
        result["targets"] = TARGETS
        result["meets"] = {"ratio_snapshot_vs_copy": result["ratio_snapshot_vs_copy"] >= 0.3,
                           "peak_rss_mb": result["peak_rss_mb"] <= 512.0}
        return result
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE database = %s AND NOT active", (name,))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
        try:
            await delete_topics(bootstrap, name)
        except Exception as exc:  # the result stands; say what was left behind
            say(f"could not delete the topics of {name}: {exc}")
        shutil.rmtree(work, ignore_errors=True)


def run_child(stage: str, spec: dict[str, Any]) -> None:
    config = config_for(spec["dsn"], spec["bootstrap"], spec["prefix"], spec["slot"],
                        Path(spec["archive"]))
    if stage == "capture":
        report = asyncio.run(child_capture(config, list(spec["tables"])))
    else:
        report = asyncio.run(child_sinks(config, int(spec["lsn"])))
    print(json.dumps(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200,000 rows")
    parser.add_argument("--rows", type=int, default=None, help="guests (default 5,000,000)")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child[0], json.loads(args.child[1]))
        return 0
    rows = args.rows or (200_000 if args.quick else 5_000_000)

    def say(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    result = asyncio.run(run(rows, say))
    result["quick"] = args.quick
    print_result(result, args.json, ("rows", "snapshot_rows_per_s", "copy_rows_per_s",
                                     "ratio_snapshot_vs_copy", "peak_rss_mb",
                                     "archive_rows_per_s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
