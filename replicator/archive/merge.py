"""Conflict rules: the state of each key as a deterministic function of the versions received.

A sink sees every change at least once, and the tier topics reorder one row's changes (a row
moves to a closer tier as its wedding approaches). A destination may also receive one row from
several origins. So nothing here may depend on arrival order or on duplicates: everything kept
per key is a *maximum* over the versions received (commutative and idempotent), and the rules
below (vendor precedence) are applied only when the state is read.

1. Per origin, the version with the highest `(commit_lsn, seq)` wins: the source's own order.
   Positions of different origins are never compared.
2. Across origins, the latest by commit time wins, unless other origins' versions are at most
   `window_us` older than it. Then those versions and the latest compete: the highest
   precedence of the writer's role wins, then the later commit time, then the greater origin
   name (the local origin, `None`, is less than every name).

Keys. `merge_key(event)` is `(schema.table, canonical JSON of the key columns)`: the Kafka
message key (`replicator.keys.message_key`) split at its NUL. So a key here is
exactly a partition key there, and `1.50`/`1.5` or two spellings of one timestamptz are one key.

Deletes and truncates are versions. A delete that is the newest version makes the key a
`Tombstone`, and because the delete stays the per-origin maximum, an older insert arriving
later cannot resurrect the row. A TRUNCATE (op `t`, empty key) is a version of every key of its
table at its position, in its origin: a key whose newest version is older is deleted; a later
version survives. Snapshot rows (op `r`) are versions at their position like any other, but
in rule 2 their commit time is 0: a snapshot row stands for changes committed before the
snapshot at times it does not know (the capture's snapshot stamps its rows with the time it
was taken, a compaction snapshot keeps none), so any change of another origin is later.

Unchanged TOAST. An update may omit a TOASTed column that did not change: it is absent from
`after` and named in `unchanged`. Its value is that of the nearest older version *of the same
origin* that carries the column, provided no delete or truncate of the key lies in between (a
row deleted and re-inserted has no previous value to inherit). When that version is unknown the
column stays listed in `unchanged`. Only two maxima are needed for this (per column, the newest
version carrying it; per key, the newest delete), so a late older version fills the gap exactly
as if it had arrived first.

Column groups. With `ConflictPolicy.column_groups`, rule 2 is applied once for the whole row
(which decides whether the row exists, and supplies the columns of no group) and once per group
among the origins whose version is a live row, with the group's own precedence if configured.
The result carries the row winner's position and origin with each group's columns from the
group's winner.

Every cross-origin decision is reported once, as one `ConflictDecision` per losing origin,
through the `on_decision` callback, when `state()` first sees it; reading the state again
reports only decisions that changed. Callers count and log them.

The `ChangeEvent`s returned may be the very objects that were added: treat them as read-only.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from replicator.events import ChangeEvent, Op, Row
from replicator.keys import message_key
from replicator.position import ChangePosition

__all__ = [
    "LATEST_WINS",
    "ConflictDecision",
    "ConflictPolicy",
    "ConflictReason",
    "KeyState",
    "MergeKey",
    "Merger",
    "Tombstone",
    "VersionRef",
    "merge",
    "merge_key",
    "message_merge_key",
]

MergeKey: TypeAlias = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A deleted key. Kept (not dropped) so that older versions arriving later lose to it."""

    position: ChangePosition
    commit_ts_us: int
    origin: str | None
    op: Op  # DELETE, or TRUNCATE when the table was truncated after the key's last change


KeyState: TypeAlias = ChangeEvent | Tombstone


def merge_key(event: ChangeEvent) -> MergeKey:
    """`(schema.table, canonical JSON of the key columns)`, the Kafka message key's two parts."""
    return message_merge_key(message_key(event))


def message_merge_key(key: bytes) -> MergeKey:
    """The merge key of a Kafka message key (`keys.message_key`: table NUL canonical key)."""
    table, _, columns = key.partition(b"\x00")
    return table.decode(), columns.decode()


def _check_unique(what: str, roles: tuple[str, ...]) -> None:
    duplicates = sorted({role for role in roles if roles.count(role) > 1})
    if duplicates:
        raise ValueError(f"conflict policy {what} lists {', '.join(duplicates)} more than once")


@dataclass(frozen=True, slots=True)
class ConflictPolicy:
    """How one table's cross-origin conflicts are decided.

    `precedence` lists roles strongest first (e.g. `("venue", "planner", "photographer",
    "florist", "couple")`); a writer's role is the value of `role_column` in the version's row
    (`after`, or `before` for a delete). An unknown or unlisted role ranks below every listed
    one; a truncate has no row, hence no role. `group_precedence` optionally gives a column
    group its own order (the menu may be the couple's call, the timings the venue's).
    """

    window_us: int
    precedence: tuple[str, ...]
    role_column: str
    column_groups: Mapping[str, tuple[str, ...]] | None = None
    group_precedence: Mapping[str, tuple[str, ...]] | None = None

    def __post_init__(self) -> None:
        if self.window_us < 0:
            raise ValueError(f"conflict policy window_us must be >= 0, got {self.window_us}")
        _check_unique("precedence", self.precedence)
        groups = self.column_groups or {}
        owner: dict[str, str] = {}
        for group, columns in groups.items():
            if not columns:
                raise ValueError(f"conflict policy column group {group!r} has no columns")
            for column in columns:
                if column in owner:
                    raise ValueError(f"conflict policy puts column {column!r} in two groups, "
                                     f"{owner[column]!r} and {group!r}; a column needs one owner")
                owner[column] = group
        for group, order in (self.group_precedence or {}).items():
            if group not in groups:
                raise ValueError(f"conflict policy group_precedence names {group!r}, which is "
                                 f"not one of the column groups ({', '.join(groups) or 'none'})")
            _check_unique(f"group_precedence[{group!r}]", order)

    def order(self, group: str | None = None) -> tuple[str, ...]:
        """The roles, strongest first, that decide *group* (None: the whole row)."""
        if group is not None and self.group_precedence and group in self.group_precedence:
            return self.group_precedence[group]
        return self.precedence

    def rank(self, role: str | None, group: str | None = None) -> int:
        """Higher is stronger: the first listed role ranks highest, unknown roles rank 0."""
        order = self.order(group)
        if role is None or role not in order:
            return 0
        return len(order) - order.index(role)


#: Used for tables without a policy: no window, no roles, so the latest commit time wins.
LATEST_WINS = ConflictPolicy(window_us=0, precedence=(), role_column="")


class ConflictReason(enum.StrEnum):
    """Why the loser of a cross-origin decision lost."""

    OUTSIDE_WINDOW = "outside_window"  # older than the latest version by more than the window
    PRECEDENCE = "precedence"  # within the window, the winner's role ranks higher
    COMMIT_TIME = "commit_time"  # within the window, same rank, the winner committed later
    ORIGIN = "origin"  # same rank and commit time: the greater origin name wins


@dataclass(frozen=True, slots=True)
class VersionRef:
    """One side of a decision: enough to find the version again and explain the outcome."""

    origin: str | None
    position: ChangePosition
    commit_ts_us: int
    op: Op
    role: str | None


@dataclass(frozen=True, slots=True)
class ConflictDecision:
    """One cross-origin decision of one key (`group` None: the whole row)."""

    key: MergeKey
    group: str | None
    winner: VersionRef
    loser: VersionRef
    reason: ConflictReason


@dataclass(frozen=True, slots=True)
class _Candidate:
    """One origin's version of a key, as it enters the cross-origin rule."""

    state: KeyState
    role: str | None

    @property
    def ref(self) -> VersionRef:
        s = self.state
        return VersionRef(s.origin, s.position, s.commit_ts_us, s.op, self.role)


def _origin_order(origin: str | None) -> tuple[bool, str]:
    return origin is not None, origin or ""


def _role(row: Row | None, policy: ConflictPolicy) -> str | None:
    value = row.get(policy.role_column) if row is not None and policy.role_column else None
    return None if value is None else str(value)


@dataclass(slots=True)
class _History:
    """What one origin said about one key, reduced to maxima: the newest version, the newest
    delete, and per column the newest version carrying it (for unchanged TOAST values)."""

    head: ChangeEvent
    deleted_at: ChangePosition | None = None
    columns: dict[str, tuple[ChangePosition, Any]] = field(default_factory=dict)
    # No entry of `columns` is newer than this (None: no entry yet): a version above it,
    # the common case of versions added in order, replaces its columns without comparing.
    columns_upto: ChangePosition | None = None

    def add(self, event: ChangeEvent) -> None:
        position = event.position
        if position > self.head.position:
            self.head = event
        if event.op is Op.DELETE:
            if self.deleted_at is None or position > self.deleted_at:
                self.deleted_at = position
                # Values older than a delete can never fill a gap again: forget them.
                self.columns = {c: v for c, v in self.columns.items() if v[0] > position}
            return
        if self.deleted_at is not None and position < self.deleted_at:
            return
        after = event.after
        if not after:
            return
        columns = self.columns
        if self.columns_upto is None or position > self.columns_upto:
            columns.update({column: (position, value) for column, value in after.items()})
            self.columns_upto = position
            return
        for column, value in after.items():
            known = columns.get(column)
            if known is None or position > known[0]:
                columns[column] = (position, value)

    def filled(self, barrier: ChangePosition | None) -> ChangeEvent:
        """The head with its unchanged columns filled from older versions above *barrier*."""
        head = self.head
        if not head.unchanged:
            return head
        after = dict(head.after or {})
        missing: set[str] = set()
        for column in head.unchanged:
            if column in after:
                continue
            known = self.columns.get(column)
            if known is not None and (barrier is None or known[0] > barrier):
                after[column] = known[1]
            else:
                missing.add(column)
        return dataclasses.replace(head, after=after, unchanged=tuple(sorted(missing)))


def _candidate(history: _History | None, truncate: ChangeEvent | None,
               policy: ConflictPolicy) -> _Candidate:
    """Rule 1 for one origin: its newest version of the key, a truncate included."""
    if truncate is not None and (history is None or truncate.position > history.head.position):
        return _Candidate(Tombstone(truncate.position, truncate.commit_ts_us, truncate.origin,
                                    Op.TRUNCATE), None)
    assert history is not None, "every origin has rows for the key or a truncate of its table"
    head = history.head
    if head.op is Op.DELETE:
        return _Candidate(Tombstone(head.position, head.commit_ts_us, head.origin, Op.DELETE),
                          _role(head.before, policy))
    barrier = history.deleted_at
    if truncate is not None and (barrier is None or truncate.position > barrier):
        barrier = truncate.position
    event = history.filled(barrier)
    return _Candidate(event, _role(event.after, policy))


def _time(state: KeyState) -> int:
    """A version's commit time in rule 2: a snapshot row's is 0 (module docstring)."""
    return 0 if state.op is Op.READ else state.commit_ts_us


def _decide(key: MergeKey, group: str | None, candidates: list[_Candidate],
            policy: ConflictPolicy) -> tuple[_Candidate, list[ConflictDecision]]:
    """Rule 2 among one version per origin; returns the winner and one decision per loser."""
    latest = max(_time(c.state) for c in candidates)
    contenders = [c for c in candidates if latest - _time(c.state) <= policy.window_us]

    def strength(c: _Candidate) -> tuple[int, int, tuple[bool, str]]:
        return policy.rank(c.role, group), _time(c.state), _origin_order(c.state.origin)

    winner = max(contenders, key=strength)
    won = strength(winner)
    decisions = []
    for loser in candidates:
        if loser is winner:
            continue
        lost = strength(loser)
        if latest - _time(loser.state) > policy.window_us:
            reason = ConflictReason.OUTSIDE_WINDOW
        elif lost[0] != won[0]:
            reason = ConflictReason.PRECEDENCE
        elif lost[1] != won[1]:
            reason = ConflictReason.COMMIT_TIME
        else:
            reason = ConflictReason.ORIGIN
        decisions.append(ConflictDecision(key, group, winner.ref, loser.ref, reason))
    return winner, decisions


class Merger:
    """Incremental merge: `add()` versions in any order, any number of times; `state()` gives
    every key's state. Memory grows with distinct keys (times origins and columns), not with
    the number of versions. Tables without an entry in *policies* use *default_policy*.
    """

    def __init__(self, policies: Mapping[str, ConflictPolicy] | None = None, *,
                 default_policy: ConflictPolicy = LATEST_WINS,
                 on_decision: Callable[[ConflictDecision], None] | None = None) -> None:
        self._policies = dict(policies or {})
        self._default = default_policy
        self._on_decision = on_decision
        self._keys: dict[MergeKey, dict[str | None, _History]] = {}
        # schema.table -> origin -> newest truncate: applies to keys seen before and after it.
        self._truncates: dict[str, dict[str | None, ChangeEvent]] = {}
        # Last decisions reported per (key, group), so that reading twice reports once.
        self._reported: dict[tuple[MergeKey, str | None], frozenset[ConflictDecision]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, event: ChangeEvent, key: MergeKey | None = None) -> None:
        """Add one version. *key* replaces `merge_key(event)` for a caller that keys every
        version of the merger its own consistent way (replay keys by the key's text)."""
        if event.op is Op.TRUNCATE:
            by_origin = self._truncates.setdefault(event.qualified_table, {})
            known = by_origin.get(event.origin)
            if known is None or event.position > known.position:
                by_origin[event.origin] = event
            return
        if not event.key:
            raise ValueError(
                f"cannot merge a {event.op.value!r} change of {event.qualified_table} at "
                f"{event.position}: it has no key columns (give the table a primary key or "
                "REPLICA IDENTITY FULL)")
        histories = self._keys.setdefault(key or merge_key(event), {})
        history = histories.get(event.origin)
        if history is None:
            history = histories[event.origin] = _History(event)
        history.add(event)

    def values_before(self, event: ChangeEvent, position: ChangePosition,
                      columns: Iterable[str], key: MergeKey | None = None) -> dict[str, Any]:
        """The newest value of each of *columns* that *event*'s key had (in *event*'s origin)
        below *position*, for the columns whose newest known version is below it: what an
        update that moves a row to a new key left unchanged (TOAST) takes along."""
        history = self._keys.get(key or merge_key(event), {}).get(event.origin)
        if history is None:
            return {}
        out = {}
        for column in columns:
            known = history.columns.get(column)
            if known is not None and known[0] < position:
                out[column] = known[1]
        return out

    def state(self) -> dict[MergeKey, KeyState]:
        """Every key's state; reports the cross-origin decisions not reported before."""
        return {key: self._resolve(key, histories) for key, histories in self._keys.items()}

    def resolve(self, key: MergeKey) -> KeyState | None:
        """One key's state (None: no version of it was added); reports its decisions not
        reported before."""
        histories = self._keys.get(key)
        return None if histories is None else self._resolve(key, histories)

    def head(self, key: MergeKey, origin: str | None) -> ChangeEvent | None:
        """*origin*'s newest version of *key* (as added: unchanged columns not filled)."""
        history = self._keys.get(key, {}).get(origin)
        return None if history is None else history.head

    def forget(self, key: MergeKey) -> None:
        """Drop everything known of *key* (a caller that bounds its memory: a version of
        the key added later starts afresh)."""
        self._keys.pop(key, None)
        for group in (None, *(self._policies.get(key[0], self._default).column_groups or ())):
            self._reported.pop((key, group), None)

    def _resolve(self, key: MergeKey, histories: dict[str | None, _History]) -> KeyState:
        policy = self._policies.get(key[0], self._default)
        truncates = self._truncates.get(key[0], {})
        origins = sorted(histories.keys() | truncates.keys(), key=_origin_order)
        candidates = [_candidate(histories.get(o), truncates.get(o), policy) for o in origins]
        if len(candidates) == 1:
            return candidates[0].state
        winner, decisions = _decide(key, None, candidates, policy)
        self._report(key, None, decisions)
        state = winner.state
        groups = policy.column_groups or {}
        if not groups:
            return state
        live = [c for c in candidates if isinstance(c.state, ChangeEvent)]
        if not isinstance(state, ChangeEvent) or len(live) < 2:
            for group in groups:
                self._report(key, group, [])
            return state
        after = dict(state.after or {})
        unchanged = set(state.unchanged)
        for group, columns in groups.items():
            group_winner, decisions = _decide(key, group, live, policy)
            self._report(key, group, decisions)
            source = group_winner.state
            if source is state or not isinstance(source, ChangeEvent):
                continue
            source_after = source.after or {}
            for column in columns:
                after.pop(column, None)
                unchanged.discard(column)
                if column in source_after:
                    after[column] = source_after[column]
                elif column in source.unchanged:
                    unchanged.add(column)
        if after == (state.after or {}) and unchanged == set(state.unchanged):
            return state
        return dataclasses.replace(state, after=after, unchanged=tuple(sorted(unchanged)))

    def _report(self, key: MergeKey, group: str | None,
                decisions: list[ConflictDecision]) -> None:
        current = frozenset(decisions)
        if self._reported.get((key, group), frozenset()) == current:
            return
        previous = self._reported.pop((key, group), frozenset())
        if current:
            self._reported[(key, group)] = current
        if self._on_decision is not None:
            for decision in decisions:
                if decision not in previous:
                    self._on_decision(decision)


def merge(versions: Iterable[ChangeEvent],
          policies: Mapping[str, ConflictPolicy] | None = None, *,
          default_policy: ConflictPolicy = LATEST_WINS,
          on_decision: Callable[[ConflictDecision], None] | None = None,
          ) -> dict[MergeKey, KeyState]:
    """The state of every key of *versions*: the same for any order and any duplicates."""
    merger = Merger(policies, default_policy=default_policy, on_decision=on_decision)
    for event in versions:
        merger.add(event)
    return merger.state()
