"""`replay --tiered` against the real services: a whole database back nearest weddings first,
each step committed on its own, the last one exact."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from connectors.registry import open_store
from replicator.config import PriorityConfig, WeddingLink
from replicator.errors import ReplicatorError
from replicator.position import Lsn
from replicator.replay.tiered import Step, replay_tiered
from tests.integration.archive_helpers import keyring, sink_environ
from tests.integration.replay_helpers import build_archive, restore_db, restored_state

REPLICATOR = str(Path(sys.executable).parent / "replicator")
CALENDAR = PriorityConfig(tables={"public.guests": WeddingLink(column="wedding_id")})
# `replay_helpers.seed`: weddings 1..6 in 3, 20, 60, 200, 5 and 400 days.
CRITICAL, HIGH, NORMAL = {1, 5}, {2}, {3}


async def test_a_tiered_restore_brings_the_nearest_weddings_back_first(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        transactions=20, points_at=(19,))
    point, url = points[-1], dests[0].url
    with restore_db(pg_server_dsn) as target:
        seen: list[tuple[str, dict[str, list[str]]]] = []

        def told(step: Step) -> None:  # what a reader of the target sees after each step
            if step.tier != "rest":
                with psycopg.connect(target) as conn:
                    seen.append((step.tier, {
                        "weddings": [r[0] for r in conn.execute(
                            "SELECT id::text FROM weddings ORDER BY id")],
                        "guests": [r[0] for r in conn.execute(
                            "SELECT DISTINCT wedding_id::text FROM guests ORDER BY 1")],
                        "vendors": [r[0] for r in conn.execute(
                            "SELECT count(*)::text FROM vendors")]}))

        store = open_store(url, sink_environ())
        try:
            summary = await replay_tiered(store, keyring(), target, at=Lsn(point.lsn),
                                          calendar=CALENDAR, on_step=told)
        finally:
            await store.close()
        assert [s.tier for s in summary.steps] == ["critical", "high", "normal", "rest"]
        assert [s.weddings for s in summary.steps[:3]] == [2, 1, 1]
        ids = [sorted(str(w) for w in CRITICAL),
               sorted(str(w) for w in CRITICAL | HIGH),
               sorted(str(w) for w in CRITICAL | HIGH | NORMAL)]
        for (tier, state), want in zip(seen, ids, strict=True):
            assert state["weddings"] == want, tier
            assert state["guests"] == want, tier
            assert state["vendors"] == ["0"], tier  # rows of no wedding come last
        usable = [s.usable_s for s in summary.steps]
        assert usable == sorted(usable)
        assert summary.critical_usable_s == usable[0]
        assert restored_state(target) == point.state  # the last step is exact
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT relpersistence FROM pg_class WHERE oid = "
                                "'guests'::regclass").fetchone() == ("p",)
            assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE "
                                "'replicator_restore_%'").fetchone() == (0,)

        # Into a database that has the tables: refused, nothing changed.
        store = open_store(url, sink_environ())
        try:
            with pytest.raises(ReplicatorError, match="tiered restore rebuilds into an empty"):
                await replay_tiered(store, keyring(), target, at=Lsn(point.lsn),
                                    calendar=CALENDAR)
        finally:
            await store.close()
        assert restored_state(target) == point.state

    # The command: JSON with the steps, and the critical step's time.
    config = tmp_path / "replay.toml"
    config.write_text('[priority.tables."public.guests"]\ncolumn = "wedding_id"\n')
    with restore_db(pg_server_dsn) as target:
        done = await asyncio.to_thread(
            subprocess.run, [REPLICATOR, "replay", "--from", url, "--at", str(Lsn(point.lsn)),
                             "--to", target, "--tiered", "--config", str(config), "--json"],
            env=sink_environ(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["tiered"] and doc["critical_usable_s"] is not None
        assert [s["tier"] for s in doc["steps"]] == ["critical", "high", "normal", "rest"]
        assert restored_state(target) == point.state
