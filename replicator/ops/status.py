"""`replicator status`: one look at every stage, read from the components themselves.

It reads PostgreSQL (the slot, the WAL, the wedding calendar), Kafka (the topics' end
offsets, each sink group's committed offsets, the newest transaction record) and each
destination's store (checkpoints, gaps, dead letters, compaction snapshots), so it works
while the service is down, which is when it is needed. When the service's `/metrics`
answers, what only the running service knows (breakers, the spool, the live recovery point,
the last compaction) is read from there too.

Each finding is a `Check` with a level, following the Nagios/Icinga plugin convention used
for the exit code: OK 0, WARNING 1, CRITICAL 2, UNKNOWN 3 (a stage that could not be read
at all, so nothing can be said of it). The verdict is the worst level found; each WARNING
or CRITICAL says why and what to do. Thresholds (`Thresholds`) follow the alert rules in
`deploy/prometheus/alerts.yml`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import make_conninfo

from connectors.base import ObjectStore
from connectors.registry import open_store
from replicator.archive import reader
from replicator.archive.layout import (
    EVES,
    eve_key,
    is_manifest_key,
    parse_manifest_key,
    snapshots_prefix,
)
from replicator.config import Config, DestinationConfig
from replicator.crypto import Keyring
from replicator.events import TIER_ORDER, Tier
from replicator.position import Lsn
from replicator.transport.avro import EventCodec
from replicator.transport.kafka import topic_names, transactions_topic

__all__ = ["Check", "Level", "Report", "Thresholds", "gather"]


class Level(enum.IntEnum):
    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class Thresholds:
    """When a reading becomes a WARNING or CRITICAL (the alert rules' values)."""

    wal_retained_warning_bytes: int = 1 << 30  # 1 GiB held by the slot
    wal_retained_critical_bytes: int = 10 << 30
    capture_lag_warning_s: float = 60.0
    capture_lag_critical_s: float = 300.0
    critical_rpo_s: float = 60.0  # a wedding within 7 days: changes not durable this long
    rpo_warning_s: float = 600.0  # any tier


@dataclass
class Check:
    stage: str  # "source", "kafka", "destination <name>", "weddings", "service"
    level: Level
    what: str  # the reading
    why: str = ""  # for WARNING and CRITICAL: what it means
    action: str = ""  # and what to do

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "level": self.level.name}


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    readings: dict[str, Any] = field(default_factory=dict)  # every figure, for --json
    at: float = field(default_factory=time.time)

    @property
    def verdict(self) -> Level:
        return max((c.level for c in self.checks), default=Level.UNKNOWN)

    def add(self, stage: str, level: Level, what: str, why: str = "",
            action: str = "") -> None:
        self.checks.append(Check(stage, level, what, why, action))

    def as_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict.name, "exit_code": int(self.verdict), "at": self.at,
                "checks": [c.as_json() for c in self.checks], "readings": self.readings}


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


# --- the source ------------------------------------------------------------------------------


_SLOT = """
SELECT active, confirmed_flush_lsn::text, restart_lsn::text, wal_status, safe_wal_size,
       (pg_current_wal_lsn() - restart_lsn)::bigint,
       (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
FROM pg_replication_slots WHERE slot_name = %s
"""


async def source_status(config: Config, report: Report, limits: Thresholds,
                        newest_commit_us: int | None) -> None:
    src = config.source
    password = src.password.get_secret_value() if src.password else None
    dsn = make_conninfo(src.dsn, password=password) if password else src.dsn
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        report.add("source", Level.CRITICAL, "PostgreSQL does not answer",
                   f"cannot connect to the source: {type(exc).__name__}", "check the server, "
                   "the network and the DSN (`source.dsn`); capture cannot run without it")
        return
    async with conn:
        row = await (await conn.execute(_SLOT, (src.slot,))).fetchone()
        await _weddings(conn, config, report)
    if row is None:
        report.add("source", Level.CRITICAL, f"slot {src.slot!r} does not exist",
                   "capture has never run against this database, or the slot was dropped",
                   "start `replicator run`; if the slot was lost, run it with --accept-gap "
                   "(README, 'When the slot is lost')")
        return
    active, confirmed, restart, wal_status, safe, retained, lag = row
    readings = {"slot": src.slot, "active": active, "confirmed_lsn": confirmed,
                "restart_lsn": restart, "wal_status": wal_status, "safe_wal_size": safe,
                "wal_retained_bytes": retained, "capture_lag_bytes": lag}
    lag_s = None
    if newest_commit_us is not None and lag:
        lag_s = max(0.0, time.time() - newest_commit_us / 1e6)
    readings["capture_lag_s"] = lag_s
    report.readings["source"] = readings
    what = (f"slot {src.slot} {'active' if active else 'INACTIVE'}, confirmed {confirmed}, "
            f"WAL held {_gib(retained or 0)}, wal_status {wal_status}")
    if wal_status in ("lost", "unreserved"):
        report.add("source", Level.CRITICAL, what,
                   f"the slot's WAL is {wal_status}: changes after {confirmed} are or will be "
                   "gone", "README, 'When the slot is lost': run with --accept-gap after "
                   "confirming; raise max_slot_wal_keep_size if it keeps happening")
    elif not active:
        report.add("source", Level.CRITICAL, what, "no capture is streaming from the slot; "
                   "WAL piles up on the server", "start `replicator run` (or `--only capture`)"
                   " and read its log")
    elif (retained or 0) >= limits.wal_retained_critical_bytes:
        report.add("source", Level.CRITICAL, what, "the slot holds a lot of WAL: the server's "
                   "disk fills", "see why capture is behind (Kafka, its log)")
    elif (retained or 0) >= limits.wal_retained_warning_bytes or wal_status == "extended":
        report.add("source", Level.WARNING, what, "the slot holds more WAL than usual",
                   "watch the capture lag; see why capture is behind")
    else:
        report.add("source", Level.OK, what)
    if lag_s is not None and lag_s >= limits.capture_lag_warning_s:
        level = Level.CRITICAL if lag_s >= limits.capture_lag_critical_s else Level.WARNING
        report.add("source", level, f"capture {lag_s:.0f}s behind ({_gib(lag or 0)} of WAL)",
                   "the newest change in Kafka is this old while the slot has more",
                   "check the capture's log and Kafka")


async def _weddings(conn: psycopg.AsyncConnection[Any], config: Config,
                    report: Report) -> None:
    """The weddings of the critical tier, by the configured calendar."""
    cal = config.priority
    if not cal.weddings_table:
        return
    table = sql.Identifier(*cal.weddings_table.split("."))
    query = sql.SQL("SELECT {}::text, {}::text FROM {} WHERE {} >= %s AND {} <= %s "
                    "ORDER BY {} LIMIT 200").format(
        sql.Identifier(cal.wedding_id_column), sql.Identifier(cal.wedding_date_column), table,
        sql.Identifier(cal.wedding_date_column), sql.Identifier(cal.wedding_date_column),
        sql.Identifier(cal.wedding_date_column))
    today = datetime.now(UTC).date()
    try:
        rows = await (await conn.execute(
            query, (today, today + timedelta(days=cal.critical_days)))).fetchall()
    except psycopg.Error as exc:
        report.add("weddings", Level.WARNING, "the wedding calendar cannot be read",
                   f"{type(exc).__name__} on {cal.weddings_table}",
                   "check `[priority]` in the configuration")
        return
    weddings = [{"id": r[0], "date": r[1]} for r in rows]
    report.readings["critical_weddings"] = weddings
    report.add("weddings", Level.OK, f"{len(weddings)} weddings in the critical tier "
               f"(within {cal.critical_days} days)" + (": " + ", ".join(
                   f"{w['id']} on {w['date']}" for w in weddings[:10]) if weddings else ""))


# --- Kafka -----------------------------------------------------------------------------------


async def kafka_status(config: Config, report: Report) -> int | None:
    """Topics' end offsets and each destination's lag per tier; returns the commit time (us)
    of the newest transaction record (the capture's heartbeats keep it fresh)."""
    prefix = config.kafka.topic_prefix
    tiers = topic_names(prefix)
    tx = transactions_topic(prefix)
    consumer = AIOKafkaConsumer(bootstrap_servers=config.kafka.bootstrap_servers,
                                request_timeout_ms=10_000)
    admin = AIOKafkaAdminClient(bootstrap_servers=config.kafka.bootstrap_servers,
                                request_timeout_ms=10_000)
    try:
        await asyncio.wait_for(consumer.start(), 15)
        await asyncio.wait_for(admin.start(), 15)
    except Exception as exc:  # any failure to reach the broker
        report.add("kafka", Level.CRITICAL, "Kafka does not answer",
                   f"{type(exc).__name__} at {config.kafka.bootstrap_servers}",
                   "check the broker; capture and the sinks wait for it")
        with contextlib.suppress(Exception):
            await consumer.stop()
        with contextlib.suppress(Exception):
            await admin.close()
        return None
    try:
        described = await admin.describe_topics([*tiers.values(), tx])
        partitions = sorted(TopicPartition(t["topic"], p["partition"]) for t in described
                            if not t.get("error_code") for p in t["partitions"])
        if not partitions:
            report.add("kafka", Level.WARNING, f"no topics of prefix {prefix!r}",
                       "capture has not created them yet", "start `replicator run`")
            return None
        ends = await consumer.end_offsets(partitions)
        report.readings["kafka"] = {"end_offsets": {
            f"{tp.topic}/{tp.partition}": n for tp, n in sorted(ends.items())}}
        report.add("kafka", Level.OK, f"{sum(ends.values()):,} records in "
                   f"{len(partitions)} partitions")
        newest = await _newest_transaction(consumer, TopicPartition(tx, 0), ends)
        lags: dict[str, dict[str, int]] = {}
        for dest in config.destinations:
            group = f"{prefix}.sink.{dest.name}"
            committed = {tp: meta.offset for tp, meta in
                         (await admin.list_consumer_group_offsets(group)).items()}
            per_tier = {t.value: sum(max(0, ends[tp] - committed.get(tp, 0))
                                     for tp in ends if tp.topic == tiers[t])
                        for t in TIER_ORDER}
            per_tier["transactions"] = sum(max(0, ends[tp] - committed.get(tp, 0))
                                           for tp in ends if tp.topic == tx)
            lags[dest.name] = per_tier
        report.readings["kafka"]["sink_lag_records"] = lags
        report.readings["kafka"]["newest_commit_us"] = newest
        return newest
    finally:
        await consumer.stop()
        await admin.close()


async def _newest_transaction(consumer: AIOKafkaConsumer, tp: TopicPartition,
                              ends: dict[TopicPartition, int]) -> int | None:
    if not ends.get(tp):
        return None
    consumer.assign([tp])
    consumer.seek(tp, ends[tp] - 1)
    batch = await consumer.getmany(tp, timeout_ms=5000, max_records=1)
    for record in batch.get(tp, ()):
        with contextlib.suppress(Exception):
            value, _ = EventCodec().decode_transaction_body(record.value)
            return int(value["commit_ts_us"])
    return None


# --- the service's own metrics ---------------------------------------------------------------


def read_metrics(listen: str, timeout: float = 3.0) -> dict[str, list[tuple[dict[str, str],
                                                                          float]]] | None:
    """The running service's `/metrics`, by metric name; None when it does not answer."""
    host, _, port = listen.rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}.get(host, host)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except OSError:
        return None
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def _metric(metrics: dict[str, list[tuple[dict[str, str], float]]] | None, name: str,
            **labels: str) -> list[tuple[dict[str, str], float]]:
    if metrics is None:
        return []
    return [(lab, v) for lab, v in metrics.get(name, ())
            if all(lab.get(k) == want for k, want in labels.items())]


# --- each destination ------------------------------------------------------------------------


async def destination_status(dest: DestinationConfig, config: Config, keyring: Keyring,
                             report: Report, limits: Thresholds,
                             metrics: dict[str, list[tuple[dict[str, str], float]]] | None,
                             environ: dict[str, str]) -> None:
    stage = f"destination {dest.name}"
    try:
        store = open_store(dest.url, environ)
    except Exception as exc:  # a store that cannot be opened at all
        report.add(stage, Level.UNKNOWN, "the store cannot be opened", str(exc),
                   "check the URL and credentials")
        return
    try:
        await _destination(store, dest, keyring, report, limits, metrics, stage)
    except Exception as exc:  # an unreachable store, a refused object
        report.add(stage, Level.CRITICAL, "the store cannot be read",
                   f"{type(exc).__name__}: {exc}",
                   "check the store; the sink holds its changes back (spool or Kafka) "
                   "until it answers")
    finally:
        await store.close()


async def _destination(store: ObjectStore, dest: DestinationConfig, keyring: Keyring,
                       report: Report, limits: Thresholds,
                       metrics: dict[str, list[tuple[dict[str, str], float]]] | None,
                       stage: str) -> None:
    overall = await reader.checkpoint(store, dest.name, keyring=keyring)
    tiers = {t.value: str(await reader.checkpoint(store, dest.name, t, keyring=keyring))
             for t in TIER_ORDER}
    gaps = await reader.recorded_gaps(store, keyring)
    dead = await reader.dead_letters(store)
    compactions = sorted({parse_manifest_key(info.key).lsn
                          async for info in store.list(snapshots_prefix())
                          if is_manifest_key(info.key)})
    readings: dict[str, Any] = {
        "checkpoint": str(overall), "tier_checkpoints": tiers,
        "gaps": [f"{a}-{b}" for a, b in gaps], "dead_letters": dead,
        "newest_compaction_lsn": str(Lsn(compactions[-1])) if compactions else None}
    report.readings.setdefault("destinations", {})[dest.name] = readings
    report.add(stage, Level.OK if overall else Level.WARNING,
               f"checkpoint {overall}" + (f"; newest compaction at {Lsn(compactions[-1])}"
                                          if compactions else "; no compaction yet"),
               "" if overall else "nothing is recoverable from it yet",
               "" if overall else "wait for the sink's first flush; check its log")
    if dead:
        report.add(stage, Level.CRITICAL, f"{len(dead)} dead letters, e.g. {dead[0]}",
                   "records the sink could not archive; no checkpoint passes them",
                   "README, 'Dead letters': read them, fix the cause")
    if gaps:
        report.add(stage, Level.WARNING, f"{len(gaps)} recorded gaps",
                   "restores to points inside them are refused",
                   "nothing to do unless it is new: a lost slot was replaced")
    if metrics is None:
        return
    rpo = {lab["tier"]: v for lab, v in _metric(metrics, "wedsync_rpo_seconds",
                                                destination=dest.name)}
    breaker = [v for _, v in _metric(metrics, "wedsync_sink_breaker_open",
                                     destination=dest.name)]
    spool = [v for _, v in _metric(metrics, "wedsync_sink_spool_bytes",
                                   destination=dest.name)]
    last = [v for _, v in _metric(metrics, "wedsync_compaction_last_success_timestamp_seconds",
                                  destination=dest.name)]
    readings.update({"rpo_seconds": rpo, "breaker_open": bool(breaker and breaker[0]),
                     "spool_bytes": int(spool[0]) if spool else None,
                     "last_compaction_at": last[0] if last and last[0] else None})
    critical = rpo.get(Tier.CRITICAL.value, 0.0)
    worst = max(rpo.values(), default=0.0)
    what = "recovery point " + ", ".join(f"{t} {s:.0f}s" for t, s in rpo.items())
    if critical > limits.critical_rpo_s:
        report.add(stage, Level.CRITICAL, what, "changes of weddings within a week are not "
                   "durable here", "check the breaker, the store and the sink's log")
    elif worst > limits.rpo_warning_s:
        report.add(stage, Level.WARNING, what, "changes are not durable here for long",
                   "check the sink's lag and the store")
    else:
        report.add(stage, Level.OK, what)
    if breaker and breaker[0]:
        report.add(stage, Level.WARNING, "breaker open", "the store is failing; the sink "
                   "backs off and retries", "check the store and the sink's log")
    if spool and spool[0]:
        report.add(stage, Level.WARNING, f"spool holds {_gib(int(spool[0]))}",
                   "the store was out: the spool is shipped when it answers",
                   "bring the store back; watch the spool's disk")


# --- all of it -------------------------------------------------------------------------------


async def gather(config: Config, keyring: Keyring | None, environ: dict[str, str],
                 limits: Thresholds | None = None,
                 metrics_reader: Callable[[str], Any] | None = None) -> Report:
    """Every stage's status (module docstring)."""
    limits = limits or Thresholds()
    report = Report()
    read = metrics_reader or read_metrics
    metrics = await asyncio.to_thread(read, config.metrics.listen)
    report.readings["service"] = {"metrics": config.metrics.listen, "up": metrics is not None}
    report.add("service", Level.OK if metrics is not None else Level.WARNING,
               f"/metrics at {config.metrics.listen} " + ("answers" if metrics is not None
                                                          else "does not answer"),
               "" if metrics is not None else "the service is not running here (or listens "
               "elsewhere): breakers, spool and live recovery point are not shown",
               "" if metrics is not None else "start `replicator run`, or check "
               "`metrics.listen`")
    newest = await kafka_status(config, report)
    jobs: list[Awaitable[None]] = [source_status(config, report, limits, newest)]
    if keyring is None:
        report.add("destinations", Level.UNKNOWN, "no keyring",
                   "checkpoints are sealed: without the keys they cannot be read",
                   "set REPLICATOR_KEK_* or `encryption.keyring_file`")
    else:
        jobs += [destination_status(d, config, keyring, report, limits, metrics, environ)
                 for d in config.destinations]
    await asyncio.gather(*jobs)
    await _eves(config, report, environ)
    return report


async def _eves(config: Config, report: Report, environ: dict[str, str]) -> None:
    """Mark each critical wedding with whether its eve snapshot is in the first
    destination (`eves/<wedding>/<date>.json`, replicator.eve)."""
    weddings = report.readings.get("critical_weddings")
    if not weddings or not config.destinations:
        return
    try:
        store = open_store(config.destinations[0].url, environ)
    except Exception:  # reported by the destination's own check
        return
    try:
        names = {info.key async for info in store.list(EVES)}
    except Exception:
        return
    finally:
        await store.close()
    for wedding in weddings:
        wedding["eve_snapshot"] = eve_key(wedding["id"], wedding["date"]) in names
    missing = [w["id"] for w in weddings if not w["eve_snapshot"]]
    report.add("weddings", Level.OK, "eve snapshots: " + (
        f"taken for all {len(weddings)}" if not missing else
        f"{len(weddings) - len(missing)} of {len(weddings)} (not yet: "
        + ", ".join(missing[:10]) + "; each is taken hours_before its day)"))
