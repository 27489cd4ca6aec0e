"""Incident response: impact over a window, rollback of one wedding in a live database under
load, against a wedding restore into an empty database.

What runs (the local stack's PostgreSQL 15 and Kafka; a local folder as the archive):
- a fresh database with `weddings` (W weddings, default 50,000, dated 2 to 700 days ahead),
  `guests` and `bookings` (two per wedding, with a vendor), R rows in all (default
  2,000,000); one wedding, in the middle of the id range, has 500 rows (480 guests, 20
  bookings), the others share the rest;
- `replicator run` (capture and sinks in one process) archives it: the initial snapshot, then
  the changes below, into `file://<work>/archive`;
- **impact**: C changes (default 10,000: updates of guests and bookings of random weddings,
  inserts, deletes, in transactions of 20) spread evenly over `--window-minutes` (default
  20, an incident's length: the sinks flush many segments in that time; `--quick`: 0, a
  burst as fast as one writer goes);
  once durable, `replicator impact --since <start> --until <end> --json` in a child process.
  `impact_s` is its own `seconds` (reading the archive's facts, the window's segments, the
  calendar and the vendor link as of the end), `impact_wall_s` the child's wall time with
  Python's start-up; `impact_objects_read` its `objects_read`;
- **rollback**: the 500-row wedding is damaged (a third of its guests deleted, its bookings'
  vendor rewritten); once durable, a 500 commits/s workload runs on 2,000 other weddings
  (`load_weddings`), and `replicator rollback --wedding <it> --at <before the damage>
  --to <live database> --json` runs under it in a child process: `rollback_s` is its own
  `seconds` (planning, the wedding restore into staging, the locked comparison, the
  emergency snapshot and audit record, the changes, the commit); on a Saturday the
  benchmark passes `--override-reason` (the wedding-day guard refuses any rollback then);
- **the reference**: `replicator replay --wedding <it> --at <the same point> --to <an empty
  database> --json`: `wedding_restore_s` is its own `seconds`;
  `ratio_rollback_vs_restore` = rollback_s / wedding_restore_s (target <= 1.5).
Both are run `--repeat` times (default 3: the same damage again, the rollback to the same
point; the reference into a new empty database each time) and the median is reported
(`rollback_runs_s`, `wedding_restore_runs_s` list every run; the first rollback also creates
the audit table). Checked, not assumed: the wedding's rows after each rollback equal its
rows before the damage (exit 1 otherwise); `other_weddings_changed` counts the weddings,
other than it and the workload's, whose rows (per-wedding hash of `t::text` over the three
tables) differ between just before and just after a rollback, summed over the runs: it must
be 0. Targets (reported, not asserted): impact < 3 s, rollback < 2 s, ratio <= 1.5.

    .venv/bin/python -m benchmarks.incident [--quick] [--window-minutes 20] [--repeat 3] [--json]

`--quick`: 5,000 weddings, 200,000 rows, 2,000 changes in a burst. `--json` prints one JSON
object on the last line: `impact_s`, `impact_objects_read`, `rollback_s`, `wedding_restore_s`,
`ratio_rollback_vs_restore`, `other_weddings_changed`, and details beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from benchmarks import rpo
from benchmarks.capture import delete_topics
from benchmarks.common import postgres_and_kafka, print_result
from benchmarks.soak import free_port
from connectors.registry import open_store
from replicator.archive.reader import checkpoint
from replicator.crypto import Keyring
from tests.integration.archive_helpers import sink_environ

REPLICATOR = str(Path(sys.executable).parent / "replicator")
WEDDING_ROWS = 500
LOAD_RATE = 500.0  # commits/s during the rollback
LOAD_WEDDINGS = 2_000
TARGETS = {"impact_s": 3.0, "rollback_s": 2.0, "ratio_rollback_vs_restore": 1.5}

SCHEMA = """
CREATE TABLE weddings (id bigint PRIMARY KEY, couple text NOT NULL, wedding_date date NOT NULL);
CREATE TABLE guests (id bigint PRIMARY KEY, wedding_id bigint NOT NULL REFERENCES weddings,
                     name text NOT NULL, rsvp text, notes text);
CREATE TABLE bookings (id bigint PRIMARY KEY, wedding_id bigint NOT NULL REFERENCES weddings,
                       vendor text NOT NULL, role text NOT NULL, price numeric(12,2));
"""
INDEXES = """
CREATE INDEX ON guests (wedding_id);
CREATE INDEX ON bookings (wedding_id);
"""
CALENDAR = """[priority]
[priority.tables."public.guests"]
column = "wedding_id"
[priority.tables."public.bookings"]
column = "wedding_id"
[impact]
vendors = { table = "public.bookings", column = "vendor", wedding_column = "wedding_id" }
"""


def config_text(dsn: str, bootstrap: str, name: str, port: int, archive: Path) -> str:
    flush = "".join(f"{tier}_s = {seconds}\n" for tier, seconds in rpo.QUICK_FLUSH.items())
    return (f'[source]\ndsn = "{dsn}"\nslot = "{name}"\npublication = "{name}"\n'
            'snapshot = "initial"\nheartbeat_interval_s = 1\n\n' + CALENDAR +
            f'\n[kafka]\nbootstrap_servers = "{bootstrap}"\ntopic_prefix = "{name}"\n'
            f'partitions = 2\n\n[metrics]\nlisten = "127.0.0.1:{port}"\n\n'
            f'[[destinations]]\nname = "local"\nurl = "file://{archive}"\n'
            f'[destinations.compaction]\nenabled = false\n'
            f'[destinations.flush]\n{flush}')


def setup(dsn: str, weddings: int, rows: int) -> int:
    """The database of the module docstring; returns the 500-row wedding's id."""
    special = weddings // 2
    guests = rows - 2 * weddings - (WEDDING_ROWS - 20)  # the others' guests
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("INSERT INTO weddings SELECT w, 'couple ' || w, current_date + 2 + "
                     "(w * 7919) %% 698 FROM generate_series(1, %s) w", (weddings,))
        others = weddings - 1
        conn.execute(
            "INSERT INTO guests SELECT g, CASE WHEN w >= %(s)s THEN w + 1 ELSE w END, "
            "'guest ' || g, 'yes', NULL FROM (SELECT g, 1 + (g - 1) %% %(o)s AS w "
            "FROM generate_series(1, %(n)s) g) x", {"s": special, "o": others, "n": guests})
        conn.execute("INSERT INTO guests SELECT %(n)s + g, %(s)s, 'guest ' || g, 'yes', NULL "
                     "FROM generate_series(1, %(k)s) g",
                     {"n": guests, "s": special, "k": WEDDING_ROWS - 20})
        conn.execute(
            "INSERT INTO bookings SELECT b, CASE WHEN w >= %(s)s THEN w + 1 ELSE w END, "
            "'vendor ' || (b %% 997), (ARRAY['venue','planner','photographer','florist'])"
            "[1 + b %% 4], 100 + b %% 5000 FROM (SELECT b, 1 + (b - 1) %% %(o)s AS w "
            "FROM generate_series(1, %(n)s) b) x",
            {"s": special, "o": others, "n": 2 * others})
        conn.execute("INSERT INTO bookings SELECT %(n)s + b, %(s)s, 'vendor ' || b, 'venue', 500 "
                     "FROM generate_series(1, 20) b", {"n": 2 * others, "s": special})
        conn.execute(INDEXES)
        conn.execute("VACUUM ANALYZE")
    return special


def moment(dsn: str) -> tuple[datetime, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT clock_timestamp(), pg_current_wal_lsn() - '0/0'").fetchone()
    assert row is not None
    return row[0], int(row[1])


async def durable(url: str, keyring: Keyring, lsn: int, within: float) -> float:
    """Wait until the archive's checkpoint passes *lsn*; the seconds it took."""
    started = time.monotonic()
    store = open_store(url, sink_environ())
    try:
        while True:
            with contextlib.suppress(Exception):
                if int(await checkpoint(store, "local", keyring=keyring)) > lsn:
                    return time.monotonic() - started
            if time.monotonic() - started > within:
                raise RuntimeError(f"the archive did not pass {lsn} within {within:.0f} s")
            await asyncio.sleep(1)
    finally:
        await store.close()


def burst(dsn: str, weddings: int, changes: int, special: int, window_s: float = 0.0) -> int:
    """C changes in transactions of 20 over random weddings (not the 500-row one), spread
    evenly over *window_s* seconds (0: as fast as one writer goes)."""
    rng = random.Random(12)
    done, next_id = 0, 10**9
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while done < changes:
            ahead = started + window_s * done / changes - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            with conn.transaction():
                for _ in range(20):
                    w = rng.randrange(1, weddings + 1)
                    if w == special:
                        continue
                    kind = rng.random()
                    if kind < 0.6:
                        conn.execute("UPDATE guests SET rsvp = %s WHERE id = (SELECT min(id) "
                                     "FROM guests WHERE wedding_id = %s)",
                                     (rng.choice(["yes", "no", "maybe"]), w))
                    elif kind < 0.8:
                        conn.execute("UPDATE bookings SET price = price + 1 WHERE id = "
                                     "(SELECT min(id) FROM bookings WHERE wedding_id = %s)", (w,))
                    elif kind < 0.95:
                        next_id += 1
                        conn.execute("INSERT INTO guests VALUES (%s, %s, 'late', 'yes', NULL)",
                                     (next_id, w))
                    else:
                        conn.execute("DELETE FROM guests WHERE id = (SELECT max(id) FROM "
                                     "guests WHERE wedding_id = %s)", (w,))
                    done += 1
    return done


def wedding_state(dsn: str, wedding: int) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT 'w' || t::text FROM weddings t WHERE id = %(w)s UNION ALL "
            "SELECT 'g' || t::text FROM guests t WHERE wedding_id = %(w)s UNION ALL "
            "SELECT 'b' || t::text FROM bookings t WHERE wedding_id = %(w)s ORDER BY 1",
            {"w": wedding})]


def wedding_hashes(dsn: str) -> dict[int, tuple[int, int, int]]:
    with psycopg.connect(dsn) as conn:
        out: dict[int, list[int]] = {}
        for n, query in enumerate((
                "SELECT id, hashtext(t::text)::bigint FROM weddings t",
                "SELECT wedding_id, sum(hashtext(t::text)::bigint) FROM guests t GROUP BY 1",
                "SELECT wedding_id, sum(hashtext(t::text)::bigint) FROM bookings t GROUP BY 1")):
            for wedding, value in conn.execute(query):
                out.setdefault(int(wedding), [0, 0, 0])[n] = int(value)
    return {w: (v[0], v[1], v[2]) for w, v in out.items()}


async def load(dsn: str, weddings: list[int], rate: float, stop: asyncio.Event) -> int:
    """About *rate* commits/s, each renaming one guest of one of *weddings*."""
    rng, done = random.Random(5), 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        started = time.monotonic()
        while not stop.is_set():
            await conn.execute("UPDATE guests SET name = name || '.' WHERE id = (SELECT min(id) "
                               "FROM guests WHERE wedding_id = %s)", (rng.choice(weddings),))
            done += 1
            ahead = done / rate - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
    return done


def child(*args: str) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    done = subprocess.run([REPLICATOR, *args], env=sink_environ(), capture_output=True,
                          text=True, timeout=1800, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"replicator {args[0]} exited {done.returncode}: "
                           f"{done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


async def run(weddings: int, rows: int, changes: int, window_minutes: float, say: Any,
              repeat: int = 3, keep: Path | None = None) -> dict[str, Any]:
    admin, bootstrap, name, work = await postgres_and_kafka("inc")
    archive = work / "archive"
    url = f"file://{archive}"
    keyring = Keyring.from_env(sink_environ())
    restore_db = name + "_restore"
    service: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"weddings": weddings, "rows": rows, "changes": changes}
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(restore_db)))
        dsn = make_conninfo(admin, dbname=name)
        started = time.perf_counter()
        special = await asyncio.to_thread(setup, dsn, weddings, rows)
        say(f"database {name}: {weddings:,} weddings, {rows:,} rows in "
            f"{time.perf_counter() - started:.0f} s; wedding {special} has {WEDDING_ROWS} rows")
        config = work / "service.toml"
        config.write_text(config_text(dsn, bootstrap, name, free_port(), archive))
        (work / "calendar.toml").write_text(CALENDAR)
        with (work / "service.log").open("ab") as out:
            service = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, not awaited
                [REPLICATOR, "run", "--config", str(config)],
                env=sink_environ(), stdout=out, stderr=out)
        await asyncio.sleep(5)
        with psycopg.connect(dsn, autocommit=True) as conn:  # a commit after the snapshot
            conn.execute("UPDATE weddings SET couple = couple WHERE id = 1")
        _, marker = moment(dsn)
        result["snapshot_archived_s"] = round(await durable(url, keyring, marker, 3600), 1)
        say(f"initial snapshot archived in {result['snapshot_archived_s']:.0f} s")

        # Impact over a burst of changes.
        since, _ = moment(dsn)
        await asyncio.sleep(0.05)
        result["window_changes"] = await asyncio.to_thread(burst, dsn, weddings, changes,
                                                           special, window_minutes * 60)
        await asyncio.sleep(0.05)
        until, after = moment(dsn)
        result["window_s"] = round((until - since).total_seconds(), 1)
        await durable(url, keyring, after, 600)
        report, wall = child("impact", "--from", url, "--since", since.isoformat(),
                             "--until", until.isoformat(), "--config",
                             str(work / "calendar.toml"), "--json")
        result["impact_s"] = round(float(report.get("seconds") or wall), 3)
        result["impact_wall_s"] = round(wall, 3)
        result["impact_objects_read"] = report.get("objects_read")
        result["impact_steps_s"] = report.get("steps_s", {})
        result["impact_weddings"] = len(report.get("weddings") or [])
        say(f"impact: {result['impact_weddings']} weddings, {result['impact_objects_read']} "
            f"objects, {result['impact_s']:.2f} s ({wall:.2f} s with start-up)")

        # Rollback of the 500-row wedding under load, `repeat` times: each time the same
        # damage, then the rollback to the same point (before the first damage).
        good = wedding_state(dsn, special)
        await asyncio.sleep(1.1)
        point, _ = moment(dsn)
        result["rollback_wedding"], result["rollback_point"] = special, point.isoformat()
        await asyncio.sleep(1.1)
        busy = [w for w in range(1, weddings + 1) if w != special][:LOAD_WEDDINGS]
        runs: list[dict[str, Any]] = []
        result["other_weddings_changed"] = 0
        result["rollback_correct"] = True
        result["load_commits"] = 0
        for _ in range(repeat):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM guests WHERE id IN (SELECT id FROM guests WHERE "
                             "wedding_id = %s ORDER BY id LIMIT 160)", (special,))
                conn.execute("UPDATE bookings SET vendor = 'Wrong Vendor Ltd' "
                             "WHERE wedding_id = %s", (special,))
            _, damaged = moment(dsn)
            await durable(url, keyring, damaged, 600)
            stop = asyncio.Event()
            writer = asyncio.create_task(load(dsn, busy, LOAD_RATE, stop))
            await asyncio.sleep(3)
            before = await asyncio.to_thread(wedding_hashes, dsn)
            saturday = datetime.now(UTC).isoweekday() == 6
            report, wall = await asyncio.to_thread(
                child, "rollback", "--from", url, "--wedding", str(special), "--at",
                point.isoformat(), "--to", dsn, "--reason", "benchmark: bad deploy",
                "--config", str(work / "calendar.toml"), "--json",
                *(["--override-reason", "benchmark on a Saturday"] if saturday else []))
            after_hashes = await asyncio.to_thread(wedding_hashes, dsn)
            stop.set()
            load_commits = await writer
            runs.append({"s": float(report["seconds"]), "wall": wall,
                         "steps": report.get("steps_s", {}), "rows": report["rows"]})
            result["load_commits"] += load_commits
            quiet = set(before) - set(busy) - {special}
            result["other_weddings_changed"] += sum(
                1 for w in quiet if before.get(w) != after_hashes.get(w))
            result["rollback_correct"] &= wedding_state(dsn, special) == good
            say(f"rollback: {runs[-1]['s']:.2f} s ({wall:.2f} s with start-up), "
                f"{load_commits} workload commits meanwhile")
        middle = sorted(runs, key=lambda r: r["s"])[len(runs) // 2]
        result["rollback_s"] = round(middle["s"], 3)
        result["rollback_runs_s"] = [round(r["s"], 3) for r in runs]
        result["rollback_steps_s"] = middle["steps"]
        result["rollback_wall_s"] = round(middle["wall"], 3)
        result["rollback_rows"] = middle["rows"]

        # The reference, `repeat` times, each into a new empty database.
        restores: list[tuple[float, float, int]] = []
        for n in range(repeat):
            if n:
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                        sql.Identifier(restore_db)))
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(
                        sql.Identifier(restore_db)))
            report, wall = await asyncio.to_thread(
                child, "replay", "--from", url, "--at", point.isoformat(), "--wedding",
                str(special), "--to", make_conninfo(admin, dbname=restore_db), "--json")
            restores.append((float(report["seconds"]), wall, int(report["rows"])))
        seconds, wall, restored = sorted(restores)[len(restores) // 2]
        result["wedding_restore_s"] = round(seconds, 3)
        result["wedding_restore_runs_s"] = [round(r[0], 3) for r in restores]
        result["wedding_restore_wall_s"] = round(wall, 3)
        result["wedding_restore_rows"] = restored
        result["repeat"] = repeat
        result["ratio_rollback_vs_restore"] = round(
            result["rollback_s"] / max(result["wedding_restore_s"], 1e-9), 2)
        result["targets"] = TARGETS
        result["meets"] = {k: result[k] <= v for k, v in TARGETS.items()}
        return result
    finally:
        if service is not None and service.poll() is None:
            service.terminate()
            try:
                service.wait(60)
            except subprocess.TimeoutExpired:
                service.kill()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE database = %s AND NOT active", (name,))
            for db in (name, restore_db):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(db)))
        with contextlib.suppress(Exception):
            await delete_topics(bootstrap, name)
        if keep is not None and archive.exists():
            shutil.copytree(archive, keep / "archive", dirs_exist_ok=True)
            (keep / "incident.json").write_text(json.dumps(result, sort_keys=True, default=str))
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="5,000 weddings, 200,000 rows, 2,000 changes")
    parser.add_argument("--weddings", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--changes", type=int, default=None)
    parser.add_argument("--window-minutes", type=float, default=None,
                        help="spread the changes over this long (default 20; --quick 0: a burst)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rollbacks and reference restores to take the median of")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the archive and the result into this folder, to study the "
                             "restores again without building the archive")
    args = parser.parse_args()
    window = args.window_minutes if args.window_minutes is not None else (
        0.0 if args.quick else 20.0)
    weddings = args.weddings or (5_000 if args.quick else 50_000)
    rows = args.rows or (200_000 if args.quick else 2_000_000)
    changes = args.changes or (2_000 if args.quick else 10_000)

    def say(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    result = asyncio.run(run(weddings, rows, changes, window, say, max(1, args.repeat), args.keep))
    result["quick"] = args.quick
    print_result(result, args.json, ("impact_s", "impact_objects_read", "rollback_s",
                                     "wedding_restore_s", "ratio_rollback_vs_restore",
                                     "other_weddings_changed"))
    ok = result["rollback_correct"] and result["other_weddings_changed"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
