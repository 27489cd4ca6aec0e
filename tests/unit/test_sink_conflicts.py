"""The sink's conflict watch (`sink/conflicts.py`): a cross-origin conflict inside the window is
counted and recorded once, with both versions, the rule and the winner; versions outside the
window are no conflict; memory is bounded by time and by count; a change it cannot read is
archived all the same. And the names of conflict records, and their metric."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from replicator.archive.layout import conflict_key, conflicts_prefix, parse_conflict_key
from replicator.archive.merge import ConflictPolicy, Merger, merge_key, message_merge_key
from replicator.events import ChangeEvent, Op
from replicator.keys import message_key
from replicator.ops.metrics import PipelineCollector
from replicator.position import ChangePosition, Lsn
from replicator.sink.compaction import CompactionStats
from replicator.sink.conflicts import ConflictWatch
from replicator.sink.stats import SinkStats
from replicator.transport.avro import EventCodec

TABLE = "public.timeline_items"
ROLES = ("venue", "planner", "photographer", "florist", "couple")
RULE = ConflictPolicy(window_us=60_000_000, precedence=ROLES, role_column="role",
                      column_groups={"schedule": ("starts_at",), "notes": ("notes",)},
                      group_precedence={"notes": ("photographer", "venue")})
T0 = 1_800_000_000_000_000  # microseconds
CODEC = EventCodec()


def ev(key: int, lsn: int, ts_s: float, origin: str | None, role: str | None = None,
       op: str = "u", **row: Any) -> ChangeEvent:
    after = None if op == "d" else {"id": key, "role": role, "starts_at": "14:00",
                                    "notes": "seeded", **row}
    return ChangeEvent(Op(op), "public", "timeline_items", ChangePosition(Lsn(lsn), 0),
                       T0 + int(ts_s * 1e6), lsn, {"id": key},
                       {"id": key} if op == "d" else None, after, (), origin,
                       wedding_id="7")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def see(watch: ConflictWatch, event: ChangeEvent) -> list[tuple[str, bytes, None]]:
    return watch.see(message_key(event), CODEC.encode_event(event), CODEC)


def test_a_conflict_inside_the_window_is_recorded_once_with_both_versions() -> None:
    stats = SinkStats()
    watch = ConflictWatch({TABLE: RULE}, stats)
    photographer = ev(1, 10, 10, "b", "photographer", notes="photographer notes")
    venue = ev(1, 20, 5, "a", "venue", starts_at="15:00")
    assert see(watch, photographer) == []
    records = see(watch, venue)
    docs = {json.loads(content)["group"]: (name, json.loads(content))
            for name, content, _ in records}
    assert set(docs) == {None, "schedule", "notes"}
    name, row = docs[None]
    assert parse_conflict_key(name) == (TABLE, T0 + 10_000_000)  # the later commit's time
    assert row["rule"] == "precedence" and row["key"] == {"id": 1}
    assert (row["winner"]["origin"], row["winner"]["role"]) == ("a", "venue")
    assert (row["loser"]["origin"], row["loser"]["role"]) == ("b", "photographer")
    assert row["winner"]["row"]["starts_at"] == "15:00"
    assert row["loser"]["row"]["notes"] == "photographer notes"
    assert row["loser"]["lsn"] == str(Lsn(10)) and row["winner"]["wedding_id"] == "7"
    assert row["precedence"] == list(ROLES) and row["window_s"] == 60
    notes = docs["notes"][1]
    assert notes["winner"]["origin"] == "b" and notes["precedence"] == ["photographer", "venue"]
    assert notes["columns"] == ["notes"]
    assert stats.conflicts == {(TABLE, "precedence", ""): 1, (TABLE, "precedence", "schedule"): 1,
                               (TABLE, "precedence", "notes"): 1}
    # The same versions again (read again after a rebalance): nothing new.
    assert see(watch, photographer) == [] and see(watch, venue) == []
    assert sum(stats.conflicts.values()) == 3
    # A record's name is a function of the decision: a second watch names it the same.
    again = ConflictWatch({TABLE: RULE})
    see(again, photographer)
    assert sorted(n for n, _, _ in see(again, venue)) == sorted(n for n, _ in docs.values())


def test_commit_time_and_origin_name_break_ties_and_a_delete_has_no_role() -> None:
    stats = SinkStats()
    watch = ConflictWatch({TABLE: ConflictPolicy(60_000_000, ROLES, "role")}, stats)
    see(watch, ev(1, 10, 0, "a", "couple"))
    (_, content, _), = see(watch, ev(1, 20, 30, "b", "couple"))
    assert json.loads(content)["rule"] == "commit_time"
    see(watch, ev(2, 30, 0, "a", "florist"))
    (_, content, _), = see(watch, ev(2, 40, 0, "b", "florist"))
    doc = json.loads(content)
    assert doc["rule"] == "origin" and doc["winner"]["origin"] == "b"
    see(watch, ev(3, 50, 0, "a", "couple"))
    (_, content, _), = see(watch, ev(3, 60, 20, "b", op="d"))  # later, but no role
    doc = json.loads(content)
    assert doc["winner"]["op"] == "u" and doc["loser"]["op"] == "d"
    assert doc["loser"]["role"] is None and doc["loser"]["row"] == {"id": 3}


def test_versions_outside_the_window_or_of_one_origin_are_no_conflict() -> None:
    stats = SinkStats()
    watch = ConflictWatch({TABLE: RULE}, stats)
    assert see(watch, ev(1, 10, 0, "a", "venue")) == []
    assert see(watch, ev(1, 20, 61, "b", "couple")) == []  # 61 s later: sequential
    assert see(watch, ev(1, 30, 62, "b", "couple")) == []  # the same origin again
    snapshot = ev(2, 5, 0, None, "venue", op="r")
    assert see(watch, snapshot) == [] and see(watch, ev(2, 40, 1, "a", "couple")) == []
    other = ev(3, 50, 0, "a", "venue")
    assert not watch.watches("public.guests") and watch.watches(TABLE)
    assert see(watch, other) == [] and stats.conflicts == {}


def test_memory_is_bounded_by_time_and_count() -> None:
    clock = Clock()
    stats = SinkStats()
    watch = ConflictWatch({TABLE: RULE}, stats, keep_s=120, max_keys=3, clock=clock)
    assert watch.keep_s == 120  # at least the window (60 s)
    see(watch, ev(1, 10, 0, "a", "couple"))
    clock.now += 121  # key 1 is forgotten: a version of another origin meets nothing
    assert see(watch, ev(1, 20, 1, "b", "couple")) == []
    assert len(watch) == 1 and stats.conflicts_forgotten == 0
    for key in (2, 3, 4):
        see(watch, ev(key, 30 + key, 0, "a", "couple"))
    assert len(watch) == 3 and stats.conflicts_forgotten == 1  # key 1 went early
    assert ConflictWatch({TABLE: ConflictPolicy(3_600_000_000, (), "")}).keep_s == 3600


def test_a_change_the_watch_cannot_read_is_counted_not_raised(caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    watch = ConflictWatch({TABLE: RULE})
    assert watch.see(b"public.timeline_items\x00{\"id\":1}", b"\x00junk", CODEC) == []
    assert watch.failures == 1
    assert "cannot read" in caplog.text


def test_message_keys_are_the_merge_keys() -> None:
    event = ev(1, 10, 0, "a", "venue")
    assert message_merge_key(message_key(event)) == merge_key(event)


def test_merger_resolves_forgets_and_shows_heads() -> None:
    merger = Merger({TABLE: RULE})
    first, second = ev(1, 10, 0, "a", "venue"), ev(1, 20, 1, "b", "couple")
    key = merge_key(first)
    assert merger.resolve(key) is None
    merger.add(first)
    merger.add(second)
    assert merger.resolve(key) == merger.state()[key]
    assert merger.head(key, "a") is first and merger.head(key, "c") is None
    merger.forget(key)
    assert merger.resolve(key) is None and len(merger) == 0


def test_conflict_names_round_trip_and_refuse_other_spellings() -> None:
    name = conflict_key('"odd/schema"."Shot List"', 5, "ab" * 16)
    assert name.startswith(conflicts_prefix('"odd/schema"."Shot List"'))
    assert parse_conflict_key(name) == ('"odd/schema"."Shot List"', 5)
    for bad in ("conflicts/public.t/0000000000000005-AB.json",
                "conflicts/public.t/5-" + "ab" * 16 + ".json",
                "conflicts/public%2Et/0000000000000005-" + "ab" * 16 + ".json"):
        with pytest.raises(ValueError, match="not a conflict record name"):
            parse_conflict_key(bad)
    with pytest.raises(ValueError):
        conflict_key("public.t", -1, "ab" * 16)


def test_the_metric_counts_by_table_rule_and_group() -> None:
    sink = SinkStats()
    sink.conflicts[(TABLE, "precedence", "notes")] = 2
    registry = CollectorRegistry(auto_describe=False)
    capture = None
    registry.register(PipelineCollector(lambda: capture, lambda: {"local": sink},
                                        lambda: {"local": CompactionStats()}))
    text = generate_latest(registry).decode()
    assert re.search(r'^wedsync_conflicts_total\{destination="local",group="notes",'
                     r'rule="precedence",table="public.timeline_items"\} 2\.0$', text, re.M), text


def test_the_service_hands_its_rules_to_its_compaction_child() -> None:
    from replicator.config import ConflictRule, DestinationConfig, conflict_policies
    from replicator.sink.compaction import Compactor

    rule = ConflictRule(role_column="role", precedence=ROLES, window_s=60,
                        column_groups={"schedule": ("starts_at",), "notes": ("notes",)},
                        group_precedence={"notes": ("photographer", "venue")})
    compactor = Compactor(DestinationConfig(name="local", url="file:///tmp/archive"), {},
                          conflicts={TABLE: rule})
    command = compactor.command()
    rules = json.loads(command[command.index("--conflicts") + 1])
    assert conflict_policies(rules) == {TABLE: RULE}
    assert "--conflicts" not in Compactor(
        DestinationConfig(name="local", url="file:///tmp/archive"), {}).command()
