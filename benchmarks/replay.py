"""Replay of a large archive into an empty database, against a plain COPY of the same rows.

Archive (built once per parameter set and cached under /tmp/wedsync-bench-replay/<hash>/; the
build is not timed with the rest, its duration is reported): a table shaped like the
product's `public.guests` (bigint id PK, wedding_id, name, email, dietary jsonb, notes, rsvp,
updated_at timestamptz) and its wedding calendar `public.weddings` (bigint id PK, couple text,
wedding_date date), written the way a busy sink writes them, straight into a local folder
store (`file://`), without Kafka or capture:
- the initial snapshot: W weddings x 100 guests (default 20,000 x 100 = 2,000,000 rows),
  guests entered wedding by wedding (ids grouped by wedding), op `r` at the snapshot LSN with
  seq 0..N-1, in flushes of 50,000 records (the sink's `max_rows`), each written as one
  segment per wedding tier (the sink buffers per tier and table; tiers: 2 % of weddings
  critical, 4 % high, 10 % normal, the rest low), holding only snapshot rows, whose headers
  list their wedding ids; and the snapshot's boundary transaction record (xid 0, end LSN =
  LSN - 1, counts {table: N}), as `capture.snapshot_record` makes it;
- in the same snapshot, the calendar: one row per wedding (op `r` at the snapshot LSN, seq
  N..N+W-1), each filed under its own id as its wedding and under that wedding's tier, in
  its own flushes (a part per tier, headers listing the wedding ids), its schema document,
  and its own boundary record (counts {public.weddings: W}; the capture sends one per
  table). A wedding's date is the build day plus some days of its tier's range (critical
  1-6, high 10-29, normal 35-85, low 120-700), so the calendar gives every wedding the tier
  its rows were archived under. The build day (UTC) is in the cache key: the archive is
  rebuilt on another day (dates a day old still give the same tiers, so a run across
  midnight is fine). The calendar never changes after the snapshot;
- then C changes (default 400,000) in transactions of 100-1000 changes each: 70 % updates of
  a random live guest (a third of them leave the TOASTed `notes` unchanged: absent from
  `after`, named in `unchanged`), 20 % deletes (before image = the key only, as under the
  default replica identity, so no wedding id), 10 % inserts of new guests into random
  weddings (deletes carry no wedding, so the capture files them under the default tier,
  low); flushes of about 50,000 changes (whole transactions), a segment per tier each, one
  transaction segment per flush, the table's schema object, and the destination's checkpoint
  (the last transaction's end LSN).
Every object is encrypted as the sink does (`crypto.encrypt`, a benchmark key). Segments are
built in worker processes (2 on this machine) with `encode_record_segment`, from envelope
records made directly as dicts in the form `EventCodec.decode_event` returns (what a sink
writes).
The expected final rows are computed from the same generator and rendered as COPY text
(`floor.copy` and `weddings.copy` in the cache directory). `segments` counts the calendar's
objects too (one part per tier).

Measurement, into fresh databases on the local PostgreSQL 15 (dropped at the end):
- **COPY floor**: the final guests' COPY text, read into memory beforehand; timed: `CREATE
  TABLE` (the archived schema's columns), `COPY ... FROM STDIN` (text format, 8 MiB writes),
  `ALTER TABLE ... ADD PRIMARY KEY`, `COMMIT`, which is what replay does into Postgres. The
  floor is the guests only: the calendar is then copied into the same database, untimed, to
  check the replays' calendars against. Every replay restores both tables, so its time also
  holds the calendar's W rows (1 % of the guests' rows by default, in a few objects): the
  ratios to the floor are about the guests, and the calendar's share is within the noise.
- **the archive as the service keeps it**: a copy of the archive (hard links) compacted by
  `replicator compact --at <point>` (child process; its time is reported as `compact_s`) at
  the last commit that leaves *tail* changes after it. The default *tail* is the most the
  service's default compaction policy (`CompactionConfig`: a table is compacted once it has
  `max(min_changes, min_changes_ratio x rows)` changes since its snapshot) lets pile up
  before its next run: 40,000 changes for 2,000,000 rows (10,000 with `--quick`); the point
  is an arbitrary commit, inside a segment, as it would be for a restore between runs.
- **replay**: `replicator replay --from file://<compacted copy> --at latest --to <dsn>
  --json` in a child process (its own summary: `seconds` covers reading the archive's facts,
  planning, creating, loading, the key and the commit; the process's wall time, start-up
  included, is shown too; peak RSS is the child's own, sampled). It reads the snapshot and
  the *tail* changes. Result: `ratio_replay_vs_copy` = replay seconds / COPY seconds
  (target <= 2.0, reported, not asserted).
- **tiered**: `replicator replay --from file://<compacted copy> --at latest --to <dsn> --tiered
  --config <file> --json` (child process; the file is `[priority]` with its defaults and the
  link `[priority.tables."public.guests"] column = "wedding_id"`; the restore itself reads
  each record's archived wedding id): the critical weddings' rows (guests and calendar)
  committed first, then high, normal, then every table whole. Results: `critical_usable_s`
  (the summary's: when the critical weddings became usable, since the restore started),
  `tiered_s` (its `seconds`, all steps), `ratio_critical_vs_replay` = critical_usable_s /
  the plain replay's seconds of the same archive (the whole restore), and `tiered_steps` (its
  steps as it reports them).
- also: the same replay of the **uncompacted** archive (the first snapshot and every change:
  `ratio_uncompacted_vs_copy`), and, after a second compaction at the latest point (from the
  first snapshot and the tail: `compact_latest_s`), a replay that reads **only a snapshot**
  (`ratio_at_snapshot_vs_copy`).
- **one wedding**: `replicator replay ... --wedding <id>` from the compacted copy (and from
  the uncompacted archive) into other fresh databases (target < 2 s), a low-tier wedding
  from the middle of the id range; it restores the wedding's guests and its calendar row, so
  it also reads the calendar's objects that may hold the wedding (from the compacted copy,
  the calendar's compaction snapshot: compaction rewrites every table): `wedding_restore_s`
  includes them and `wedding_objects_read` counts them (2 more than the guests' alone by
  default); `wedding_rows` is the wedding's guests, as before.
A CHECKPOINT runs before each timed part. Correctness is checked, not assumed: each replay's
guests and calendar `count(*)` and `sum(hashtext(t::text))` must equal the COPY database's
(for the wedding: those of its rows there), and the row counts it reports must match; the
tiered restore's steps must be the critical, high and normal weddings of `tier_of` with
exactly their rows in both tables, then every row. The benchmark fails (exit 1) otherwise.

`--profile FILE` then replays once more in this process under cProfile (into another fresh
database) and prints the top functions by own time and by cumulative time.

    .venv/bin/python -m benchmarks.replay [--quick] [--json] [--profile FILE] [--rebuild]
        [--weddings 20000] [--changes 400000] [--tail N]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import cProfile
import hashlib
import json
import math
import multiprocessing
import os
import pstats
import random
import resource
import shutil
import subprocess
import sys
import time
import uuid
from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from replicator import __version__
from replicator.config import CompactionConfig
from replicator.position import Lsn

CACHE_ROOT = Path("/tmp/wedsync-bench-replay")
BUILD_FORMAT = 6  # bump when the generator changes: a new cache directory (6: the calendar)
ADMIN_DSN = "postgresql://postgres@127.0.0.1:15432/postgres"
TABLE = "public.guests"
WEDDINGS = "public.weddings"  # the wedding calendar ([priority]'s default table and columns)
DESTINATION = "bench"
KEY_NAME = "BENCH"
KEY = hashlib.sha256(b"wedsync-bench-replay").digest()  # a dev key, 32 bytes
SEGMENT_ROWS = 50_000  # the sink's default max_rows: records per segment
GUESTS_PER_WEDDING = 100
TX_MIN, TX_MAX = 100, 1000  # changes per transaction
P_UPDATE, P_DELETE = 0.70, 0.20  # the rest are inserts
P_TOAST = 1 / 3  # updates that leave `notes` unchanged (TOAST)
COPY_CHUNK = 8 << 20
TARGET_RATIO = 2.0
TARGET_WEDDING_S = 2.0
SNAPSHOT_LSN = 0x1_0000_0000  # 1/0
T0_US = int(datetime(2025, 6, 1, 9, 0, tzinfo=UTC).timestamp()) * 1_000_000
TX_INTERVAL_US = 250_000
PROJECT_ROOT = Path(__file__).resolve().parents[1]

COLUMNS = (  # name, SQL type, type OID, NOT NULL
    ("id", "bigint", 20, True),
    ("wedding_id", "bigint", 20, True),
    ("name", "text", 25, True),
    ("email", "text", 25, False),
    ("dietary", "jsonb", 3802, False),
    ("notes", "text", 25, False),
    ("rsvp", "boolean", 16, False),
    ("updated_at", "timestamp with time zone", 1184, True),
)
WEDDING_COLUMNS = (
    ("id", "bigint", 20, True),
    ("couple", "text", 25, True),
    ("wedding_date", "date", 1082, True),
)
# Days from the build day to a wedding's date, by its tier (`tier_of`), inclusive: far enough
# from the thresholds (7, 30, 90 days) that the tier holds for a day or two after the build.
DAYS_AHEAD = {"critical": (1, 6), "high": (10, 29), "normal": (35, 85), "low": (120, 700)}
# What a tiered restore reads the calendar with (the [priority] defaults, and the link that
# says guests belong to weddings, which the capture would need to file them).
PRIORITY_TOML = """[priority]
weddings_table = "public.weddings"
wedding_id_column = "id"
wedding_date_column = "wedding_date"

[priority.tables."public.guests"]
column = "wedding_id"
"""
_N = "com.wedsync.replicator."
JSON_RECORD, TSTZ_RECORD, DATE_RECORD = f"{_N}Json", f"{_N}TimestampTz", f"{_N}Date"
NOTES = (
    "Plus-one confirmed; seat near the dance floor, away from the speakers.",
    "Travelling from Lisbon, arrives the day before. Needs a taxi from the station at 14:30.",
    "Bridesmaid. Hair and make-up at 8am; bring the bouquet ribbons.",
    "Café owner, wants the espresso cart details.\nSecond line: allergic to lilies.",
    "Old school friend of the groom",
    "Wheelchair access needed at the ceremony and the reception; table by the door, "
    "close to the accessible bathroom, and a ramp at the marquee entrance.",
    "Vegetarian main, no mushrooms. Toast at 19:10 (2 min max!)",
    "Kids: 2 (ages 4 and 7) — children's menu, high chair for the little one.",
)
DIETARY = (
    '{"vegan": false}',
    '{"table": %d, "vegan": true}',
    '{"table": %d, "vegan": false, "allergies": ["nuts", "shellfish"]}',
    '{"table": %d, "kosher": true}',
)
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_EPOCH = datetime(1970, 1, 1)
_EPOCH_DAY = date(1970, 1, 1)
COUPLES = ("Ana", "Ben", "Chloé", "Dev", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jo", "Kai",
           "Lea", "Mo", "Noor", "Olu", "Pia", "Quinn", "Rafa", "Sol", "Tomás")


@dataclass(frozen=True)
class Params:
    weddings: int
    changes: int
    day: str  # the build's day (UTC, ISO): the weddings' dates count from it
    seed: int = 7
    segment_rows: int = SEGMENT_ROWS
    format: int = BUILD_FORMAT

    @property
    def snapshot_rows(self) -> int:
        return self.weddings * GUESTS_PER_WEDDING

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# --- the rows (one generator for the archive and for the COPY floor) --------------------------


def tx_time(k: int) -> int:
    """Commit time of change transaction k (1, 2, ...); the snapshot's is T0."""
    return T0_US + k * TX_INTERVAL_US


def row_values(id_: int, wedding: int, ver: int, nver: int) -> tuple[Any, ...]:
    """The row of guest *id_* whose last update was transaction *ver* (0: the snapshot's row)
    and whose notes were last written by transaction *nver*: Python values, in column order
    (timestamps as microseconds since the epoch)."""
    name = f"Guest {id_}" if ver == 0 else f"Guest {id_} (rev {ver})"
    if id_ % 17 == 0:
        email = None
    elif ver == 0:
        email = f"guest{id_}@example.com"
    else:
        email = f"guest{id_}.r{ver}@example.org"
    kind = (id_ + ver) % (len(DIETARY) + 1)
    if kind == len(DIETARY):
        dietary = None
    else:
        dietary = DIETARY[kind] if kind == 0 else DIETARY[kind] % ((id_ + ver) % 40 + 1)
    notes = None if (id_ + nver) % 11 == 0 else f"{NOTES[(id_ * 31 + nver) % len(NOTES)]} #{nver}"
    rsvp = None if ver == 0 and id_ % 3 == 0 else (id_ + ver) % 4 != 0
    updated = T0_US - (id_ % 500_000) * 1_000_003 if ver == 0 else tx_time(ver)
    return id_, wedding, name, email, dietary, notes, rsvp, updated


def tier_of(wedding: int) -> str:
    """A wedding's tier (how close its date is): most are far away."""
    k = wedding % 50
    return "critical" if k == 0 else "high" if k <= 2 else "normal" if k <= 7 else "low"


def wedding_values(wedding: int, day: date) -> tuple[int, str, date]:
    """The calendar's row of *wedding*: its date is the build *day* plus some days of its tier's
    range (`DAYS_AHEAD`), so the calendar gives it the tier `tier_of` says on that day."""
    low, high = DAYS_AHEAD[tier_of(wedding)]
    ahead = low + (wedding * 7919) % (high - low + 1)
    couple = (f"{COUPLES[wedding % len(COUPLES)]} & "
              f"{COUPLES[(wedding * 7 + 3) % len(COUPLES)]} #{wedding}")
    return wedding, couple, day + timedelta(days=ahead)


def wedding_datum(values: tuple[int, str, date]) -> dict[str, Any]:
    """The calendar row's `after` map, as `EventCodec.decode_event` returns it."""
    id_, couple, day = values
    return {"id": id_, "couple": couple,
            "wedding_date": (DATE_RECORD, {"days": (day - _EPOCH_DAY).days})}


def wedding_copy_text(values: tuple[int, str, date]) -> str:
    id_, couple, day = values
    return f"{id_}\t{couple.translate(_COPY_ESCAPES)}\t{day.isoformat()}\n"


def datum_row(values: tuple[Any, ...], with_notes: bool = True) -> dict[str, Any]:
    """The envelope's `after` map of a row as `EventCodec.decode_event` returns it (what a sink
    writes): primitives bare, logical types as `(record name, fields)`."""
    id_, wedding, name, email, dietary, notes, rsvp, updated = values
    row: dict[str, Any] = {
        "id": id_,
        "wedding_id": wedding,
        "name": name,
        "email": email,
        "dietary": None if dietary is None else (JSON_RECORD, {"text": dietary}),
    }
    if with_notes:
        row["notes"] = notes
    row["rsvp"] = rsvp
    row["updated_at"] = (TSTZ_RECORD, {"micros": updated})
    return row


def copy_text(values: tuple[Any, ...]) -> str:
    """The row as a line of COPY's text format (rendered independently of replay's code)."""
    id_, wedding, name, email, dietary, notes, rsvp, updated = values
    fields = [
        str(id_), str(wedding), name.translate(_COPY_ESCAPES),
        "\\N" if email is None else email.translate(_COPY_ESCAPES),
        "\\N" if dietary is None else dietary.translate(_COPY_ESCAPES),
        "\\N" if notes is None else notes.translate(_COPY_ESCAPES),
        "\\N" if rsvp is None else ("t" if rsvp else "f"),
        (_EPOCH + timedelta(microseconds=updated)).isoformat(" ") + "+00",
    ]
    return "\t".join(fields) + "\n"


def record(op: str, id_: int, after: dict[str, Any] | None, before: dict[str, Any] | None,
           unchanged: list[str], lsn: int, xid: int, ts_us: int, seq: int, tier: str,
           wedding: int | None, table: str = TABLE) -> dict[str, Any]:
    """One envelope record, as `EventCodec.decode_event` returns it (`encode_record_segment`
    writes these)."""
    schema, name = table.split(".")
    return {
        "before": before,
        "after": after,
        "key": {"id": id_},
        "unchanged": unchanged,
        "op": op,
        "ts_ms": ts_us // 1000 + 40,
        "source": {
            "version": __version__, "connector": "wedsync-replicator", "name": "bench",
            "db": "wedsync", "schema": schema, "table": name, "lsn": lsn, "txId": xid,
            "ts_ms": ts_us // 1000, "ts_us": ts_us, "seq": seq, "origin": None,
        },
        "priority": tier,
        "wedding_id": None if wedding is None else str(wedding),
    }


# --- the change plan ----------------------------------------------------------------------------

# One change: (op, id, wedding, ver, nver, toast); a delete carries wedding 0.
Change = tuple[str, int, int, int, int, bool]


@dataclass
class Tx:
    k: int
    commit_lsn: int
    end_lsn: int
    xid: int
    ts_us: int
    changes: list[Change]


@dataclass
class Plan:
    txs: list[Tx]
    ver: array[int]  # by id: last update's transaction (0: snapshot row); -1: deleted
    nver: array[int]
    wedding_of: dict[int, int]  # inserted guests' weddings
    max_id: int

    def wedding(self, id_: int) -> int:
        return self.wedding_of.get(id_) or (id_ - 1) // GUESTS_PER_WEDDING + 1


def make_plan(p: Params) -> Plan:
    rng = random.Random(p.seed)
    n = p.snapshot_rows
    capacity = n + p.changes + 1
    ver = array("q", bytes(8 * capacity))
    nver = array("q", bytes(8 * capacity))
    live = list(range(1, n + 1))
    where = array("q", bytes(8 * capacity))  # where[id] = index of id in live
    where[1:n + 1] = array("q", range(n))
    wedding_of: dict[int, int] = {}
    next_id = n + 1
    txs: list[Tx] = []
    lsn = SNAPSHOT_LSN + 0x20000
    xid = 10_000
    done = 0
    k = 0
    while done < p.changes:
        k += 1
        size = min(rng.randint(TX_MIN, TX_MAX), p.changes - done)
        changes: list[Change] = []
        for _ in range(size):
            r = rng.random()
            if r < P_UPDATE + P_DELETE and live:
                i = rng.randrange(len(live))
                id_ = live[i]
                if r < P_UPDATE:
                    toast = rng.random() < P_TOAST
                    ver[id_] = k
                    if not toast:
                        nver[id_] = k
                    wedding = wedding_of.get(id_) or (id_ - 1) // GUESTS_PER_WEDDING + 1
                    changes.append(("u", id_, wedding, k, int(nver[id_]), toast))
                else:
                    last = live.pop()
                    if last != id_:
                        live[i] = last
                        where[last] = i
                    ver[id_] = -1
                    changes.append(("d", id_, 0, 0, 0, False))
            else:
                id_ = next_id
                next_id += 1
                wedding_of[id_] = rng.randint(1, p.weddings)
                ver[id_] = nver[id_] = k
                where[id_] = len(live)
                live.append(id_)
                changes.append(("c", id_, wedding_of[id_], k, k, False))
        commit = lsn + size * 180 + 0x200
        txs.append(Tx(k, commit, commit + 0x38, xid, tx_time(k), changes))
        lsn = commit + 0x38 + rng.randrange(0, 0x400)
        xid += 1 + rng.randrange(3)
        done += size
    return Plan(txs, ver, nver, wedding_of, next_id - 1)


# --- building the archive -------------------------------------------------------------------


def _keyring() -> Any:
    from replicator.crypto import Keyring

    return Keyring({KEY_NAME: KEY}, active=KEY_NAME)


async def _put(root: Path, key: str, data: bytes, encrypted: bool = True) -> int:
    from connectors.errors import AlreadyExists
    from connectors.local import LocalStore
    from replicator.crypto import encrypt

    sealed = encrypt(data, key, _keyring()) if encrypted else data
    store = LocalStore(root)
    try:
        await store.put(key, sealed)
    except AlreadyExists:
        pass
    finally:
        await store.close()
    return len(sealed)


def _write_segments(root: Path, records: list[dict[str, Any]], table: str = TABLE
                    ) -> list[tuple[str, int, int]]:
    """One flush of the sink for *table*: per tier (it buffers per tier and table), the
    snapshot rows of one LSN as a part and the rest as a segment
    (`SinkWorker._write_segment`)."""
    from replicator.archive.layout import part_key, segment_key
    from replicator.archive.part import encode_part, partable
    from replicator.archive.segment import encode_record_segment

    by_tier: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_tier.setdefault(r["priority"], []).append(r)
    written = []
    for tier, tier_records in by_tier.items():
        snapshot = [r for r in tier_records if r["op"] == "r"]
        if snapshot and partable(snapshot):
            data, part = encode_part(snapshot, table=table, tier=tier)
            digest = hashlib.sha256(data).hexdigest()[:16]
            key = part_key(table, part.lsn, part.first_seq, part.last_seq, digest)
            written.append((key, part.rows, asyncio.run(_put(root, key, data))))
            tier_records = [r for r in tier_records if r["op"] != "r"]
            if not tier_records:
                continue
        data, header = encode_record_segment(tier_records, table=table, codec="zstd")
        digest = hashlib.sha256(data).hexdigest()[:16]
        key = segment_key(table, header.first.commit_lsn, header.last.commit_lsn, digest)
        written.append((key, header.rows, asyncio.run(_put(root, key, data))))
    return written


def build_snapshot_segment(root: str, first: int, last: int) -> list[tuple[str, int, int]]:
    """Snapshot rows seq first..last (ids first+1..last+1), in a worker process."""
    ts = T0_US
    records = []
    for seq in range(first, last + 1):
        id_ = seq + 1
        wedding = seq // GUESTS_PER_WEDDING + 1
        after = datum_row(row_values(id_, wedding, 0, 0))
        records.append(record("r", id_, after, None, [], SNAPSHOT_LSN, 0, ts, seq,
                              tier_of(wedding), wedding))
    return _write_segments(Path(root), records)


def build_weddings_segment(root: str, first: int, last: int, day: str, seq0: int
                           ) -> list[tuple[str, int, int]]:
    """The calendar's snapshot rows, weddings first+1..last+1, at seq seq0 + first.., in a
    worker process; each row's wedding is its own id (as the capture files the weddings
    table's rows)."""
    build_day = date.fromisoformat(day)
    records = []
    for i in range(first, last + 1):
        wedding = i + 1
        after = wedding_datum(wedding_values(wedding, build_day))
        records.append(record("r", wedding, after, None, [], SNAPSHOT_LSN, 0, T0_US, seq0 + i,
                              tier_of(wedding), wedding, table=WEDDINGS))
    return _write_segments(Path(root), records, WEDDINGS)


def build_change_segment(root: str, txs: list[tuple[int, int, int, list[Change]]]
                         ) -> list[tuple[str, int, int]]:
    """The changes of whole transactions (commit LSN, xid, commit time, changes)."""
    records = []
    for lsn, xid, ts, changes in txs:
        for seq, (op, id_, wedding, ver, nver, toast) in enumerate(changes):
            if op == "d":
                records.append(record("d", id_, None, {"id": id_}, [], lsn, xid, ts,
                                      seq, "low", None))
                continue
            after = datum_row(row_values(id_, wedding, ver, nver), with_notes=not toast)
            records.append(record(op, id_, after, None, ["notes"] if toast else [], lsn, xid,
                                  ts, seq, tier_of(wedding), wedding))
    return _write_segments(Path(root), records)


def _transaction_datum(commit_lsn: int, end_lsn: int, ts: int, xid: int,
                       counts: dict[str, int], tiers: dict[str, int]) -> dict[str, Any]:
    return {"commit_lsn": commit_lsn, "end_lsn": end_lsn, "commit_ts_us": ts, "xid": xid,
            "origin": None, "counts": counts, "total": sum(counts.values()),
            "tier_counts": tiers}


def _write_transactions(root: Path, datums: list[dict[str, Any]]) -> tuple[str, int]:
    from replicator.archive.layout import transactions_key
    from replicator.archive.segment import encode_transaction_segment

    data, header = encode_transaction_segment(datums, codec="zstd")
    digest = hashlib.sha256(data).hexdigest()[:16]
    key = transactions_key(header.first.commit_lsn, header.last.commit_lsn, digest)
    return key, asyncio.run(_put(root, key, data))


def _change_tier(change: Change) -> str:
    return "low" if change[0] == "d" else tier_of(change[2])


def build(p: Params, directory: Path, say: Any) -> dict[str, Any]:
    """Build the archive and the floor's COPY text into *directory*; returns the metadata."""
    started = time.perf_counter()
    if directory.exists():
        shutil.rmtree(directory)
    root = directory / "archive"
    root.mkdir(parents=True)
    plan = make_plan(p)
    n = p.snapshot_rows
    say(f"  change plan: {sum(len(t.changes) for t in plan.txs):,} changes in "
        f"{len(plan.txs)} transactions ({time.perf_counter() - started:.1f}s)")

    # Change segments: whole transactions, about segment_rows changes each (one sink flush).
    groups: list[list[Tx]] = [[]]
    count = 0
    for tx in plan.txs:
        if count >= p.segment_rows:
            groups.append([])
            count = 0
        groups[-1].append(tx)
        count += len(tx.changes)
    keys_bytes = 0
    segments = 0
    ctx = multiprocessing.get_context("spawn")
    workers = max(2, os.cpu_count() or 2)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(build_snapshot_segment, str(root), first,
                               min(first + p.segment_rows, n) - 1)
                   for first in range(0, n, p.segment_rows)]
        # The calendar, in the same snapshot (its seqs follow the guests'), in flushes of its
        # own (the sink buffers per table).
        futures += [pool.submit(build_weddings_segment, str(root), first,
                                min(first + p.segment_rows, p.weddings) - 1, p.day, n)
                    for first in range(0, p.weddings, p.segment_rows)]
        futures += [pool.submit(build_change_segment, str(root),
                                [(t.commit_lsn, t.xid, t.ts_us, t.changes) for t in group])
                    for group in groups]
        # Meanwhile, here: the transaction records, the schema, the checkpoint, the floor.
        tiers: Counter[str] = Counter(tier_of(w) for w in range(1, p.weddings + 1))
        boundary = _transaction_datum(SNAPSHOT_LSN, SNAPSHOT_LSN - 1, T0_US, 0, {TABLE: n},
                                      {t: c * GUESTS_PER_WEDDING for t, c in tiers.items()})
        # One boundary record per table, as the capture sends them (`snapshot_record`).
        calendar = _transaction_datum(SNAPSHOT_LSN, SNAPSHOT_LSN - 1, T0_US, 0,
                                      {WEDDINGS: p.weddings}, dict(tiers))
        _, size = _write_transactions(root, [boundary, calendar])
        keys_bytes += size
        for group in groups:
            datums = []
            for tx in group:
                tier_counts = Counter(_change_tier(c) for c in tx.changes)
                datums.append(_transaction_datum(tx.commit_lsn, tx.end_lsn, tx.ts_us, tx.xid,
                                                 {TABLE: len(tx.changes)}, dict(tier_counts)))
            _, size = _write_transactions(root, datums)
            keys_bytes += size
        from replicator.archive.layout import checkpoint_key, schema_key
        from replicator.archive.reader import checkpoint_document

        for table, columns in ((TABLE, COLUMNS), (WEDDINGS, WEDDING_COLUMNS)):
            schema = {"table": table, "lsn": SNAPSHOT_LSN,
                      "columns": [{"name": c, "type": t, "type_oid": oid, "not_null": nn}
                                  for c, t, oid, nn in columns],
                      "primary_key": ["id"]}
            keys_bytes += asyncio.run(_put(root, schema_key(table, Lsn(SNAPSHOT_LSN)),
                                           json.dumps(schema, sort_keys=True).encode()))
        last = Lsn(plan.txs[-1].end_lsn)
        asyncio.run(_put(root, checkpoint_key(DESTINATION, last),
                         checkpoint_document(DESTINATION, last)))
        rows, wedding_rows = write_floor(p, plan, directory / "floor.copy")
        write_calendar(p, directory / "weddings.copy")
        for future in concurrent.futures.as_completed(futures):
            for _key, _rows, size in future.result():
                keys_bytes += size
                segments += 1
    meta = {
        "params": asdict(p), "rows": rows, "snapshot_rows": n,
        "changes": sum(len(t.changes) for t in plan.txs), "transactions": len(plan.txs),
        "ops": dict(Counter(c[0] for t in plan.txs for c in t.changes)),
        "toast_updates": sum(1 for t in plan.txs for c in t.changes if c[5]),
        "segments": segments, "archive_bytes": keys_bytes, "weddings": p.weddings,
        "day": p.day, "wedding": wedding_rows[0],
        "wedding_rows": wedding_rows[1], "checkpoint": str(Lsn(plan.txs[-1].end_lsn)),
        "build_s": round(time.perf_counter() - started, 2),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: complete
    return meta


def write_floor(p: Params, plan: Plan, path: Path) -> tuple[int, tuple[str, int]]:
    """The final rows as COPY text, in id order; (rows, (chosen wedding, its rows))."""
    wedding = p.weddings // 2 + 1
    while tier_of(wedding) != "low":  # the common case: a wedding months away
        wedding += 1
    rows = in_wedding = 0
    with path.open("w", encoding="utf-8") as out:
        lines: list[str] = []
        for id_ in range(1, plan.max_id + 1):
            v = plan.ver[id_]
            if v < 0:
                continue
            w = plan.wedding(id_)
            lines.append(copy_text(row_values(id_, w, v, plan.nver[id_])))
            rows += 1
            in_wedding += w == wedding
            if len(lines) >= 50_000:
                out.write("".join(lines))
                lines = []
        out.write("".join(lines))
    return rows, (str(wedding), in_wedding)


def write_calendar(p: Params, path: Path) -> None:
    """The calendar's rows as COPY text (loaded, untimed, beside the COPY floor's table)."""
    day = date.fromisoformat(p.day)
    with path.open("w", encoding="utf-8") as out:
        out.write("".join(wedding_copy_text(wedding_values(w, day))
                          for w in range(1, p.weddings + 1)))


def archive_for(p: Params, rebuild: bool, say: Any) -> tuple[Path, dict[str, Any], bool]:
    directory = CACHE_ROOT / p.digest()
    meta_path = directory / "meta.json"
    if meta_path.exists() and not rebuild:
        return directory, json.loads(meta_path.read_text()), True
    say(f"building the archive in {directory} (cached for later runs) ...")
    return directory, build(p, directory, say), False


# --- databases -------------------------------------------------------------------------------


def create_db(name: str) -> str:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(ADMIN_DSN, dbname=name)


def drop_db(name: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def checkpoint() -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute("CHECKPOINT")


def fingerprint(dsn: str, wedding: str | None = None, table: str = TABLE) -> tuple[int, int]:
    """count(*) and sum(hashtext(row text)) of the guests table or the calendar (of one
    wedding: the guests whose wedding_id, the calendar's rows whose id, is it)."""
    column = "wedding_id" if table == TABLE else "id"
    where = sql.SQL("") if wedding is None else sql.SQL(" WHERE {} = {}").format(
        sql.Identifier(column), sql.Literal(int(wedding)))
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql.SQL("SELECT count(*), coalesce(sum(hashtext(t::text)), 0) "
                                   "FROM {} t{}").format(sql.Identifier(*table.split(".")),
                                                         where)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def guests_by_tier(dsn: str) -> Counter[str]:
    """The guests table's rows per tier of their wedding (`tier_of`)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT wedding_id, count(*) FROM public.guests GROUP BY 1"
                            ).fetchall()
    out: Counter[str] = Counter()
    for wedding, count in rows:
        out[tier_of(int(wedding))] += int(count)
    return out


def load_floor(path: Path) -> list[bytes]:
    chunks = []
    with path.open("rb") as f:
        while chunk := f.read(COPY_CHUNK):
            chunks.append(chunk)
    return chunks


def column_list(columns: Any) -> sql.Composed:
    """`name type [NOT NULL], ...` of a table's (name, type, kind, not null) columns."""
    return sql.SQL(", ").join(
        sql.SQL("{} {}{}").format(sql.Identifier(c), sql.SQL(t),
                                  sql.SQL(" NOT NULL" if nn else ""))
        for c, t, _, nn in columns)


def copy_floor(dsn: str, chunks: list[bytes]) -> float:
    """CREATE TABLE + COPY FROM STDIN + ADD PRIMARY KEY + COMMIT; seconds."""
    columns = column_list(COLUMNS)
    name = sql.Identifier("public", "guests")
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")
        conn.commit()
        started = time.perf_counter()
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(name, columns))
        with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} FROM STDIN").format(name)) as cp:
            for chunk in chunks:
                cp.write(chunk)
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(name))
        conn.commit()
        return time.perf_counter() - started


def copy_calendar(dsn: str, path: Path) -> None:
    """The calendar's rows into the COPY floor's database, untimed: the floor is the guests;
    this is what the replays' calendars are checked against."""
    columns = column_list(WEDDING_COLUMNS)
    name = sql.Identifier("public", "weddings")
    with psycopg.connect(dsn) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY (id))").format(name, columns))
        with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} FROM STDIN").format(name)) as cp:
            cp.write(path.read_bytes())
        conn.commit()


def code_digest() -> str:
    """A digest of the replay code as it is now (it changes often: says what was measured)."""
    h = hashlib.sha256()
    files = (sorted((PROJECT_ROOT / "replicator" / "replay").glob("*.py"))
             + sorted((PROJECT_ROOT / "replicator" / "archive").glob("*.py")))
    for path in files:
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_KEK_")}
    env[f"REPLICATOR_KEK_{KEY_NAME}"] = base64.b64encode(KEY).decode()
    env["REPLICATOR_KEK_ACTIVE"] = KEY_NAME
    return env


def run_cli(archive: Path, dsn: str, wedding: str | None = None, at: str = "latest",
            tiered: Path | None = None) -> tuple[dict[str, Any], float]:
    """`replicator replay` in a child process (with *tiered*, a configuration file:
    `--tiered --config` it); its JSON summary and its wall time."""
    command = [sys.executable, "-m", "replicator", "replay", "--from", archive.as_uri(),
               "--at", at, "--to", dsn, "--json"]
    if wedding is not None:
        command += ["--wedding", wedding]
    if tiered is not None:
        command += ["--tiered", "--config", str(tiered)]
    return child_json(command, "replay --tiered" if tiered is not None else "replay")


def child_json(command: list[str], what: str) -> tuple[dict[str, Any], float]:
    """*command* in a child process: the JSON object on its last line, and its wall time."""
    started = time.perf_counter()
    done = subprocess.run(command, env=child_env(), cwd=PROJECT_ROOT, capture_output=True,
                          text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def compaction_point(archive: Path, tail: int) -> tuple[Lsn, int]:
    """The earliest commit LSN with at most *tail* changes after it, and how many there
    are."""
    import uvloop

    from connectors.local import LocalStore
    from replicator.archive.reader import Archive

    async def main() -> list[Any]:
        store = LocalStore(archive)
        try:
            return await Archive(store, _keyring()).transactions()
        finally:
            await store.close()

    records = uvloop.run(main())
    commits = sorted({(int(r.commit_lsn), sum(r.counts.values())) for r in records if r.xid})
    after = 0
    for lsn, count in reversed(commits):
        if after + count > tail:
            return Lsn(lsn), after
        after += count
    raise SystemExit(f"the archive holds fewer than {tail} changes")


def compact_copy(source: Path, target: Path, at: Lsn | str) -> tuple[dict[str, Any], float]:
    """A copy of *source* (hard links: compaction only adds objects) compacted at *at* by
    `replicator compact` in a child process; its JSON summary and its wall time."""
    if target.exists():
        shutil.rmtree(target)
    subprocess.run(["cp", "-al", str(source), str(target)], check=True)
    return compact_again(target, at)


def compact_again(target: Path, at: Lsn | str) -> tuple[dict[str, Any], float]:
    command = [sys.executable, "-m", "replicator", "compact", "--from", target.as_uri(),
               "--at", str(at), "--json"]
    return child_json(command, "compact")


def profile_replay(archive: Path, dsn: str, path: str) -> float:
    """`replay()` in this process under cProfile; prints the top entries; seconds."""
    import uvloop

    from connectors.local import LocalStore
    from replicator.replay.run import replay
    from replicator.replay.targets import PostgresTarget

    async def main() -> Any:
        store = LocalStore(archive)
        try:
            return await replay(store, _keyring(), PostgresTarget(dsn), at="latest")
        finally:
            await store.close()

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    summary = uvloop.run(main())
    profiler.disable()
    seconds = time.perf_counter() - started
    profiler.dump_stats(path)
    print(f"\nprofiled replay: {summary.line()}")
    stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(30)
    return seconds


# --- main ------------------------------------------------------------------------------------


def main(p: Params, as_json: bool, profile: str | None, rebuild: bool, quick: bool,
         tail: int) -> int:
    def say(text: str) -> None:
        print(text, flush=True)

    wall_started = time.perf_counter()
    directory, meta, cached = archive_for(p, rebuild, say)
    archive = directory / "archive"
    compacted = directory / "compacted"
    say(f"archive {directory}: {meta['snapshot_rows']:,} snapshot rows (and a calendar of "
        f"{meta['weddings']:,} weddings dated from {meta['day']}) + {meta['changes']:,} "
        f"changes ({meta['ops']}, {meta['toast_updates']:,} with TOAST-unchanged notes) in "
        f"{meta['transactions']} transactions, {meta['segments']} segments, "
        f"{meta['archive_bytes'] / 1e6:,.1f} MB; build {meta['build_s']:.1f}s"
        f"{' (cached)' if cached else ''}")
    tag = uuid.uuid4().hex[:8]
    created: list[str] = []
    failures: list[str] = []
    dsns: dict[str, str] = {}

    def fresh(kind: str) -> str:
        name = f"bench_{kind}_{tag}"
        dsns[kind] = create_db(name)
        created.append(name)
        return dsns[kind]

    def check(kind: str, wedding: str | None = None) -> tuple[tuple[int, int], ...]:
        """The guests and the calendar restored into *kind*'s database against the COPY
        floor's; their (count, hash)."""
        found = []
        for table, floor in ((TABLE, floor_fp), (WEDDINGS, calendar_fp)):
            got = fingerprint(dsns[kind], wedding, table)
            want = floor if wedding is None else fingerprint(dsns["copy"], wedding, table)
            if got != want:
                failures.append(f"{kind}: {table} restored (count, hash) {got} != the COPY "
                                f"floor's {want}")
            found.append(want)
        return tuple(found)

    def replay_into(kind: str, source: Path, wedding: str | None = None
                    ) -> tuple[dict[str, Any], float]:
        checkpoint()
        summary, wall = run_cli(source, fresh(kind), wedding)
        want = check(kind, wedding)
        reported = tuple(summary["tables"].get(t, {}).get("rows") for t in (TABLE, WEDDINGS))
        if reported != tuple(w[0] for w in want):
            failures.append(f"{kind}: reported {reported} rows of {TABLE}, {WEDDINGS}; "
                            f"{tuple(w[0] for w in want)} expected")
        return summary, wall

    def tiered_into(kind: str, source: Path) -> tuple[dict[str, Any], float]:
        """`replay --tiered`: the end state as a plain replay's; the steps: each tier's
        weddings (as `tier_of` gives them) and their rows in both tables."""
        config = directory / "priority.toml"
        config.write_text(PRIORITY_TOML)
        checkpoint()
        summary, wall = run_cli(source, fresh(kind), tiered=config)
        want = check(kind)
        if summary["rows"] != want[0][0] + want[1][0]:
            failures.append(f"{kind}: reported {summary['rows']} rows, "
                            f"{want[0][0] + want[1][0]} expected")
        weddings = Counter(tier_of(w) for w in range(1, meta["weddings"] + 1))
        guests = guests_by_tier(dsns["copy"])
        expected = [{"tier": t, "weddings": weddings[t], "rows": guests[t] + weddings[t]}
                    for t in ("critical", "high", "normal") if weddings[t]]
        expected.append({"tier": "rest", "weddings": 0, "rows": want[0][0] + want[1][0]})
        steps = [{k: s[k] for k in ("tier", "weddings", "rows")} for s in summary["steps"]]
        if steps != expected:
            failures.append(f"{kind}: steps {steps} != {expected} expected")
        return summary, wall

    try:
        with psycopg.connect(ADMIN_DSN) as conn:
            version_row = conn.execute("SHOW server_version").fetchone()
        server = version_row[0] if version_row else "?"
        chunks = load_floor(directory / "floor.copy")
        floor_bytes = sum(len(c) for c in chunks)
        checkpoint()
        say(f"COPY floor: {floor_bytes / 1e6:,.1f} MB of COPY text ...")
        copy_s = copy_floor(fresh("copy"), chunks)
        del chunks
        floor_fp = fingerprint(dsns["copy"])
        if floor_fp[0] != meta["rows"]:
            failures.append(f"the COPY table holds {floor_fp[0]} rows, {meta['rows']} expected")
        copy_calendar(dsns["copy"], directory / "weddings.copy")
        calendar_fp = fingerprint(dsns["copy"], table=WEDDINGS)
        if calendar_fp[0] != meta["weddings"]:
            failures.append(f"the COPY calendar holds {calendar_fp[0]} rows, "
                            f"{meta['weddings']} expected")
        code = code_digest()

        say(f"  {copy_s:.2f}s; replay of the uncompacted archive (child process) ...")
        uncompacted, _ = replay_into("uncompacted", archive)
        point, after = compaction_point(archive, tail)
        say(f"  {uncompacted['seconds']:.2f}s; compaction at {point}, {after:,} changes before "
            "the end (child process) ...")
        compaction, compact_wall = compact_copy(archive, compacted, point)
        say(f"  {compaction['seconds']:.2f}s; replay: that snapshot + {after:,} changes ...")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        summary, replay_wall = replay_into("replay", compacted)
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        replay_s = float(summary["seconds"])
        peak_rss = float(summary["peak_rss_mb"])
        wedding = meta["wedding"]
        say(f"  {replay_s:.2f}s; wedding {wedding}, from it and from the uncompacted archive ...")
        one, wedding_wall = replay_into("wedding", compacted, wedding)
        one_uncompacted, _ = replay_into("wedding_u", archive, wedding)
        one_guests = one["tables"][TABLE]["rows"]
        if one_guests != meta["wedding_rows"]:
            failures.append(f"wedding {wedding}: {one_guests} guests restored, "
                            f"{meta['wedding_rows']} expected")
        say(f"  {float(one['seconds']):.2f}s; tiered replay of the compacted archive ...")
        tiered, tiered_wall = tiered_into("tiered", compacted)
        say("compaction at the latest point (from the first snapshot and the changes after "
            "it) ...")
        latest_compaction, _ = compact_again(compacted, "latest")
        at_snapshot, _ = replay_into("snapshot", compacted)

        profile_s = None
        if profile is not None:
            profile_s = profile_replay(compacted, fresh("profile"), profile)
            if (fingerprint(dsns["profile"]) != floor_fp
                    or fingerprint(dsns["profile"], table=WEDDINGS) != calendar_fp):
                failures.append("the profiled replay's tables differ from the COPY floor's")
    finally:
        for name in created:
            try:
                drop_db(name)
            except psycopg.Error as exc:
                print(f"WARNING: could not drop {name}: {exc}", file=sys.stderr)

    rows = floor_fp[0]
    ratio = replay_s / copy_s
    uncompacted_s, snapshot_s = float(uncompacted["seconds"]), float(at_snapshot["seconds"])
    wedding_s = float(one["seconds"])
    table = summary["tables"][TABLE]
    tiered_s = float(tiered["seconds"])
    critical = tiered["critical_usable_s"]
    critical_s = None if critical is None else float(critical)
    critical_ratio = None if critical_s is None else critical_s / replay_s
    print(f"\n{rows:,} rows restored (snapshot {meta['snapshot_rows']:,} + "
          f"{meta['changes']:,} changes in {meta['transactions']} transactions); "
          f"PostgreSQL {server}, {os.cpu_count()} CPUs{'; --quick' if quick else ''}")
    print(f"{'':58}{'seconds':>9}{'ratio':>7}{'rows/s':>12}")
    lines = [
        ("COPY floor (create, COPY, primary key)", copy_s),
        (f"replay: compaction snapshot + {after:,} changes", replay_s),
        ("replay: uncompacted (first snapshot + every change)", uncompacted_s),
        ("replay: compaction snapshot at the latest point", snapshot_s),
    ]
    for label, seconds in lines:
        print(f"{label:58}{seconds:>9.2f}{seconds / copy_s:>7.2f}{rows / seconds:>12,.0f}")
    print(f"ratio replay / COPY: {ratio:.2f} (target <= {TARGET_RATIO:.1f}: "
          f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); process wall time "
          f"{replay_wall:.2f}s, {table['segments']} objects read for the table, "
          f"{table['changed_keys']:,} changed keys")
    print(f"replay peak RSS: {peak_rss:,.0f} MB (RUSAGE_CHILDREN: {children:,.0f} MB, before "
          f"the replay {before:,.0f} MB); read {summary['bytes_read'] / 1e6:,.1f} MB in "
          f"{summary['objects_read']} objects")
    print(f"wedding {wedding} restore: {wedding_s:.2f}s (wall {wedding_wall:.2f}s; target < "
          f"{TARGET_WEDDING_S:.0f}s: {'met' if wedding_s < TARGET_WEDDING_S else 'NOT met'}), "
          f"{one_guests} guests (and its calendar row), {one['objects_read']} objects read, "
          f"{one['bytes_read'] / 1e6:,.1f} MB; uncompacted "
          f"{float(one_uncompacted['seconds']):.2f}s")
    steps = "; ".join(f"{s['tier']} at {s['usable_s']:.2f}s ({s['weddings']} weddings, "
                      f"{s['rows']:,} rows, {s['objects_read']} objects)"
                      if s["tier"] != "rest" else
                      f"every table whole at {s['usable_s']:.2f}s ({s['rows']:,} rows)"
                      for s in tiered["steps"])
    print(f"tiered replay of the same archive: {tiered_s:.2f}s in all (wall {tiered_wall:.2f}s"
          f", {tiered_s / replay_s:.2f}x the plain replay); "
          + ("no critical weddings" if critical_ratio is None else
             f"critical weddings usable after {critical_s:.2f}s = {critical_ratio:.3f} of the "
             f"plain replay's {replay_s:.2f}s")
          + f"\n  steps: {steps}")
    print(f"compaction at {point}: {compaction['seconds']:.2f}s (wall {compact_wall:.2f}s); "
          f"again at the latest point: {latest_compaction['seconds']:.2f}s")
    print(f"archive build: {meta['build_s']:.1f}s{' (cached, not in this run)' if cached else ''}"
          f"; this run's wall time {time.perf_counter() - wall_started:.1f}s; replay code "
          f"{code}")
    if profile_s is not None:
        print(f"profiled replay (cProfile, in-process): {profile_s:.2f}s, stats in {profile}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    if as_json:
        print(json.dumps({
            "rows": rows,
            "replay_s": round(replay_s, 3),
            "copy_s": round(copy_s, 3),
            "ratio_replay_vs_copy": round(ratio, 3),
            "wedding_restore_s": round(wedding_s, 3),
            "peak_rss_mb": round(peak_rss, 1),
            "tail_changes": after,
            "compaction_lsn": str(point),
            "compact_s": round(float(compaction["seconds"]), 3),
            "compact_latest_s": round(float(latest_compaction["seconds"]), 3),
            "uncompacted_replay_s": round(uncompacted_s, 3),
            "ratio_uncompacted_vs_copy": round(uncompacted_s / copy_s, 3),
            "at_snapshot_replay_s": round(snapshot_s, 3),
            "ratio_at_snapshot_vs_copy": round(snapshot_s / copy_s, 3),
            "uncompacted_peak_rss_mb": round(float(uncompacted["peak_rss_mb"]), 1),
            "wedding_restore_uncompacted_s": round(float(one_uncompacted["seconds"]), 3),
            "replay_wall_s": round(replay_wall, 3),
            "wedding_restore_wall_s": round(wedding_wall, 3),
            "wedding": wedding,
            "wedding_rows": one_guests,
            "wedding_objects_read": one["objects_read"],
            "snapshot_rows": meta["snapshot_rows"],
            "changes": meta["changes"],
            "transactions": meta["transactions"],
            "segments": meta["segments"],
            "archive_mb": round(meta["archive_bytes"] / 1e6, 1),
            "build_s": meta["build_s"],
            "build_cached": cached,
            "verified": not failures,
            "replay_code": code,
            "quick": quick,
            "critical_usable_s": None if critical_s is None else round(critical_s, 3),
            "tiered_s": round(tiered_s, 3),
            "ratio_critical_vs_replay": (None if critical_ratio is None
                                         else round(critical_ratio, 3)),
            "tiered_steps": tiered["steps"],
        }))
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smaller archive (5,000 weddings, 100,000 changes)")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--weddings", type=int, default=None,
                        help="weddings of 100 guests in the snapshot (default 20000)")
    parser.add_argument("--changes", type=int, default=None,
                        help="changes after the snapshot (default 400000)")
    parser.add_argument("--tail", type=int, default=None,
                        help="changes after the compaction point (default: the most the "
                             "service's default compaction policy lets pile up)")
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="also replay the compacted archive in-process under cProfile")
    parser.add_argument("--rebuild", action="store_true", help="ignore the cached archive")
    args = parser.parse_args()
    weddings = args.weddings or (5_000 if args.quick else 20_000)
    changes = args.changes if args.changes is not None else (100_000 if args.quick else 400_000)
    policy = CompactionConfig()
    tail = (args.tail if args.tail is not None else
            max(policy.min_changes, math.ceil(policy.min_changes_ratio * weddings
                                              * GUESTS_PER_WEDDING)))
    today = datetime.now(UTC).date().isoformat()  # in the cache key: dates count from it
    sys.exit(main(Params(weddings, changes, today), args.json, args.profile, args.rebuild,
                  args.quick, tail))
