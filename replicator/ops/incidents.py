"""Incident detection: a bulk delete or rewrite of a near wedding's rows, seen as it happens.

A watcher beside the capture reads the critical and high tier topics in a consumer group of
its own (`<prefix>.incidents`, from the newest records: it watches, it does not archive), from
the Kafka key and headers only (no record is decoded). Per wedding it keeps the distinct rows
(table and key) deleted or updated within the last `incidents.window_s` seconds by *bulk*
transactions: those that deleted or updated at least `incidents.bulk_rows` (5) rows of that
wedding. Ordinary work, many small transactions each touching a row or two, never counts,
however busy; a script deleting one row per transaction is not caught either. When the rows
reach `incidents.min_rows` it counts the wedding's rows in the source (its directly linked
tables of `[priority.tables]`); if the rows touched are at least `incidents.share` of the
rows it had (rows now plus those deleted in the window), it raises an incident, once per
wedding per `incidents.cooldown_s`:

1. the incident record goes to the capture's state topic (`incident/<id>`, acks=all), which
   every sink archives as `incidents/<id>.json`;
2. `wedsync_incidents_total` counts it;
3. once the first destination's checkpoint has passed the window (at most `impact_wait_s`),
   `replicator impact` runs over it for that wedding, and its report is stored beside the
   record (`incidents/<id>-impact.json`);
4. every `[[notify]]` webhook gets the record and the report as JSON (POST), tried up to
   three times with backoff.

A delete is attributed to its wedding only when it carries the wedding id: under the default
replica identity a delete carries only the row's key (`priority`), so tables whose bulk
deletes must be caught need `REPLICA IDENTITY FULL` (or the wedding column in their key).

Steps 3 and 4 run in their own task: nothing here waits on the capture or blocks it, and a
failure is logged, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import psycopg
from aiokafka import AIOKafkaConsumer
from psycopg import sql

from connectors.registry import open_store
from replicator.archive import reader
from replicator.archive.layout import incident_key
from replicator.config import Config
from replicator.crypto import Keyring, encrypt
from replicator.events import split_qualified
from replicator.transport.control import CaptureState
from replicator.transport.kafka import topic_names

log = logging.getLogger(__name__)

__all__ = ["Incident", "IncidentDetector", "IncidentWatcher"]

_TOUCHING = (b"d", b"u")


@dataclass
class Incident:
    id: str
    wedding: str
    tier: str
    rows_touched: int
    rows_before: int
    share: float
    since: str
    until: str
    detected_at: str
    tables: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class IncidentDetector:
    """The rule, on what the watcher feeds it (pure logic)."""

    def __init__(self, *, window_s: float, min_rows: int, cooldown_s: float,
                 bulk_rows: int = 5) -> None:
        self.window_s = window_s
        self.min_rows = min_rows
        self.cooldown_s = cooldown_s
        self.bulk_rows = bulk_rows
        # wedding -> (time, table, key, op, transaction) of each delete or update in the window
        self._seen: dict[str, deque[tuple[float, str, bytes, bytes, bytes]]] = (
            defaultdict(deque))
        self._tier: dict[str, str] = {}
        self._raised: dict[str, float] = {}

    def observe(self, wedding: str, tier: str, table: str, key: bytes, op: bytes,
                at: float, transaction: bytes = b"") -> None:
        """A change read: *transaction* is its commit position (the `lsn` header)."""
        if op in _TOUCHING:
            self._seen[wedding].append((at, table, key, op, transaction))
            self._tier[wedding] = tier

    def candidates(self, now: float) -> dict[str, tuple[int, int, dict[str, int]]]:
        """Weddings with at least `min_rows` distinct rows touched in the window and no
        incident within the cooldown: wedding -> (rows touched, rows deleted, per table)."""
        found = {}
        for wedding, seen in list(self._seen.items()):
            while seen and seen[0][0] < now - self.window_s:
                seen.popleft()
            if not seen:
                del self._seen[wedding]
                continue
            if now - self._raised.get(wedding, -1e18) < self.cooldown_s:
                continue
            per_tx: dict[bytes, set[tuple[str, bytes]]] = defaultdict(set)
            for _, table, key, _, tx in seen:
                per_tx[tx].add((table, key))
            bulk = {tx for tx, touched in per_tx.items() if len(touched) >= self.bulk_rows}
            rows = {(table, key) for _, table, key, _, tx in seen if tx in bulk}
            if len(rows) < self.min_rows:
                continue
            deleted = {(table, key) for _, table, key, op, tx in seen
                       if op == b"d" and tx in bulk}
            per_table: dict[str, int] = defaultdict(int)
            for table, _ in rows:
                per_table[table] += 1
            found[wedding] = (len(rows), len(deleted), dict(per_table))
        return found

    def raised(self, wedding: str, now: float) -> None:
        self._raised[wedding] = now

    def tier_of(self, wedding: str) -> str:
        return self._tier.get(wedding, "")


class IncidentWatcher:
    def __init__(self, config: Config, dsn: str, keyring: Keyring | None,
                 environ: dict[str, str]) -> None:
        self.config = config
        self.dsn = dsn
        self.keyring = keyring
        self.environ = environ
        settings = config.incidents
        self.detector = IncidentDetector(window_s=settings.window_s, min_rows=settings.min_rows,
                                         cooldown_s=settings.cooldown_s,
                                         bulk_rows=settings.bulk_rows)
        self.total = 0  # wedsync_incidents_total
        self.notified = 0
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        self._stopping.set()

    async def rows_of(self, wedding: str) -> int:
        """The wedding's rows now, in the tables linked to it directly."""
        cal = self.config.priority
        total = 0
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True,
                                                         connect_timeout=10) as conn:
            for table, link in cal.tables.items():
                if link.parent is not None:
                    continue
                query = sql.SQL("SELECT count(*) FROM {} WHERE {}::text = %s").format(
                    sql.Identifier(*split_qualified(table)), sql.Identifier(link.column))
                row = await (await conn.execute(query, (wedding,))).fetchone()
                total += int(row[0]) if row else 0
        return total

    async def check(self, state: CaptureState, now: float) -> list[Incident]:
        raised = []
        settings = self.config.incidents
        for wedding, (touched, deleted, tables) in self.detector.candidates(now).items():
            before = await self.rows_of(wedding) + deleted
            share = touched / max(1, before)
            if share < settings.share:
                continue
            self.detector.raised(wedding, now)
            incident = Incident(
                id=uuid.uuid4().hex[:12], wedding=wedding,
                tier=self.detector.tier_of(wedding), rows_touched=touched,
                rows_before=before, share=round(share, 4),
                since=datetime.fromtimestamp(now - settings.window_s, UTC).isoformat(),
                until=datetime.fromtimestamp(now, UTC).isoformat(),
                detected_at=datetime.now(UTC).isoformat(), tables=tables)
            await state.put(f"incident/{incident.id}", incident.as_json())
            self.total += 1
            log.warning("incident %s: wedding %s (%s): %d of its %d rows deleted or rewritten "
                        "within %.0f s", incident.id, wedding, incident.tier, touched, before,
                        settings.window_s)
            task = asyncio.create_task(self._follow_up(incident))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            raised.append(incident)
        return raised

    async def _follow_up(self, incident: Incident) -> None:
        """Impact over the window, stored beside the record; then the webhooks."""
        report: dict[str, Any] | None = None
        try:
            report = await self._impact(incident)
        except Exception as exc:  # logged: the webhooks still go out
            log.warning("incident %s: impact not computed (%s: %s)", incident.id,
                        type(exc).__name__, exc)
        body = json.dumps({"incident": incident.as_json(), "impact": report},
                          sort_keys=True, default=str).encode()
        for hook in self.config.notify:
            for attempt in range(3):
                try:
                    async with aiohttp.ClientSession() as session, session.post(
                            hook.url, data=body, timeout=aiohttp.ClientTimeout(
                                total=hook.timeout_s),
                            headers={"Content-Type": "application/json"}) as response:
                        if response.status < 300:
                            self.notified += 1
                            break
                        why = f"HTTP {response.status}"
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    why = type(exc).__name__
                log.warning("incident %s: webhook %s failed (%s), try %d of 3", incident.id,
                            hook.display, why, attempt + 1)
                await asyncio.sleep(2 ** attempt)

    async def _impact(self, incident: Incident) -> dict[str, Any] | None:
        if not self.config.destinations or self.keyring is None:
            return None
        from replicator.replay.impact import impact

        dest = self.config.destinations[0]
        store = open_store(dest.url, self.environ)
        until = datetime.fromisoformat(incident.until)
        try:
            deadline = time.monotonic() + self.config.incidents.impact_wait_s
            while time.monotonic() < deadline and not self._stopping.is_set():
                records = await reader.Archive(store, self.keyring).read_timeline()
                if any(p.commit_ts_us >= until.timestamp() * 1e6 for p in records.points):
                    break
                await asyncio.sleep(1)
            found = await impact(store, self.keyring,
                                 since=datetime.fromisoformat(incident.since), until=until,
                                 wedding=incident.wedding, destination=dest.name,
                                 calendar=self.config.priority)
            doc = found.to_dict()
            key = incident_key(incident.id, "impact")
            await store.put(key, encrypt(json.dumps(doc, sort_keys=True, default=str).encode(),
                                         key, self.keyring))
            return doc
        finally:
            await store.close()

    async def run(self) -> None:
        """Watch until stopped; never raises."""
        kafka = self.config.kafka
        tiers = topic_names(kafka.topic_prefix)
        watched = {tiers[t]: t.value for t in tiers if t.value in ("critical", "high")}
        state = CaptureState(kafka.bootstrap_servers, kafka.topic_prefix,
                             kafka.replication_factor)
        consumer: AIOKafkaConsumer | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if consumer is None:
                        consumer = AIOKafkaConsumer(
                            *watched, bootstrap_servers=kafka.bootstrap_servers,
                            group_id=f"{kafka.topic_prefix}.incidents",
                            auto_offset_reset="latest", enable_auto_commit=True)
                        await consumer.start()
                    batch = await consumer.getmany(timeout_ms=500, max_records=5000)
                    now = time.time()
                    for tp, records in batch.items():
                        for record in records:
                            headers = dict(record.headers or ())
                            wedding = headers.get("wedding")
                            if not wedding or record.key is None:
                                continue
                            self.detector.observe(wedding.decode(), watched[tp.topic],
                                                  headers.get("table", b"").decode(),
                                                  record.key, headers.get("op", b""), now,
                                                  headers.get("lsn", b""))
                    await self.check(state, now)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # logged and tried again: never stops the capture
                    log.warning("incident watcher: %s: %s", type(exc).__name__, exc)
                    if consumer is not None:
                        with contextlib.suppress(Exception):
                            await consumer.stop()
                        consumer = None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), 5)
        finally:
            if consumer is not None:
                await consumer.stop()
            await state.close()
            for task in list(self._tasks):
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, 30)
