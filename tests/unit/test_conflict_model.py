"""The conflict rules against an independent model.

`model` below is written from the rules as the README states them, not from
`archive.merge`: per origin the version at the highest position (a truncate of the table
counts as a delete of every key at its position); across origins the contenders are the
versions at most the window older than the latest (a snapshot row counting as time 0); among
them the highest-ranked role, then the later commit, then the greater origin name (no origin
lowest). With column groups the contest is held again per group among the origins whose
version is a live row, and the group's columns come from its winner. Hypothesis draws
versions from several origins and rules, and every arrival order with duplicates must give
the model's state."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.archive.merge import ConflictPolicy, Merger, Tombstone
from replicator.events import ChangeEvent, Op
from replicator.position import ChangePosition, Lsn

TABLE = "timeline_items"
ROLE = "role"
ROLES = ("venue", "planner", "photographer", "florist", "couple", "caterer")
COLUMNS = ("starts_at", "ends_at", "notes")
ORIGINS = (None, "eu", "us")


def event(origin: str | None, op: str, key: int, lsn: int, seq: int, ts: int,
          row: dict[str, Any] | None, before: dict[str, Any] | None) -> ChangeEvent:
    return ChangeEvent(Op(op), "public", TABLE, ChangePosition(Lsn(lsn), seq), ts, lsn,
                       {} if op == "t" else {"id": key}, before,
                       None if op in "dt" else {"id": key, **(row or {})}, (), origin)


@st.composite
def versions(draw: st.DrawFn) -> list[ChangeEvent]:
    out = []
    for origin in ORIGINS:
        positions = draw(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 2)),
                                  unique=True, max_size=8))
        for lsn, seq in positions:
            op = draw(st.sampled_from("cuuudrt" if origin is None else "cuuudt"))
            key = draw(st.integers(1, 3))
            ts = draw(st.integers(1, 60))
            role = draw(st.sampled_from((*ROLES, None)))
            row = {ROLE: role, **{c: draw(st.integers(0, 4)) for c in COLUMNS}}
            before = draw(st.sampled_from(({"id": key}, {"id": key, ROLE: role})))
            out.append(event(origin, op, key, lsn, seq, ts, row, before))
    return out


@st.composite
def policies(draw: st.DrawFn) -> ConflictPolicy:
    window = draw(st.integers(0, 30))
    precedence = tuple(draw(st.permutations(ROLES))[:draw(st.integers(0, len(ROLES)))])
    groups: dict[str, tuple[str, ...]] | None = draw(st.sampled_from((
        None, {"schedule": ("starts_at", "ends_at")},
        {"schedule": ("starts_at", "ends_at"), "notes": ("notes",)})))
    group_precedence = None
    if groups and "notes" in groups and draw(st.booleans()):
        group_precedence = {"notes": tuple(draw(st.permutations(ROLES))[:3])}
    return ConflictPolicy(window, precedence, ROLE, groups, group_precedence)


# --- the model ---------------------------------------------------------------------------


def model(all_versions: list[ChangeEvent], policy: ConflictPolicy
          ) -> dict[int, dict[str, Any] | None]:
    """key -> the row's columns, or None when the key is deleted."""
    unique = {(v.origin, v.position): v for v in all_versions}.values()
    truncates = [v for v in unique if v.op is Op.TRUNCATE]
    keys = sorted({v.key["id"] for v in unique if v.op is not Op.TRUNCATE})
    result: dict[int, dict[str, Any] | None] = {}
    for key in keys:
        mine = [v for v in unique if v.op is not Op.TRUNCATE and v.key["id"] == key]
        candidates = []
        for origin in ORIGINS:
            own = [v for v in mine + truncates if v.origin == origin]
            if not own:
                continue
            newest = max(own, key=lambda v: v.position)
            if newest.op is Op.TRUNCATE:
                candidates.append((origin, None, newest.commit_ts_us, None))
            elif newest.op is Op.DELETE:
                role = (newest.before or {}).get(ROLE)
                candidates.append((origin, None, newest.commit_ts_us, role))
            else:
                time = 0 if newest.op is Op.READ else newest.commit_ts_us
                after = dict(newest.after or {})
                candidates.append((origin, after, time, after.get(ROLE)))
        winner = contest(candidates, policy.precedence, policy.window_us)
        if winner[1] is None:
            result[key] = None
            continue
        row = dict(winner[1])
        live = [c for c in candidates if c[1] is not None]
        if policy.column_groups and len(live) >= 2:
            for group, columns in policy.column_groups.items():
                order = (policy.group_precedence or {}).get(group, policy.precedence)
                group_winner = contest(live, order, policy.window_us)
                for column in columns:
                    row[column] = group_winner[1][column]  # type: ignore[index]
        result[key] = row
    return result


def contest(candidates: list[tuple[str | None, dict[str, Any] | None, int, str | None]],
            order: tuple[str, ...], window: int
            ) -> tuple[str | None, dict[str, Any] | None, int, str | None]:
    latest = max(c[2] for c in candidates)
    contenders = [c for c in candidates if latest - c[2] <= window]

    def rank(role: str | None) -> int:
        return len(order) - order.index(role) if role in order else 0

    def origin_order(origin: str | None) -> tuple[int, str]:
        return (0, "") if origin is None else (1, origin)

    return max(contenders, key=lambda c: (rank(c[3]), c[2], origin_order(c[0])))


def merged(arrivals: list[ChangeEvent], policy: ConflictPolicy
           ) -> dict[int, dict[str, Any] | None]:
    merger = Merger({f"public.{TABLE}": policy})
    for version in arrivals:
        merger.add(version)
    out: dict[int, dict[str, Any] | None] = {}
    for (_, key), state in merger.state().items():
        ident = int(key.split(":")[1].rstrip("}"))
        out[ident] = None if isinstance(state, Tombstone) else dict(state.after or {})
    return out


@settings(max_examples=300, deadline=None)
@given(all_versions=versions(), policy=policies(), data=st.data())
def test_every_arrival_order_with_duplicates_gives_the_models_state(
        all_versions: list[ChangeEvent], policy: ConflictPolicy, data: st.DataObject) -> None:
    expected = model(all_versions, policy)
    for _ in range(3):
        arrivals = data.draw(st.permutations(all_versions + data.draw(
            st.lists(st.sampled_from(all_versions), max_size=4) if all_versions
            else st.just([]))))
        assert merged(arrivals, policy) == expected
