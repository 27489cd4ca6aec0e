"""Wedding tiers from the calendar, kept current from the change stream."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from replicator.config import PriorityConfig, WeddingLink
from replicator.events import ChangeEvent, Op, Tier
from replicator.position import ChangePosition, Lsn

TODAY = date(2026, 11, 28)  # a Saturday


def event(table: str, op: Op = Op.CREATE, after: dict[str, object] | None = None,
          before: dict[str, object] | None = None) -> ChangeEvent:
    return ChangeEvent(op, "public", table, ChangePosition(Lsn(1), 0), 0, 1, {}, before, after)


def calendar(**tables: WeddingLink):  # type: ignore[no-untyped-def]
    from replicator.priority import WeddingCalendar

    cfg = PriorityConfig(tables={f"public.{k}": v for k, v in tables.items()})
    return WeddingCalendar(cfg, today=lambda: TODAY)


@pytest.mark.parametrize(("days", "tier"), [
    (0, Tier.CRITICAL), (7, Tier.CRITICAL), (8, Tier.HIGH), (30, Tier.HIGH), (31, Tier.NORMAL),
    (90, Tier.NORMAL), (91, Tier.LOW), (-1, Tier.LOW)])
def test_boundaries(days: int, tier: Tier) -> None:
    assert calendar().tier_for_date(TODAY + timedelta(days=days)) is tier


def test_weddings_table_changes_update_the_calendar_before_classifying() -> None:
    cal = calendar(guests=WeddingLink(column="wedding_id"))
    w = event("weddings", after={"id": 42, "wedding_date": TODAY + timedelta(days=3)})
    cal.classify(w)
    assert (w.tier, w.wedding_id) == (Tier.CRITICAL, "42")
    g = event("guests", after={"id": 1, "wedding_id": 42})
    cal.classify(g)
    assert (g.tier, g.wedding_id) == (Tier.CRITICAL, "42")
    # The wedding moves out by two months: later changes of its rows drop a tier.
    cal.classify(event("weddings", Op.UPDATE,
                       after={"id": 42, "wedding_date": TODAY + timedelta(days=60)}))
    g2 = event("guests", Op.UPDATE, after={"id": 1, "wedding_id": 42})
    cal.classify(g2)
    assert g2.tier is Tier.NORMAL


def test_link_through_a_parent_table() -> None:
    cal = calendar(payments=WeddingLink(column="booking_id", parent="public.bookings"),
                   bookings=WeddingLink(column="wedding_id"))
    cal.dates["7"] = TODAY + timedelta(days=20)
    cal.classify(event("bookings", after={"id": 900, "wedding_id": 7}))
    p = event("payments", after={"id": 1, "booking_id": 900})
    cal.classify(p)
    assert (p.tier, p.wedding_id) == (Tier.HIGH, "7")


def test_unresolved_wedding_gets_default_tier_and_is_counted() -> None:
    cal = calendar(guests=WeddingLink(column="wedding_id"))
    g = event("guests", after={"id": 1, "wedding_id": 999})
    cal.classify(g)
    assert (g.tier, g.wedding_id, cal.unresolved) == (Tier.LOW, "999", 1)


def test_unlinked_tables_and_deleted_weddings() -> None:
    cal = calendar()
    other = event("invoices", after={"id": 1})
    cal.classify(other)
    assert other.tier is Tier.LOW and other.wedding_id is None
    cal.classify(event("weddings", after={"id": 5, "wedding_date": TODAY}))
    cal.classify(event("weddings", Op.DELETE, before={"id": 5}))
    assert "5" not in cal.dates


def test_today_is_read_again_at_midnight_in_the_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    import replicator.priority as priority

    now = [0.0]
    monkeypatch.setattr(priority.time, "time", lambda: now[0])
    # Sao Paulo's clocks went from 00:00 to 01:00 on 2018-11-04: that day began at 01:00.
    for zone, first in (("UTC", datetime(2026, 11, 28, 23, 59, 58, tzinfo=UTC)),
                        ("America/Sao_Paulo", datetime(2018, 11, 4, 2, 59, 58, tzinfo=UTC))):
        today = priority._today(zone)
        for step in range(0, 5):
            now[0] = first.timestamp() + step * 0.5
            assert today() == datetime.fromtimestamp(now[0], ZoneInfo(zone)).date(), (zone, step)
