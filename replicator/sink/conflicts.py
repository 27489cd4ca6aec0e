"""Conflicts seen as they happen: the sink's watch over the tables with a conflict rule.

For each table with a rule (`[conflicts."schema.table"]`, `archive.merge.ConflictPolicy`),
the sink decodes each change it archives (the other tables keep the raw path) and merges it
into a `Merger` with the table's rule, keyed as the Kafka message is (so every version of a
key reaches the same partition, and here the same merger). The key's state is resolved at
once, and each cross-origin decision the merge reports that a *conflict* decided (the loser
was inside the window of the latest version: precedence, commit time or origin name chose the
winner; a version merely older than the window is not one) is

- counted: `SinkStats.conflicts[(table, rule, group)]`, `wedsync_conflicts_total{destination,
  table,rule,group}` (`rule`: `precedence`, `commit_time` or `origin`; `group`: the column
  group, empty for the whole row);
- written into the archive, before the flush that archives the two versions commits their
  offsets, as `conflicts/<table>/<time>-<digest>.json` (`archive.layout.conflict_key`,
  encrypted like every object): both versions (origin, position, commit time, op, role and
  row), the rule and the winner. The name is a digest of the decision, so the same conflict
  seen again (records read again after a restart) is the same object.

Memory: a key is remembered while versions of it keep arriving, and for `KEEP_S` (at least
the table's window) after the last one; at most `MAX_KEYS` keys (the oldest go first,
`SinkStats.conflicts_forgotten` counts them). A version arriving after its key was forgotten
meets no earlier version here; the merged state, which replay and compaction compute from
every archived version, does not depend on this watch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

from replicator.archive.layout import conflict_key
from replicator.archive.merge import (
    ConflictDecision,
    ConflictPolicy,
    ConflictReason,
    MergeKey,
    Merger,
    VersionRef,
    message_merge_key,
)
from replicator.events import ChangeEvent, Op
from replicator.sink.stats import SinkStats
from replicator.transport.avro import EventCodec
from replicator.transport.avrovalues import event_from_dict

__all__ = ["KEEP_S", "MAX_KEYS", "ConflictWatch", "Rules"]

#: The conflict rules by qualified table name (`config.Config.policies`).
Rules: TypeAlias = Mapping[str, ConflictPolicy]
log = logging.getLogger(__name__)

#: Seconds a key is remembered after its last version arrived (at least the table's window).
KEEP_S: Final = 900.0
#: Keys remembered at most, over every watched table.
MAX_KEYS: Final = 200_000
FORMAT: Final = 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class ConflictWatch:
    """One destination's watch (module docstring)."""

    def __init__(self, policies: Rules, stats: SinkStats | None = None, *,
                 keep_s: float = KEEP_S, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policies = dict(policies)
        windows = [p.window_us / 1e6 for p in self.policies.values()]
        self.keep_s = max([keep_s, *windows])
        self.max_keys = max_keys
        self._clock = clock
        self._merger = Merger(self.policies, on_decision=self._decided)
        self._seen: OrderedDict[MergeKey, float] = OrderedDict()  # key -> last arrival
        self._decided_now: list[ConflictDecision] = []
        self._records: list[tuple[str, bytes]] = []
        self.stats = stats or SinkStats()
        # (table, rule, group) -> conflicts: the stats' own counter, read by the metrics
        self.counts = self.stats.conflicts
        self.failures = 0  # changes the watch could not read (archived all the same)

    @property
    def forgotten(self) -> int:
        """Keys dropped by `max_keys` before `keep_s` passed."""
        return self.stats.conflicts_forgotten

    def see(self, key: bytes, value: bytes, codec: EventCodec) -> list[tuple[str, bytes, None]]:
        """A watched table's change as its Kafka message (key, value): decoded and `add`ed;
        the conflict records made since the last call, as the worker's objects to write
        first (name, content, no offset entry). A change the watch cannot read is logged and
        counted, never raised: the archive takes it all the same."""
        try:
            self.add(event_from_dict(codec.decode_event(value)), message_merge_key(key))
        except Exception as exc:  # the watch must never stop the archive
            self.failures += 1
            log.warning("conflict watch: a change it cannot read (%s: %s); it is archived, "
                        "not watched", type(exc).__name__, exc)
        return [(name, content, None) for name, content in self.take()]

    def watches(self, table: str) -> bool:
        return table in self.policies

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, event: ChangeEvent, key: MergeKey) -> None:
        """One version of a watched table's key: merged, its key resolved, and its conflicts
        counted and made into records (`take`)."""
        if event.op is Op.TRUNCATE or not event.key:
            return  # a truncate is no version of one key; replay and compaction weigh it
        now = self._clock()
        self._expire(now)
        self._merger.add(event, key)
        self._seen[key] = now
        self._seen.move_to_end(key)
        self._merger.resolve(key)
        for decision in self._decided_now:
            self._records.append(self._record(decision))
        self._decided_now.clear()
        if len(self._seen) > self.max_keys:
            self._expire(now)

    def take(self) -> list[tuple[str, bytes]]:
        """The conflict records made since the last call: (object name, JSON content)."""
        records, self._records = self._records, []
        return records

    def _decided(self, decision: ConflictDecision) -> None:
        if decision.reason is ConflictReason.OUTSIDE_WINDOW:
            return  # sequential, not concurrent: the latest commit simply won
        self.counts[(decision.key[0], decision.reason.value, decision.group or "")] += 1
        self._decided_now.append(decision)

    def _expire(self, now: float) -> None:
        seen = self._seen
        while seen:
            key, at = next(iter(seen.items()))
            if now - at <= self.keep_s and len(seen) <= self.max_keys:
                return
            if now - at <= self.keep_s:
                self.stats.conflicts_forgotten += 1
            del seen[key]
            self._merger.forget(key)

    def _record(self, decision: ConflictDecision) -> tuple[str, bytes]:
        table, key = decision.key
        policy = self.policies[table]
        winner, loser = decision.winner, decision.loser
        ident = json.dumps([table, key, decision.group, _ref_id(winner), _ref_id(loser)])
        digest = hashlib.sha256(ident.encode()).hexdigest()[:32]
        doc = {
            "format": FORMAT,
            "table": table,
            "key": json.loads(key) if key else None,
            "group": decision.group,
            "columns": list((policy.column_groups or {}).get(decision.group or "", ())),
            "rule": decision.reason.value,
            "window_s": policy.window_us / 1e6,
            "role_column": policy.role_column or None,
            "precedence": list(policy.order(decision.group)),
            "winner": self._version(decision.key, winner),
            "loser": self._version(decision.key, loser),
        }
        at = max(winner.commit_ts_us, loser.commit_ts_us)
        content = json.dumps(doc, sort_keys=True, default=_jsonable).encode()
        return conflict_key(table, at, digest), content

    def _version(self, key: MergeKey, ref: VersionRef) -> dict[str, Any]:
        head = self._merger.head(key, ref.origin)
        row = None
        if head is not None and head.position == ref.position:
            row = head.before if head.op is Op.DELETE else head.after
        return {
            "origin": ref.origin,
            "lsn": str(ref.position.commit_lsn),
            "seq": ref.position.seq,
            "commit_time": datetime.fromtimestamp(ref.commit_ts_us / 1e6, UTC).isoformat(),
            "commit_ts_us": ref.commit_ts_us,
            "op": ref.op.value,
            "role": ref.role,
            "wedding_id": None if head is None else head.wedding_id,
            "row": row,
        }


def _ref_id(ref: VersionRef) -> list[Any]:
    return [ref.origin, int(ref.position.commit_lsn), ref.position.seq, ref.op.value]
