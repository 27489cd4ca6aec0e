"""Conflict rules: a key's state is a function of the set of versions received, whatever their
order or duplicates; per origin the highest position wins; across origins commit time, then
(inside the conflict window) the writer's role, then commit time, then origin name."""

from __future__ import annotations

import dataclasses
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.archive.merge import (
    LATEST_WINS,
    ConflictDecision,
    ConflictPolicy,
    ConflictReason,
    KeyState,
    MergeKey,
    Merger,
    Tombstone,
    VersionRef,
    merge,
    merge_key,
)
from replicator.events import ChangeEvent, Op
from replicator.position import ChangePosition, Lsn

TABLE = "vendors"
QT = f"public.{TABLE}"
ROLES = ("venue", "planner", "photographer", "florist", "couple")
ROLE = "updated_by_role"
POLICY = ConflictPolicy(window_us=10, precedence=ROLES, role_column=ROLE)
GROUPED = ConflictPolicy(
    window_us=10, precedence=ROLES, role_column=ROLE,
    column_groups={"timing": ("start",), "menu": ("menu", "body")},
    group_precedence={"menu": ("couple", "planner")},
)


def ev(op: str, key: int = 1, lsn: int = 1, seq: int = 0, *, ts: int = 0,
       origin: str | None = None, after: dict[str, Any] | None = None,
       unchanged: tuple[str, ...] = (), before: dict[str, Any] | None = None,
       table: str = TABLE) -> ChangeEvent:
    if after is None and op in "cur":
        after = {"id": key}
    return ChangeEvent(Op(op), "public", table, ChangePosition(Lsn(lsn), seq), ts, lsn,
                       {} if op == "t" else {"id": key}, before, after, unchanged, origin)


def k(key: int = 1, table: str = TABLE) -> MergeKey:
    return merge_key(ev("c", key, table=table))


def ref(state: KeyState, role: str | None) -> VersionRef:
    return VersionRef(state.origin, state.position, state.commit_ts_us, state.op, role)


# --- strategies --------------------------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn, origins: tuple[str | None, ...] = (None,),
              tables: tuple[str, ...] = (TABLE,)) -> list[ChangeEvent]:
    """Versions of a few keys from each origin, one change per (origin, position)."""
    events = []
    for origin in origins:
        positions = draw(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 2)),
                                  unique=True, max_size=10))
        for lsn, seq in positions:
            op = draw(st.sampled_from("ccuuuudrt"))
            table = draw(st.sampled_from(tables))
            key = draw(st.integers(1, 3))
            ts = draw(st.integers(0, 40))
            role = draw(st.sampled_from((*ROLES, "caterer", None)))
            row: dict[str, Any] = {"id": key, "start": draw(st.integers(0, 3)),
                                   "menu": draw(st.integers(0, 3)),
                                   "body": draw(st.text("ab", max_size=2))}
            if role is not None:
                row[ROLE] = role
            unchanged: tuple[str, ...] = ()
            if op == "u":
                unchanged = tuple(draw(st.sets(st.sampled_from(["body", "menu"]))))
                for column in unchanged:
                    del row[column]
            after = row if op in "cur" else None
            before = {"id": key, ROLE: role} if op == "d" else None
            events.append(ev(op, key, lsn, seq, ts=ts, origin=origin, after=after,
                             unchanged=unchanged, before=before, table=table))
    return events


def arrivals(versions: list[ChangeEvent]) -> st.SearchStrategy[list[ChangeEvent]]:
    """The same versions in any order, some of them several times."""
    if not versions:
        return st.just([])
    return st.lists(st.sampled_from(versions), max_size=10).flatmap(
        lambda extra: st.permutations(versions + extra))


def highest_position_wins(versions: list[ChangeEvent]) -> dict[MergeKey, KeyState]:
    """The single-origin rule written out by brute force, as the oracle."""
    truncates = [v for v in versions if v.op is Op.TRUNCATE]
    rows = [v for v in versions if v.op is not Op.TRUNCATE]
    result: dict[MergeKey, KeyState] = {}
    for key in {merge_key(v) for v in rows}:
        mine = [v for v in rows if merge_key(v) == key]
        mine += [t for t in truncates if t.qualified_table == key[0]]
        mine.sort(key=lambda v: v.position, reverse=True)
        head = mine[0]
        if head.op in (Op.DELETE, Op.TRUNCATE):
            result[key] = Tombstone(head.position, head.commit_ts_us, head.origin, head.op)
            continue
        after, missing = dict(head.after or {}), set()
        for column in head.unchanged:
            for older in mine[1:]:
                if older.op in (Op.DELETE, Op.TRUNCATE):
                    missing.add(column)
                    break
                if column in (older.after or {}):
                    after[column] = (older.after or {})[column]
                    break
            else:
                missing.add(column)
        result[key] = dataclasses.replace(head, after=after, unchanged=tuple(sorted(missing)))
    return result


# --- properties --------------------------------------------------------------------------

SCENARIOS = [
    pytest.param((None,), LATEST_WINS, id="single-origin"),
    pytest.param(("eu", "us"), POLICY, id="two-origins"),
    pytest.param((None, "eu", "us"), POLICY, id="three-origins"),
    pytest.param((None, "eu", "us"), GROUPED, id="column-groups"),
]


@pytest.mark.parametrize(("origins", "policy"), SCENARIOS)
@given(data=st.data())
def test_any_permutation_with_duplicates_converges(
        origins: tuple[str | None, ...], policy: ConflictPolicy, data: st.DataObject) -> None:
    versions = data.draw(histories(origins, tables=(TABLE, "tasks")))
    received = data.draw(arrivals(versions))
    first: list[ConflictDecision] = []
    second: list[ConflictDecision] = []
    expected = merge(versions, {QT: policy}, on_decision=first.append)
    assert merge(received, {QT: policy}, on_decision=second.append) == expected
    assert Counter(second) == Counter(first)
    assert len(set(first)) == len(first)


@given(data=st.data())
def test_single_origin_result_is_the_highest_position(data: st.DataObject) -> None:
    versions = data.draw(histories((None,), tables=(TABLE, "tasks")))
    received = data.draw(arrivals(versions))
    decisions: list[ConflictDecision] = []
    assert merge(received, {QT: POLICY}, on_decision=decisions.append) == \
        highest_position_wins(versions)
    assert decisions == []


@given(data=st.data())
def test_incremental_merger_matches_batch_and_reports_each_decision_once(
        data: st.DataObject) -> None:
    versions = data.draw(histories(("eu", "us")))
    received = data.draw(arrivals(versions))
    reported: list[ConflictDecision] = []
    merger = Merger({QT: GROUPED}, on_decision=reported.append)
    for event in received:
        merger.add(event)
        if data.draw(st.booleans()):
            merger.state()
    final: list[ConflictDecision] = []
    assert merger.state() == merge(versions, {QT: GROUPED}, on_decision=final.append)
    assert set(final) <= set(reported)
    count = len(reported)
    merger.state()
    assert len(reported) == count  # reading again reports nothing new
    assert len(merger) == len({merge_key(v) for v in versions if v.op is not Op.TRUNCATE})


@given(data=st.data())
def test_a_delete_is_never_resurrected_by_older_versions(data: st.DataObject) -> None:
    older = data.draw(histories((None,)))
    delete = ev("d", 2, lsn=31, ts=0)
    received = [delete, *data.draw(arrivals(older))]
    assert merge(received)[k(2)] == Tombstone(delete.position, 0, None, Op.DELETE)


@given(ts_a=st.integers(0, 10_000), gap=st.integers(0, 50), window=st.integers(0, 50),
       roles=st.permutations(ROLES))
def test_within_the_window_precedence_decides(ts_a: int, gap: int, window: int,
                                              roles: list[str]) -> None:
    strong, weak = roles[0], roles[1]
    if ROLES.index(strong) > ROLES.index(weak):
        strong, weak = weak, strong
    ts_strong, ts_weak = ts_a, ts_a + min(gap, window)  # the weaker writer is later, in window
    a = ev("u", lsn=5, ts=ts_strong, origin="us", after={"id": 1, ROLE: strong})
    b = ev("u", lsn=9, ts=ts_weak, origin="eu", after={"id": 1, ROLE: weak})
    decisions: list[ConflictDecision] = []
    policy = ConflictPolicy(window, ROLES, ROLE)
    assert merge([b, a], {QT: policy}, on_decision=decisions.append)[k()] == a
    assert decisions == [ConflictDecision(k(), None, ref(a, strong), ref(b, weak),
                                          ConflictReason.PRECEDENCE)]


@given(ts=st.integers(0, 10_000), window=st.integers(0, 50), beyond=st.integers(1, 1_000),
       roles=st.permutations(ROLES))
def test_outside_the_window_commit_time_decides(ts: int, window: int, beyond: int,
                                                roles: list[str]) -> None:
    early = ev("u", lsn=9, ts=ts, origin="us", after={"id": 1, ROLE: roles[0]})
    late = ev("u", lsn=5, ts=ts + window + beyond, origin="eu", after={"id": 1, ROLE: roles[1]})
    decisions: list[ConflictDecision] = []
    policy = ConflictPolicy(window, ROLES, ROLE)
    assert merge([early, late], {QT: policy}, on_decision=decisions.append)[k()] == late
    assert decisions == [ConflictDecision(k(), None, ref(late, roles[1]), ref(early, roles[0]),
                                          ConflictReason.OUTSIDE_WINDOW)]


@given(ts=st.integers(0, 10_000), gap=st.integers(0, 10), role=st.sampled_from((*ROLES, None)))
def test_same_rank_ties_break_by_commit_time_then_origin_name(ts: int, gap: int,
                                                              role: str | None) -> None:
    row = {"id": 1} if role is None else {"id": 1, ROLE: role}
    a = ev("u", lsn=3, ts=ts, origin="alpha", after=row)
    b = ev("u", lsn=2, ts=ts + gap, origin="beta", after=row)
    decisions: list[ConflictDecision] = []
    assert merge([a, b], {QT: POLICY}, on_decision=decisions.append)[k()] == b
    reason = ConflictReason.COMMIT_TIME if gap else ConflictReason.ORIGIN
    assert decisions == [ConflictDecision(k(), None, ref(b, role), ref(a, role), reason)]


# --- examples ----------------------------------------------------------------------------


def test_reordered_tier_topics_and_duplicates_keep_the_newest_version() -> None:
    insert = ev("c", lsn=10, after={"id": 1, "name": "Rose & Co"})
    update = ev("u", lsn=20, after={"id": 1, "name": "Rose and Co"})
    assert merge([update, insert, update, insert]) == {k(): update}


def test_several_changes_of_one_transaction_are_ordered_by_seq() -> None:
    first = ev("u", lsn=10, seq=0, after={"id": 1, "name": "a"})
    second = ev("u", lsn=10, seq=1, after={"id": 1, "name": "b"})
    assert merge([second, first])[k()] == second


def test_snapshot_rows_are_versions_at_their_position() -> None:
    snapshot = ev("r", lsn=50, seq=7, after={"id": 1, "name": "snap"})
    before_snapshot = ev("u", lsn=40, after={"id": 1, "name": "old"})
    after_snapshot = ev("u", lsn=60, after={"id": 1, "name": "new"})
    assert merge([snapshot, before_snapshot])[k()] == snapshot
    assert merge([after_snapshot, snapshot])[k()] == after_snapshot


def test_truncate_deletes_older_rows_of_its_table_only() -> None:
    old = ev("c", 1, lsn=10)
    newer = ev("c", 2, lsn=30)
    other_table = ev("c", 1, lsn=10, table="tasks")
    truncate = ev("t", lsn=20, ts=99)
    state = merge([truncate, old, newer, other_table])  # the truncate arrives first
    assert state == {k(1): Tombstone(truncate.position, 99, None, Op.TRUNCATE),
                     k(2): newer, k(1, "tasks"): other_table}


def test_unchanged_toast_value_is_filled_from_the_previous_version() -> None:
    insert = ev("c", lsn=10, after={"id": 1, "notes": "long text", "n": 1})
    update = ev("u", lsn=20, after={"id": 1, "n": 2}, unchanged=("notes",))
    filled = dataclasses.replace(update, after={"id": 1, "n": 2, "notes": "long text"},
                                 unchanged=())
    assert merge([update])[k()] == update  # the previous version is not known yet
    assert merge([update, insert])[k()] == filled  # a late older version fills the gap
    assert merge([insert, update])[k()] == filled


def test_unchanged_toast_value_skips_versions_that_did_not_carry_it() -> None:
    insert = ev("c", lsn=10, after={"id": 1, "notes": "v1", "n": 0})
    first = ev("u", lsn=20, after={"id": 1, "n": 1}, unchanged=("notes",))
    second = ev("u", lsn=30, after={"id": 1, "n": 2}, unchanged=("notes",))
    state = merge([second, insert, first])[k()]
    assert isinstance(state, ChangeEvent)
    assert state.after == {"id": 1, "n": 2, "notes": "v1"}


def test_unchanged_toast_value_is_not_inherited_across_a_delete() -> None:
    insert = ev("c", lsn=10, after={"id": 1, "notes": "before delete"})
    delete = ev("d", lsn=20)
    update = ev("u", lsn=30, after={"id": 1}, unchanged=("notes",))
    assert merge([insert, delete, update])[k()] == update


def test_unchanged_toast_value_comes_only_from_the_same_origin() -> None:
    other = ev("c", lsn=10, ts=0, origin="eu", after={"id": 1, "notes": "eu text"})
    update = ev("u", lsn=20, ts=100, origin="us", after={"id": 1}, unchanged=("notes",))
    assert merge([other, update])[k()] == update


def test_local_origin_loses_a_full_tie_to_any_named_origin() -> None:
    local = ev("u", lsn=1, ts=5)
    named = ev("u", lsn=1, ts=5, origin="eu")
    assert merge([named, local])[k()] == named


def test_only_versions_within_the_window_of_the_latest_compete() -> None:
    # venue wrote 15us before the latest; the window is 10us: it is out, though the planner
    # (within the window) outranks the latest writer, the couple.
    venue = ev("u", lsn=1, ts=85, origin="a", after={"id": 1, ROLE: "venue"})
    planner = ev("u", lsn=1, ts=95, origin="b", after={"id": 1, ROLE: "planner"})
    couple = ev("u", lsn=1, ts=100, origin="c", after={"id": 1, ROLE: "couple"})
    decisions: list[ConflictDecision] = []
    assert merge([venue, planner, couple], {QT: POLICY},
                 on_decision=decisions.append)[k()] == planner
    assert [(d.loser.origin, d.reason) for d in decisions] == [
        ("a", ConflictReason.OUTSIDE_WINDOW), ("c", ConflictReason.PRECEDENCE)]


def test_a_delete_competes_with_the_role_of_the_deleted_row() -> None:
    delete = ev("d", lsn=1, ts=100, origin="eu", before={"id": 1, ROLE: "couple"})
    update = ev("u", lsn=1, ts=95, origin="us", after={"id": 1, ROLE: "venue"})
    assert merge([delete, update], {QT: POLICY})[k()] == update
    assert merge([delete, update], {QT: LATEST_WINS})[k()] == \
        Tombstone(delete.position, 100, "eu", Op.DELETE)


def test_column_groups_take_each_groups_columns_from_its_winner() -> None:
    venue = ev("u", lsn=7, ts=100, origin="eu",
               after={"id": 1, ROLE: "venue", "start": "15:00", "menu": "fish", "body": "v"})
    couple = ev("u", lsn=3, ts=104, origin="us",
                after={"id": 1, ROLE: "couple", "start": "16:00", "menu": "vegan", "body": "c"})
    decisions: list[ConflictDecision] = []
    state = merge([couple, venue], {QT: GROUPED}, on_decision=decisions.append)[k()]
    # The row and the timing are the venue's; the menu group is the couple's call.
    assert state == dataclasses.replace(
        venue, after={"id": 1, ROLE: "venue", "start": "15:00", "menu": "vegan", "body": "c"})
    assert {(d.group, d.winner.origin, d.reason) for d in decisions} == {
        (None, "eu", ConflictReason.PRECEDENCE), ("timing", "eu", ConflictReason.PRECEDENCE),
        ("menu", "us", ConflictReason.PRECEDENCE)}


def test_merger_reports_a_decision_again_only_when_it_changes() -> None:
    reported: list[ConflictDecision] = []
    merger = Merger({QT: POLICY}, on_decision=reported.append)
    merger.add(ev("u", lsn=1, ts=100, origin="eu", after={"id": 1, ROLE: "couple"}))
    merger.add(ev("u", lsn=1, ts=50, origin="us", after={"id": 1, ROLE: "venue"}))
    merger.state()
    merger.state()
    assert [(d.winner.origin, d.reason) for d in reported] == [
        ("eu", ConflictReason.OUTSIDE_WINDOW)]
    merger.add(ev("u", lsn=2, ts=105, origin="us", after={"id": 1, ROLE: "venue"}))
    merger.state()
    assert [(d.winner.origin, d.reason) for d in reported[1:]] == [
        ("us", ConflictReason.PRECEDENCE)]  # the venue's new write is inside the window


def test_merge_key_is_canonical_across_representations() -> None:
    a = ev("c", after={"id": 1})
    assert merge_key(a)[0] == QT
    assert merge_key(dataclasses.replace(a, key={"id": Decimal("1.50")})) == \
        merge_key(dataclasses.replace(a, key={"id": Decimal("1.5")}))
    a_then_b = dataclasses.replace(a, key={"a": 1, "b": 2})
    assert merge_key(a_then_b) == merge_key(dataclasses.replace(a, key={"b": 2, "a": 1}))


def test_a_row_without_key_columns_is_refused() -> None:
    with pytest.raises(ValueError, match=r"public\.vendors .* no key columns"):
        Merger().add(dataclasses.replace(ev("c"), key={}))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"window_us": -1}, "window_us must be >= 0"),
    ({"precedence": ("venue", "venue")}, "lists venue more than once"),
    ({"column_groups": {"a": ("x",), "b": ("x",)}}, "column 'x' in two groups"),
    ({"column_groups": {"a": ()}}, "group 'a' has no columns"),
    ({"group_precedence": {"menu": ("couple",)}}, "names 'menu', which is not"),
])
def test_invalid_policies_are_refused_with_the_reason(kwargs: dict[str, Any],
                                                      message: str) -> None:
    fields: dict[str, Any] = {"window_us": 0, "precedence": ROLES, "role_column": ROLE}
    with pytest.raises(ValueError, match=message):
        ConflictPolicy(**{**fields, **kwargs})


def test_a_snapshot_row_is_older_than_any_change_of_another_origin() -> None:
    # The capture stamps a snapshot row with the time of the snapshot; a change replicated in
    # later may carry an older commit time (its origin's). The row stands for changes made
    # before the snapshot, so across origins it counts as time 0 and loses.
    snapshot = ev("r", 1, lsn=5, ts=1_000, after={"id": 1, ROLE: "venue", "start": 1})
    change = ev("u", 1, lsn=9, ts=100, origin="b", after={"id": 1, ROLE: "couple", "start": 2})
    decisions: list[ConflictDecision] = []
    for versions in ([snapshot, change], [change, snapshot]):
        state = merge(versions, {QT: POLICY}, on_decision=decisions.append)
        assert state[k(1)] is change
    assert decisions and all(d.reason is ConflictReason.OUTSIDE_WINDOW for d in decisions)
    # Within one origin the position still decides: a later snapshot row beats an older change.
    local = ev("u", 1, lsn=3, ts=2_000, after={"id": 1, ROLE: "couple", "start": 3})
    assert merge([local, snapshot], {QT: POLICY})[k(1)] is snapshot
