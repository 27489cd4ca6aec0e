"""Retention (replicator/replay/retention.py) on every store kind: a real archive (capture,
Kafka, sinks) into a local folder, S3 (moto), Azure Blob (Azurite) and GCS
(fake-gcs-server), compacted at a middle point; the window starts after that compaction.

- A first run only marks; a restore of a point before the window, running while a second
  run inside the grace period goes, still succeeds and equals the recorded state.
- A run after the grace deletes: the capture's first snapshot and the changes below the
  compaction go; a restore at every point inside the window still equals the recorded
  state; a point before the window is refused, naming the oldest restorable point.
- A run on a wedding day is refused without a reason; with one, its audit record is in the
  archive before anything is deleted. A dry run deletes and writes nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from connectors.base import ObjectStore
from connectors.registry import open_store
from replicator.archive.layout import AUDIT, SEGMENTS, SNAPSHOTS
from replicator.config import RetentionConfig
from replicator.crypto import decrypt
from replicator.position import Lsn
from replicator.replay.compact import compact
from replicator.replay.plan import ReplayRefused
from replicator.replay.retention import retention
from replicator.replay.targets import PostgresTarget
from replicator.replay.usage import usage
from replicator.sink.compaction import Compactor
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import keyring, sink_environ
from tests.integration.replay_helpers import build_archive, restore_db, restored_state, run_replay

pytestmark = pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True, ids=["pg15"])

KEEP = timedelta(days=35)
GRACE = timedelta(minutes=10)


async def names(store: ObjectStore, prefix: str) -> set[str]:
    return {info.key async for info in store.list(prefix)}


async def test_retention_keeps_every_point_of_the_window(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path, s3_target: StoreTarget, azure_target: StoreTarget,
        gcs_target: StoreTarget) -> None:
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        s3_target, azure_target, gcs_target,
                                        transactions=60, points_at=(9, 30, 59), pause=0.03)
    early, middle, late = points
    ring = keyring()
    for dest in dests:
        store = open_store(dest.url, sink_environ())
        try:
            await compact(store, ring, at=Lsn(middle.lsn))
            # The window starts just after the compaction's point: its base is the compaction.
            start = middle.at + (late.at - middle.at) / 2
            now = start + KEEP
            before = await names(store, "")
            dry = await retention(store, ring, keep=KEEP, grace=GRACE, now=now,
                                  dry_run=True)
            assert dry.candidates > 0 and dry.due == 0
            assert await names(store, "") == before  # a dry run writes nothing

            first = await retention(store, ring, keep=KEEP, grace=GRACE, now=now)
            assert first.candidates == dry.candidates and not first.deleted, dest.name
            # A restore of a point now outside the window, running while a second run
            # inside the grace goes on: nothing it reads is deleted.
            with restore_db(pg_server_dsn) as target:
                restoring = asyncio.create_task(
                    run_replay(dest.url, PostgresTarget(target), Lsn(early.lsn)))
                second = await retention(store, ring, keep=KEEP, grace=GRACE,
                                         now=now + GRACE / 2)
                await restoring
                assert not second.deleted
                assert restored_state(target) == early.state, dest.name

            # Wedding day: refused without a reason, nothing deleted.
            with pytest.raises(ReplayRefused, match="override-reason"):
                await retention(store, ring, keep=KEEP, grace=GRACE, now=now + GRACE * 2,
                                guard_finding="1 wedding(s) are today or tomorrow")
            assert not (await names(store, AUDIT))
            third = await retention(store, ring, keep=KEEP, grace=GRACE, now=now + GRACE * 2,
                                    guard_finding="1 wedding(s) are today or tomorrow",
                                    reason="the disk is full")
            assert third.deleted and len(third.deleted) == third.due == first.candidates
            assert not third.undeletable
            after = await names(store, "")
            assert not (set(third.deleted) & after)
            audit = [k for k in after if k.startswith(AUDIT)]
            assert audit == [third.audit]
            record = json.loads(decrypt(await store.get(audit[0]), audit[0], ring))
            assert record["operation"] == "retention" and record["reason"] == "the disk is full"
            # What went: the capture's first snapshot, changes below the compaction.
            assert any(k.startswith(SNAPSHOTS) and k.endswith(".part") for k in third.deleted)
            assert any(k.startswith(SEGMENTS) for k in third.deleted)
            assert any(k.startswith(SNAPSHOTS) for k in after)  # the compaction stays
        finally:
            await store.close()

        # Every point inside the window restores as recorded; one before it is refused.
        with restore_db(pg_server_dsn) as target:
            await run_replay(dest.url, PostgresTarget(target), Lsn(late.lsn))
            assert restored_state(target) == late.state, dest.name
        with restore_db(pg_server_dsn) as target:
            await run_replay(dest.url, PostgresTarget(target), Lsn(middle.lsn))
            assert restored_state(target) == middle.state, dest.name
        with restore_db(pg_server_dsn) as target, pytest.raises(ReplayRefused) as refused:
            await run_replay(dest.url, PostgresTarget(target), Lsn(early.lsn))
        assert "oldest restorable point" in str(refused.value), refused.value


async def test_the_service_runs_retention_after_compaction(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    """`[destinations.retention]`: the service's compaction schedule runs `replicator
    retention` after each compaction check, never on a wedding day."""
    points, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                        transactions=20, points_at=(5, 19))
    dest = dests[0].model_copy(update={"retention": RetentionConfig(keep="1s", grace="1s")})
    finding: list[str | None] = ["1 wedding(s) in public.weddings are today or tomorrow"]

    async def calendar() -> str | None:
        return finding[0]

    compactor = Compactor(dest, sink_environ(), wedding_day=calendar)
    assert await compactor.run_once()
    store = open_store(dest.url, sink_environ())
    try:
        # A compaction at an earlier point too: the window's start (the last second, after
        # the last commit) then has a base above the capture's snapshot.
        await compact(store, keyring(), at=Lsn(points[0].lsn))
        before = await names(store, "")
        await asyncio.sleep(1.5)  # the window (the last second) starts after the compaction
        assert not await compactor.run_retention()  # a wedding day: skipped
        assert await names(store, "") == before and compactor.stats.retention_runs == 0
        finding[0] = None
        # What `replicator usage` says before, and what retention would free.
        seen = await usage(store, keyring(), keep=timedelta(seconds=1))
        listing = [info async for info in store.list("")]
        assert seen.objects == len(listing) and seen.bytes == sum(i.size for i in listing)
        assert {"change segments", "capture snapshot parts", "compaction snapshots",
                "transaction records"} <= set(seen.by_kind)
        assert {"public.guests", "public.vendors"} <= set(seen.by_table)
        assert sum(seen.by_day.values()) > 0 and "earlier" not in seen.by_day
        assert set(seen.by_tier) <= {"critical", "high", "normal", "low"} and seen.by_tier
        assert sum(t["bytes_estimated"] for t in seen.by_tier.values()) == pytest.approx(
            seen.by_kind["change segments"]["bytes"], abs=len(seen.by_tier))
        assert seen.retention is not None and seen.retention["objects"] > 0
        done = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "replicator", "usage", "--from", dest.url, "--json",
            "--keep", "1s"], capture_output=True, text=True, env=sink_environ(), check=False)
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout.strip().splitlines()[-1])
        assert doc["objects"] == seen.objects
        assert doc["retention_would_free"]["objects"] == seen.retention["objects"]
        assert await compactor.run_retention()  # marks
        await asyncio.sleep(1.5)
        assert await compactor.run_retention()  # deletes what was unneeded for the grace
        assert compactor.stats.retention_deleted > 0 and not compactor.stats.retention_failures
        await compactor.run_usage()  # the totals the service exports as metrics
        assert compactor.stats.usage["change segments"]["objects"] > 0
        assert len(await names(store, SNAPSHOTS)) < len({k for k in before
                                                         if k.startswith(SNAPSHOTS)})
    finally:
        await store.close()
    with restore_db(pg_dsn) as target:
        await run_replay(dest.url, PostgresTarget(target), Lsn(points[-1].lsn))
        assert restored_state(target) == points[-1].state
