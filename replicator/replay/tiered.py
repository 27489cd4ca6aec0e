"""A tiered restore (`replay --tiered`): a whole database back into an empty Postgres database
nearest weddings first, in four steps, each its own transaction.

1. The wedding calendar (`[priority]`: the weddings table, its id and date columns) is read
   from the archive as of the point, and each wedding gets the tier its date gives today (the
   calendar's time zone and thresholds, as the capture classifies rows).
2. **critical**, then **high**, then **normal**: the rows of that tier's weddings in every
   table are restored (a wedding restore of the set: only the objects whose header says one
   of them may be inside are read; the transaction records, listing, schemas and headers are
   read once for all the steps) and committed; each step reports when it became usable
   (seconds since the restore started). The first step creates the tables; the next ones add
   their rows to them.
3. **low and the rest**: every table restored whole, as a plain replay does, and put in
   place of the step tables in one transaction (each table dropped and the restored one moved
   in, so nothing is copied twice): rows of low-tier weddings, rows of no wedding or of one
   the calendar does not know, and every row again, exact, whatever the earlier steps saw (a
   row that moved between weddings is right from here on).

Every step restores as of the same commit LSN (the first step resolves `--at`). The target
must not hold any of the tables (refused otherwise: a tiered restore is for rebuilding a lost
database; replace rows of a live one with `--replace-existing` or `rollback`). Readers of the
target see the critical weddings after the first step, complete and consistent for those
weddings as of the point. Without the calendar table in the archive, the restore is one step
(the last), with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.base import ObjectStore
from replicator.archive.merge import ConflictPolicy
from replicator.archive.render import utc_text
from replicator.config import PriorityConfig
from replicator.crypto import Keyring
from replicator.events import Tier, split_qualified
from replicator.position import Lsn
from replicator.priority import WeddingCalendar
from replicator.replay.impact import KeepRows, as_date
from replicator.replay.plan import At, ReplayRefused
from replicator.replay.run import Prepared, apply, prepare
from replicator.replay.swap import Swap, quoted
from replicator.replay.table import TableSchema
from replicator.replay.targets import PostgresTarget

__all__ = ["Step", "TieredSummary", "replay_tiered", "wedding_tiers"]

log = logging.getLogger("replicator.replay")

STEPS = (Tier.CRITICAL, Tier.HIGH, Tier.NORMAL)


@dataclass(slots=True)
class Step:
    tier: str  # critical, high, normal; "rest" for the last step
    weddings: int
    rows: int
    usable_s: float  # since the restore started: when its commit returned
    seconds: float
    objects_read: int

    def to_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "weddings": self.weddings, "rows": self.rows,
                "usable_s": round(self.usable_s, 3), "seconds": round(self.seconds, 3),
                "objects_read": self.objects_read}


@dataclass(slots=True)
class TieredSummary:
    target: Lsn
    target_time: str | None
    destination: str
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0
    calendar: bool = True

    @property
    def rows(self) -> int:
        return self.steps[-1].rows if self.steps else 0

    @property
    def critical_usable_s(self) -> float | None:
        first = next((s for s in self.steps if s.tier == Tier.CRITICAL.value), None)
        return None if first is None else first.usable_s

    def to_dict(self) -> dict[str, Any]:
        return {"tiered": True, "target": str(self.target), "target_time": self.target_time,
                "destination": self.destination, "rows": self.rows,
                "steps": [s.to_dict() for s in self.steps],
                "critical_usable_s": (None if self.critical_usable_s is None
                                      else round(self.critical_usable_s, 3)),
                "seconds": round(self.seconds, 3), "calendar": self.calendar}

    def lines(self) -> list[str]:
        when = f" (committed {self.target_time})" if self.target_time else ""
        out = [f"restored as of LSN {self.target}{when} in {len(self.steps)} step(s), "
               f"{self.rows:,} rows, {self.seconds:.2f} s"]
        for s in self.steps:
            what = (f"{s.weddings} {s.tier} wedding(s)" if s.tier != "rest"
                    else "every table whole (low tier and the rest)")
            out.append(f"  usable at {s.usable_s:7.2f} s: {what}, {s.rows:,} rows, "
                       f"{s.objects_read} objects read")
        return out


async def wedding_tiers(prepared: Prepared, calendar: PriorityConfig
                        ) -> dict[str, Tier] | None:
    """Each wedding of the archived calendar, as of the plan's point, with the tier its date
    gives today; None when the archive holds no calendar table."""
    job = next((j for j in prepared.jobs if j.table == calendar.weddings_table), None)
    if job is None or not calendar.calendar:
        return None
    id_column, date_column = calendar.wedding_id_column, calendar.wedding_date_column
    if id_column not in job.schema.names or date_column not in job.schema.names:
        raise ReplayRefused(f"the calendar {job.table} in the archive has no column "
                            f"{id_column} or {date_column} (see [priority])")
    keep = KeepRows({job.table: {id_column}}, None)
    await apply(dataclasses.replace(prepared, jobs=[job], read_s=0.0), keep)
    classify = WeddingCalendar(calendar)
    return {wedding: classify.tier_for_date(as_date(row[date_column]))
            for row in keep.rows[job.table] if (wedding := row[id_column]) is not None}


class _Step(PostgresTarget):
    """One tier's rows: tables the target lacks are moved in; the rows of the ones an
    earlier step created are added (by key) in one transaction."""

    async def _guard(self, conn: Any, swap: Swap) -> str | None:
        return None  # the tables are the tiered restore's own (checked empty at its start)

    async def commit(self) -> None:
        from psycopg import sql

        assert self._plan is not None
        plan = self._plan

        async def work(conn: Any) -> None:
            for table, schema in sorted(plan.schemas.items()):
                if table not in plan.existing:
                    await conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                        self._staged(table), sql.Identifier(split_qualified(table)[0])))
                    continue
                names = sql.SQL(", ").join(sql.Identifier(c) for c in schema.names)
                insert = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
                    _identifier(table), names, names, self._staged(table))
                others = [c for c in schema.names if c not in schema.primary_key]
                if schema.primary_key:
                    conflict = sql.SQL(", ").join(sql.Identifier(c) for c in schema.primary_key)
                    insert += (sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(
                        conflict, sql.SQL(", ").join(sql.SQL("{0} = excluded.{0}").format(
                            sql.Identifier(c)) for c in others)) if others else
                        sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(conflict))
                await conn.execute(insert)

        await self._final(work)


class _Last(_Step):
    """Every table whole, put in place of the step tables in one transaction."""

    async def prepare(self, schemas: Sequence[TableSchema], *, wedding: str | None = None,
                      point: str | None = None) -> None:
        await super().prepare(schemas, wedding=wedding, point=point)
        assert self._plan is not None
        self._replacing = set(self._plan.existing)
        self._plan.existing = set()  # staged as ordinary (logged) tables: they stay

    async def commit(self) -> None:
        from psycopg import sql

        assert self._plan is not None
        plan = self._plan

        async def work(conn: Any) -> None:
            for table in sorted(plan.schemas):
                if table in self._replacing:
                    await conn.execute(sql.SQL("DROP TABLE {}").format(_identifier(table)))
                await conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(
                    self._staged(table), sql.Identifier(split_qualified(table)[0])))

        await self._final(work)


async def _refuse_existing(target: PostgresTarget, tables: Sequence[str]) -> None:
    conn = await target._connect(autocommit=True)
    try:
        found = []
        for table in tables:
            cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (quoted(table),))
            if (await cur.fetchone())[0]:
                found.append(table)
    finally:
        await conn.close()
    if found:
        raise ReplayRefused(f"the target database already has {', '.join(found)}: a tiered "
                            "restore rebuilds into an empty database (to replace rows of a "
                            "live one, use --replace-existing without --tiered, or rollback)")


async def replay_tiered(store: ObjectStore, keyring: Keyring, dsn: str, *, at: At,
                        calendar: PriorityConfig | None = None,
                        tables: Sequence[str] | None = None, destination: str | None = None,
                        jobs: int = 4, allow_stale: bool = False, heartbeat_s: float = 10.0,
                        create_database: bool = False,
                        on_step: Callable[[Step], None] | None = None,
                        policies: Mapping[str, ConflictPolicy] | None = None) -> TieredSummary:
    """The tiered restore of the module docstring; *on_step* is told of each step as it
    becomes usable; *policies*: the conflict rules by table (`run.prepare`)."""
    started = time.perf_counter()
    calendar = calendar or PriorityConfig()
    full = await prepare(store, keyring, at=at, tables=tables, destination=destination,
                         allow_stale=allow_stale, heartbeat_s=heartbeat_s, policies=policies)
    point = full.plan.target
    ts = full.archive.timeline.times.get(int(point))
    summary = TieredSummary(point, utc_text(ts) if ts is not None else None, full.destination)
    selected = [j.table for j in full.jobs]
    first = PostgresTarget(dsn, create_database=create_database)
    await _refuse_existing(first, selected)
    tiers = await wedding_tiers(full, calendar)
    if tiers is None:
        summary.calendar = False
        log.warning("the archive holds no calendar table %s: restoring in one step",
                    calendar.weddings_table or "(none configured)")

    def done(step: Step) -> None:
        summary.steps.append(step)
        if on_step is not None:
            on_step(step)

    for tier in STEPS if tiers is not None else ():
        assert tiers is not None
        ids = frozenset(w for w, t in tiers.items() if t is tier)
        if not ids:
            continue
        began = time.perf_counter()
        reads = full.archive.objects_read
        step = await prepare(store, keyring, at=point, tables=selected,
                             destination=full.destination, weddings=ids,
                             label=f"the {tier.value} weddings", facts=full.facts,
                             policies=policies)
        result = await apply(step, _Step(dsn, replace_existing=True), jobs=jobs)
        now = time.perf_counter()
        done(Step(tier.value, len(ids), result.rows, now - started, now - began,
                  result.objects_read - reads))
    began = time.perf_counter()
    reads = full.archive.objects_read
    result = await apply(full, _Last(dsn, replace_existing=True), jobs=jobs)
    now = time.perf_counter()
    done(Step("rest", 0, result.rows, now - started, now - began,
              result.objects_read - reads))
    summary.seconds = now - started
    return summary


def _identifier(table: str) -> Any:
    from psycopg import sql

    return sql.Identifier(*split_qualified(table))
