"""Wedding tier of each change: how many days until the wedding the row belongs to.

critical: the wedding is today or within `critical_days` (default 7); high: within
`high_days` (30); normal: within `normal_days` (90); low: later, already past, or unknown.
Rows of tables with no configured link to a wedding get `default_tier`.

The calendar (wedding id -> date, and parent key -> wedding id for tables linked through a
parent) is warmed by one query per table at start-up and then kept current from the change
stream itself: a change to the weddings table or to a parent table updates it before the
change is classified, so no query runs per change.

A delete under the default replica identity carries only the row's key, so its wedding is
unknown and it gets `default_tier`; tables whose deletes must travel with their wedding's tier
need `REPLICA IDENTITY FULL` (or the link column in the primary key).

A wedding id that does not resolve (a row pointing at a wedding the calendar has never seen)
is not an error that stops capture: the change gets `default_tier`, the id is kept on the
event, and `unresolved` counts it so the operator sees it in the metrics.

Without a calendar in the configuration (no `[priority]` section, or `weddings_table = ""`)
every change gets `default_tier` and nothing is queried; the capture says so once at start.
A configured weddings table (or parent table, or column) that the database lacks is
`CalendarMissing`, an operator's error: capture stops with exit 2 rather than guess tiers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql

from replicator.config import PriorityConfig, WeddingLink
from replicator.errors import OperatorError
from replicator.events import ChangeEvent, Op, Tier, split_qualified

log = logging.getLogger(__name__)


class CalendarMissing(OperatorError):
    """The configured wedding calendar is not in the database."""


def _today(zone: str) -> Callable[[], date]:
    """Today in *zone*. Asked once per change, so the day is read from the clock again only
    at the next midnight there (and at least every second, should the clock be set)."""
    tz = ZoneInfo(zone)
    day, until = date.min, 0.0

    def today() -> date:
        nonlocal day, until
        now = time.time()
        if now < until:
            return day
        day = datetime.fromtimestamp(now, tz).date()
        midnight = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=tz)
        until = min(midnight.timestamp(), now + 1.0)
        return day

    return today


def _as_date(value: object) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return None  # NULL, or an Infinity marker: no wedding day to count towards


_CRITICAL, _HIGH, _NORMAL, _LOW = Tier.CRITICAL, Tier.HIGH, Tier.NORMAL, Tier.LOW


class WeddingCalendar:
    def __init__(self, config: PriorityConfig, today: Callable[[], date] | None = None) -> None:
        self.config = config
        self.today = today or _today(config.timezone)
        self.dates: dict[str, date | None] = {}
        # parent table -> parent key (as text) -> wedding id (as text)
        self.parents: dict[str, dict[str, str]] = {
            link.parent: {} for link in config.tables.values() if link.parent is not None
        }
        self.unresolved = 0
        self._parent_links = {
            link.parent: link for link in config.tables.values() if link.parent is not None
        }
        # The configuration is frozen: what classifying reads for every change, read once.
        self._calendar = config.calendar
        self._weddings_table = config.weddings_table
        self._links = config.tables
        self._default_tier = config.default_tier

    # --- warm-up --------------------------------------------------------------------------

    async def warm(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """One query for the weddings table, one per parent table (none without a calendar).
        `CalendarMissing` when a configured table or column is not there."""
        if not self.config.calendar:
            return
        try:
            await self._warm(conn)
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn,
                psycopg.errors.InvalidSchemaName) as exc:
            raise CalendarMissing(
                f"the wedding calendar cannot be read ({exc.diag.message_primary}): create it, "
                f"correct [priority] (weddings_table {self.config.weddings_table}, its columns "
                f"and priority.tables), or capture without tiers: remove [priority] or set "
                f'weddings_table = ""') from None

    async def _warm(self, conn: psycopg.AsyncConnection[Any]) -> None:
        c = self.config
        query = sql.SQL("SELECT {}::text, {} FROM {}").format(
            sql.Identifier(c.wedding_id_column), sql.Identifier(c.wedding_date_column),
            sql.Identifier(*split_qualified(c.weddings_table)))
        cur = await conn.execute(query)
        self.dates = {str(wid): _as_date(day) for wid, day in await cur.fetchall()}
        for parent, link in self._parent_links.items():
            query = sql.SQL("SELECT {}::text, {}::text FROM {} WHERE {} IS NOT NULL").format(
                sql.Identifier(link.parent_key), sql.Identifier(link.parent_wedding_column),
                sql.Identifier(*split_qualified(parent)),
                sql.Identifier(link.parent_wedding_column))
            cur = await conn.execute(query)
            self.parents[parent] = {str(k): str(w) for k, w in await cur.fetchall()}
        log.info("wedding calendar warmed: %d weddings, %d parent tables",
                 len(self.dates), len(self.parents))

    # --- classification -------------------------------------------------------------------

    def tier_for_date(self, day: date | None) -> Tier:
        if day is None:
            return _LOW
        days = (day - self.today()).days
        c = self.config
        if days < 0:
            return _LOW
        if days <= c.critical_days:
            return _CRITICAL
        if days <= c.high_days:
            return _HIGH
        if days <= c.normal_days:
            return _NORMAL
        return _LOW

    def tier_for_wedding(self, wedding_id: str) -> Tier:
        dates = self.dates
        if wedding_id not in dates:
            self.unresolved += 1
            return self._default_tier
        return self.tier_for_date(dates[wedding_id])

    def classify(self, event: ChangeEvent) -> None:
        """Set `event.tier` and `event.wedding_id`, learning from the event first."""
        if not self._calendar:
            event.tier = self._default_tier
            return
        qualified = event.qualified_table
        # As `observe`, for every change: only the weddings and parent tables teach.
        if qualified == self._weddings_table:
            self._observe_wedding(event)
        elif qualified in self.parents:
            self._observe_parent(qualified, event)
        row = event.after if event.after is not None else event.before
        wedding_id: str | None = None
        if qualified == self._weddings_table:
            wedding_id = _text(row, self.config.wedding_id_column)
        else:
            link = self._links.get(qualified)
            if link is None:
                event.tier = self._default_tier
                return
            wedding_id = self._wedding_of(link, row)
        event.wedding_id = wedding_id
        event.tier = (self._default_tier if wedding_id is None
                      else self.tier_for_wedding(wedding_id))

    def observe(self, event: ChangeEvent) -> None:
        """Keep the calendar current from the weddings table's and parent tables' changes."""
        qualified = event.qualified_table
        c = self.config
        if qualified == c.weddings_table:
            self._observe_wedding(event)
        elif qualified in self.parents:
            self._observe_parent(qualified, event)

    def _observe_wedding(self, event: ChangeEvent) -> None:
        c = self.config
        if event.op is Op.TRUNCATE:
            self.dates.clear()
            return
        if event.op is Op.DELETE:
            wid = _text(event.before or event.key, c.wedding_id_column)
            if wid is not None:
                self.dates.pop(wid, None)
            return
        after = event.after or {}
        wid = _text(after, c.wedding_id_column)
        if wid is None:
            return
        if event.before is not None:
            old = _text(event.before, c.wedding_id_column)
            if old is not None and old != wid:
                self.dates.pop(old, None)
        if c.wedding_date_column in after:  # absent only when unchanged (TOAST): keep the old
            self.dates[wid] = _as_date(after[c.wedding_date_column])
        else:
            self.dates.setdefault(wid, None)

    def _observe_parent(self, parent: str, event: ChangeEvent) -> None:
        link = self._parent_links[parent]
        known = self.parents[parent]
        if event.op is Op.TRUNCATE:
            known.clear()
            return
        if event.op is Op.DELETE:
            key = _text(event.before or event.key, link.parent_key)
            if key is not None:
                known.pop(key, None)
            return
        after = event.after or {}
        key = _text(after, link.parent_key)
        wedding = _text(after, link.parent_wedding_column)
        if key is not None and wedding is not None:
            known[key] = wedding

    def _wedding_of(self, link: WeddingLink, row: Mapping[str, Any] | None) -> str | None:
        value = _text(row, link.column)
        if value is None or link.parent is None:
            return value
        wedding = self.parents[link.parent].get(value)
        if wedding is None:
            self.unresolved += 1
        return wedding


def _text(row: Mapping[str, Any] | None, column: str) -> str | None:
    if not row:
        return None
    value = row.get(column)
    return None if value is None else str(value)


async def wedding_day(conn: Any, calendar: PriorityConfig) -> str | None:
    """What makes now a wedding day by *calendar* in the database of *conn* (a Saturday with
    weddings upcoming, a wedding today or tomorrow), or None; `psycopg.Error` when the
    calendar cannot be read."""
    schema, table = split_qualified(calendar.weddings_table)
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (
        '"' + schema.replace('"', '""') + '"."' + table.replace('"', '""') + '"',))
    row = await cur.fetchone()
    if not row or not row[0]:
        return None
    day = sql.Identifier(calendar.wedding_date_column)
    query = sql.SQL(
        "WITH today AS (SELECT (now() AT TIME ZONE %s)::date AS d) "
        "SELECT extract(isodow FROM (SELECT d FROM today)) = 6, "
        "count(*) FILTER (WHERE {day}::date BETWEEN (SELECT d FROM today) "
        "AND (SELECT d FROM today) + 1), "
        "count(*) FILTER (WHERE {day}::date >= (SELECT d FROM today)) FROM {table}").format(
            day=day, table=sql.Identifier(schema, table))
    cur = await conn.execute(query, (calendar.timezone,))
    saturday, soon, upcoming = await cur.fetchone()
    found = ([f"it is Saturday and {upcoming} wedding(s) in {calendar.weddings_table} are "
              "upcoming"] if saturday and upcoming else []) + (
        [f"{soon} wedding(s) in {calendar.weddings_table} are today or tomorrow"]
        if soon else [])
    return " and ".join(found) if found else None
