"""Eve snapshots: `eve.hours_before` (24) before each wedding, the service takes an on-demand
snapshot of that wedding's rows (`ondemand.snapshot_on_demand`, a temporary slot and a fresh
consistent point, beside the stream), so every destination holds a full copy of it as of its
eve, whatever happened to it before.

Every `eve.check_every_s` the capture side of the service asks the calendar
(`priority.weddings_table`) for the weddings whose eve has begun and whose day has not ended
(the date's midnight in `priority.timezone`, minus `hours_before`, up to the end of that day).
A snapshot taken is recorded in the capture's state topic as `eve/<wedding>/<date>` (acks=all)
once every row is acknowledged, so a restart does not take it twice; the sinks archive that
record as `eves/<wedding>/<date>.json` in every destination (`replicator status` shows it).
A failure is logged and tried again at the next check; nothing here can stop the capture.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

from replicator.config import Config
from replicator.events import split_qualified
from replicator.transport.control import CaptureState

log = logging.getLogger(__name__)

__all__ = ["EveSnapshots", "eve_state_key"]


def eve_state_key(wedding: str, day: str) -> str:
    return f"eve/{wedding}/{day}"


class EveSnapshots:
    def __init__(self, config: Config, dsn: str,
                 snapshot: Callable[[str], Awaitable[Any]] | None = None) -> None:
        self.config = config
        self.dsn = dsn
        self._snapshot = snapshot or self._take
        self._stopping = asyncio.Event()
        self.taken = 0  # snapshots taken by this process
        self.failures = 0

    def stop(self) -> None:
        self._stopping.set()

    async def due(self) -> list[tuple[str, str]]:
        """(wedding id, date) of the weddings whose eve has begun and whose day has not ended."""
        cal = self.config.priority
        schema, table = split_qualified(cal.weddings_table)
        day = sql.Identifier(cal.wedding_date_column)
        query = sql.SQL(
            "SELECT {id}::text, {day}::date::text FROM {table} WHERE "
            "({day}::date::timestamp AT TIME ZONE %(tz)s) - make_interval(secs => %(before)s)"
            " <= now() AND ({day}::date::timestamp AT TIME ZONE %(tz)s) + interval '1 day' "
            "> now() ORDER BY {day}, {id}").format(
                id=sql.Identifier(cal.wedding_id_column), day=day,
                table=sql.Identifier(schema, table))
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True,
                                                         connect_timeout=10) as conn:
            cur = await conn.execute(query, {"tz": cal.timezone,
                                             "before": self.config.eve.hours_before * 3600})
            return [(str(r[0]), str(r[1])) for r in await cur.fetchall()]

    async def _take(self, wedding: str) -> Any:
        from replicator.capture import Capture
        from replicator.ondemand import snapshot_on_demand

        return await snapshot_on_demand(Capture(self.config), wedding=wedding)

    async def check(self, state: CaptureState) -> int:
        """One check: every due wedding not snapshotted yet; how many were taken."""
        taken = 0
        for wedding, day in await self.due():
            key = eve_state_key(wedding, day)
            if key in state.entries or self._stopping.is_set():
                continue
            started = time.monotonic()
            result = await self._snapshot(wedding)
            found = getattr(result, "rows", None)  # table -> rows (SnapshotResult)
            rows = sum(found.values()) if isinstance(found, dict) else int(found or 0)
            await state.put(key, {"wedding": wedding, "date": day, "rows": rows,
                                  "lsn": int(getattr(result, "lsn", 0) or 0),
                                  "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime())})
            taken += 1
            self.taken += 1
            log.info("eve snapshot of wedding %s (on %s): %d rows in %.1f s", wedding, day,
                     rows, time.monotonic() - started)
        return taken

    async def run(self) -> None:
        """Check every `eve.check_every_s` until stopped; never raises."""
        if not self.config.eve.enabled or not self.config.priority.weddings_table:
            return
        kafka = self.config.kafka
        state = CaptureState(kafka.bootstrap_servers, kafka.topic_prefix,
                             kafka.replication_factor)
        try:
            while not self._stopping.is_set():
                try:
                    if not state.entries:
                        await state.load()
                    await self.check(state)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # logged and tried again: never stops the capture
                    self.failures += 1
                    log.warning("eve snapshots: %s: %s (tried again in %.0f s)",
                                type(exc).__name__, exc, self.config.eve.check_every_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(),
                                           self.config.eve.check_every_s)
        finally:
            await state.close()
