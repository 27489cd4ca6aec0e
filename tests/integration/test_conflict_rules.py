"""Conflict rules (`[conflicts]`) applied where the merged state is made, against real
services: two replication origins of one PostgreSQL server write the same rows (each session
bound to a named replication origin, with the commit time it gives, as a logical-replication
apply worker does), the real pipeline archives them, and replay, compaction and verify
decide the collisions by the configured rules; without rules, the latest commit wins."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connectors.registry import open_store
from replicator.config import ConflictRule, PriorityConfig, WeddingLink, conflict_policies
from replicator.crypto import decrypt
from replicator.position import Lsn
from replicator.replay.compact import compact
from replicator.replay.impact import impact
from replicator.replay.targets import PostgresTarget
from replicator.replay.verify import verify
from replicator.transport.avro import to_python
from tests.integration import archive_readers as archive
from tests.integration.archive_helpers import destinations, keyring, sink_environ
from tests.integration.replay_helpers import (
    archive_config,
    pipeline,
    restore_db,
    run_replay,
    snapshot_done,
    wait_durable,
)

REPLICATOR = str(Path(sys.executable).parent / "replicator")
TABLE = "public.timeline_items"

SCHEMA = """
CREATE TABLE weddings (id bigint PRIMARY KEY, couple text NOT NULL, wedding_date date);
INSERT INTO weddings VALUES (1, 'A & B', current_date + 200);
CREATE TABLE timeline_items (id bigint PRIMARY KEY, wedding_id bigint NOT NULL,
                             starts_at text, notes text, updated_by_role text);
INSERT INTO timeline_items VALUES
    (1, 1, '14:00', 'seeded', 'planner'),
    (2, 1, '14:00', 'seeded', 'planner'),
    (3, 1, '14:00', 'seeded', 'planner'),
    (4, 1, '14:00', 'seeded', 'planner');
"""

WINDOW_S = 60
RULES = {TABLE: {
    "role_column": "updated_by_role",
    "precedence": ["venue", "planner", "photographer", "florist", "couple"],
    "window_s": WINDOW_S,
    "column_groups": {"schedule": ["starts_at"], "notes": ["notes"]},
    "group_precedence": {"notes": ["photographer", "venue"]},
}}
RULES_TOML = f"""
[conflicts."timeline_items"]
role_column = "updated_by_role"
precedence = ["venue", "planner", "photographer", "florist", "couple"]
window_s = {WINDOW_S}
column_groups = {{ schedule = ["starts_at"], notes = ["notes"] }}
group_precedence = {{ notes = ["photographer", "venue"] }}
"""

# What each origin wrote, at which commit time (seconds after T0, which is after the capture's
# snapshot: a snapshot row counts as older than any change of another origin), in the order
# the source applied it. Each origin wrote the row as it knew it: neither saw the other's.
#   1: within the window, a venue's time change (older) and a photographer's note (newer);
#   2: within the window, a couple's update, then a delete (newer) by the other origin;
#   3: outside the window, a venue's time change, then a couple's note long after;
#   4: one origin only: its newest version, whatever the rules.
WRITES: list[tuple[str, float, str]] = [
    ("b", 10, "UPDATE timeline_items SET notes = 'photographer notes', "
              "updated_by_role = 'photographer' WHERE id = 1"),
    ("a", 5, "UPDATE timeline_items SET starts_at = '15:00', notes = 'seeded', "
             "updated_by_role = 'venue' WHERE id = 1"),
    ("a", 20, "UPDATE timeline_items SET notes = 'couple edit', updated_by_role = 'couple' "
              "WHERE id = 2"),
    ("b", 30, "DELETE FROM timeline_items WHERE id = 2"),
    ("a", 0, "UPDATE timeline_items SET starts_at = '16:00', updated_by_role = 'venue' "
             "WHERE id = 3"),
    ("b", 0 + WINDOW_S + 50, "UPDATE timeline_items SET starts_at = '14:00', "
                             "notes = 'late couple', updated_by_role = 'couple' WHERE id = 3"),
    ("a", 40, "UPDATE timeline_items SET notes = 'florist', updated_by_role = 'florist' "
              "WHERE id = 4"),
    ("a", 45, "UPDATE timeline_items SET notes = 'florist again' WHERE id = 4"),
]

WITH_RULES = [
    "(1,1,15:00,\"photographer notes\",venue)",  # row and schedule: venue; notes: photographer
    "(2,1,14:00,\"couple edit\",couple)",  # a delete's before image names no role: it ranks last
    "(3,1,14:00,\"late couple\",couple)",  # outside the window: the latest commit
    "(4,1,14:00,\"florist again\",florist)",
]
# The conflicts the sink records (key, group, rule, winner's origin, loser's origin); the
# snapshot rows lose to every later change outside the window, which is no conflict.
CONFLICTS = {
    (1, None, "precedence", "a", "b"),  # the row: venue over photographer
    (1, "schedule", "precedence", "a", "b"),
    (1, "notes", "precedence", "b", "a"),  # notes: the photographer first
    (2, None, "precedence", "a", "b"),  # the couple's update over a delete with no role
}
LATEST_WINS = [
    "(1,1,14:00,\"photographer notes\",photographer)",
    "(3,1,14:00,\"late couple\",couple)",
    "(4,1,14:00,\"florist again\",florist)",
]


@pytest.fixture
def origins(pg_dsn: str) -> Iterator[dict[str, str]]:
    """Two replication origins of the server, by short name; dropped afterwards."""
    names = {short: f"wedsync_test_{short}_{uuid.uuid4().hex[:8]}" for short in ("a", "b")}
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for name in names.values():
            conn.execute("SELECT pg_replication_origin_create(%s)", (name,))
    yield names
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for name in names.values():
            conn.execute("SELECT pg_replication_origin_drop(%s)", (name,))


def write_as_origins(dsn: str, names: dict[str, str], t0: datetime) -> int:
    """`WRITES`, each in its own transaction of a session bound to its origin, committed
    with the origin's commit time; the LSN after the last (and one more plain commit)."""
    sessions = {short: psycopg.connect(dsn, autocommit=True) for short in names}
    try:
        for short, conn in sessions.items():
            conn.execute("SELECT pg_replication_origin_session_setup(%s)", (names[short],))
        for n, (short, offset, statement) in enumerate(WRITES):
            conn = sessions[short]
            with conn.transaction():
                conn.execute("SELECT pg_replication_origin_xact_setup(%s::pg_lsn, %s)",
                             (f"0/{n + 1:X}", t0 + timedelta(seconds=offset)))
                conn.execute(statement)
        for conn in sessions.values():
            conn.execute("SELECT pg_replication_origin_session_reset()")
    finally:
        for conn in sessions.values():
            conn.close()
    return mark_after(dsn)


def mark_after(dsn: str) -> int:
    """The WAL position now, and one commit after it (a checkpoint passes a point once a
    later transaction is complete)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
        assert row is not None
        conn.execute("UPDATE weddings SET couple = couple || '.' WHERE id = 1")
        return int(row[0])


def conflict_records(archive_dir: Path) -> list[dict[str, Any]]:
    """Every conflict record of the local archive, decrypted."""
    root = archive_dir / "conflicts"
    out = []
    for path in sorted(root.rglob("*.json")) if root.exists() else []:
        name = path.relative_to(archive_dir).as_posix()
        out.append(json.loads(decrypt(path.read_bytes(), name, keyring())))
    return out


def rows(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(
            "SELECT t::text FROM timeline_items t ORDER BY id").fetchall()]


async def test_replay_compaction_and_verify_follow_the_rules(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path, origins: dict[str, str]) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        now = conn.execute("SELECT now()").fetchone()
        assert now is not None
    t0 = now[0] + timedelta(minutes=2)
    dests = destinations(tmp_path)
    config = archive_config(pg_dsn, kafka_bootstrap, topic_prefix, dests).model_copy(update={
        "conflicts": {TABLE: ConflictRule(**RULES[TABLE])},
        "priority": PriorityConfig(tables={TABLE: WeddingLink(column="wedding_id")})})
    async with pipeline(config) as capture:
        await snapshot_done(capture, 5)
        point = write_as_origins(pg_dsn, origins, t0)
        await wait_durable(dests, point)
    url = dests[0].url
    at = Lsn(point)
    policies = conflict_policies(RULES)

    # The archive holds both origins' versions, tagged.
    store = open_store(url, sink_environ())
    try:
        tagged = {(r.get("source") or {}).get("origin")
                  async for r in archive.change_records(store, keyring(), TABLE)}
    finally:
        await store.close()
    assert set(origins.values()) <= tagged, tagged

    # The sink saw the conflicts as they happened and recorded each once, with both versions;
    # `impact` lists them in its window.
    short = {name: short for short, name in origins.items()}
    records = conflict_records(tmp_path / "archive")
    assert {(r["key"]["id"], r["group"], r["rule"], short[r["winner"]["origin"]],
             short[r["loser"]["origin"]]) for r in records} == CONFLICTS, records
    assert len(records) == len(CONFLICTS)
    first = next(r for r in records if r["key"] == {"id": 1} and r["group"] is None)
    assert first["winner"]["role"] == "venue" and first["loser"]["role"] == "photographer"
    assert first["winner"]["row"]["starts_at"] == "15:00"
    assert first["loser"]["row"]["notes"] == "photographer notes"
    assert first["precedence"] == RULES[TABLE]["precedence"]
    store = open_store(url, sink_environ())
    try:
        report = await impact(store, keyring(), since=t0 - timedelta(minutes=1),
                              until=t0 + timedelta(minutes=5))
    finally:
        await store.close()
    assert sorted((c["key"]["id"], c["group"] or "") for c in report.conflicts) == sorted(
        (key, group or "") for key, group, *_ in CONFLICTS), report.conflicts

    with restore_db(pg_server_dsn) as target:
        await run_replay(url, PostgresTarget(target), at, tables=[TABLE], policies=policies)
        assert rows(target) == WITH_RULES
    with restore_db(pg_server_dsn) as target:
        await run_replay(url, PostgresTarget(target), at, tables=[TABLE])
        assert rows(target) == LATEST_WINS
    # A wedding restore decides the same way.
    with restore_db(pg_server_dsn) as target:
        await run_replay(url, PostgresTarget(target), at, tables=[TABLE], wedding="1",
                         policies=policies)
        assert rows(target) == WITH_RULES

    # Verify restores with the rules and proves the restore complete and consistent.
    store = open_store(url, sink_environ())
    try:
        report = await verify(store, keyring(), at=at, tables=[TABLE], policies=policies)
        assert report.ok, report.lines()
        # Compaction folds the versions by the rules: a restore from its snapshot is the same.
        summary = await compact(store, keyring(), at=at, tables=[TABLE], policies=policies)
        assert [t.done for t in summary.tables] == [True], summary
    finally:
        await store.close()
    with restore_db(pg_server_dsn) as target:
        result = await run_replay(url, PostgresTarget(target), at, tables=[TABLE],
                                  policies=policies)
        assert result.tables[TABLE].segments == 1  # the snapshot's one part
        assert rows(target) == WITH_RULES

    # The command line: `--config` with [conflicts] applies them; a bad rule is refused.
    good = tmp_path / "rules.toml"
    good.write_text(RULES_TOML)
    with restore_db(pg_server_dsn) as target:
        done = replicator("replay", "--from", url, "--at", str(at), "--tables", TABLE,
                          "--to", target, "--config", str(good), "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1])["rows"] == len(WITH_RULES)
        assert rows(target) == WITH_RULES
    bad = tmp_path / "bad.toml"
    bad.write_text(RULES_TOML.replace("window_s = 60", "window_s = -5"))
    for command in ("replay", "verify", "compact"):
        extra = ["--to", str(tmp_path / "out")] if command == "replay" else []
        done = replicator(command, "--from", url, "--config", str(bad), *extra)
        assert done.returncode == 2, (command, done.stderr)
        assert "conflicts.timeline_items.window_s" in done.stderr, (command, done.stderr)
        assert str(bad) in done.stderr


def replicator(*args: str) -> subprocess.CompletedProcess[str]:
    if "--at" not in args:
        args = (*args, "--at", "latest")
    return subprocess.run([REPLICATOR, *args], capture_output=True, text=True, timeout=120,
                          env=sink_environ(), check=False)


async def test_replicated_changes_are_skipped_when_asked(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        origins: dict[str, str]) -> None:
    """`source.replicated_changes = "skip"`: a change made under a replication origin (as a
    subscriber's apply worker makes them) is left out (by the server from PostgreSQL 16, by
    the capture before), the local ones are archived, and the checkpoint passes both."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    dests = destinations(tmp_path)
    base = archive_config(pg_dsn, kafka_bootstrap, topic_prefix, dests)
    config = base.model_copy(update={"source": base.source.model_copy(
        update={"replicated_changes": "skip"})})
    async with pipeline(config) as capture:
        await snapshot_done(capture, 5)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_replication_origin_session_setup(%s)", (origins["a"],))
            conn.execute("UPDATE timeline_items SET notes = 'echo' WHERE id = 1")
            conn.execute("INSERT INTO timeline_items VALUES (9, 1, '09:00', 'echo', 'venue')")
            conn.execute("SELECT pg_replication_origin_session_reset()")
            conn.execute("UPDATE timeline_items SET notes = 'local' WHERE id = 2")
        point = mark_after(pg_dsn)
        await wait_durable(dests, point)
    store = open_store(dests[0].url, sink_environ())
    try:
        changes = [r async for r in archive.change_records(store, keyring(), TABLE)
                   if r["op"] != "r"]
    finally:
        await store.close()
    assert [(r["op"], to_python(r["key"])["id"], r["source"]["origin"]) for r in changes] == [
        ("u", 2, None)], changes
    found = rows(pg_dsn)  # the source itself has all three
    assert found[0].endswith(",echo,planner)") and len(found) == 5
