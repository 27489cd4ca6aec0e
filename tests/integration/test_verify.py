"""Verify and the replay's errors, on archives built by the real pipeline: a restore drill
against the transaction records, a scratch database and the live database; a missing,
corrupted or undecryptable object, and a gap in the transaction records, each stop the replay
with the object named and the nearest earlier restorable point."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connectors.registry import open_store
from replicator.archive.reader import ReplayFailed
from replicator.position import Lsn
from replicator.replay.plan import LATEST, ReplayRefused
from replicator.replay.targets import FileTarget
from replicator.replay.verify import verify
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import keyring, sink_environ
from tests.integration.replay_helpers import (
    build_archive,
    random_workload,
    run_replay,
    seeded_archive,
    snapshotted,
    wait_durable,
)


async def test_verify_against_records_scratch_and_live(
        pg_dsn: str, pg_server_dsn: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path, s3_target: StoreTarget) -> None:
    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path, s3_target)
    async with snapshotted(config) as capture:
        points = await asyncio.to_thread(random_workload, pg_dsn, rng=random.Random(7),
                                         transactions=25, points_at=(24,), add_column_at=10)
        await wait_durable(dests, points[-1].lsn)
        for d in dests:
            store = open_store(d.url, sink_environ())
            try:
                # The service keeps running: the live database is read as of a slot's
                # snapshot, and verify waits for the archive to reach that point (the
                # heartbeat's empty transactions move the checkpoint on a quiet database).
                report = await verify(store, keyring(), scratch_dsn=pg_server_dsn,
                                      against_dsn=pg_dsn, wait_s=60)
            finally:
                await store.close()
            assert report.ok, report.lines()
            guests = report.tables["public.guests"]
            assert guests.rows == len(points[-1].state["public.guests"])
            assert guests.hash == guests.scratch_hash == guests.live_hash
        capture.stop()
    # With the service stopped, a live change cannot reach the archive: verify says so rather
    # than compare two different points.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE vendors SET name = 'changed behind the archive' WHERE id = 1")
    store = open_store(dests[0].url, sink_environ())
    try:
        with pytest.raises(ReplayRefused, match="checkpoint is still"):
            await verify(store, keyring(), against_dsn=pg_dsn, wait_s=2)
    finally:
        await store.close()


async def test_missing_corrupt_and_unreadable_objects_stop_the_replay(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    config, dests = seeded_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path)
    async with snapshotted(config):
        points = await asyncio.to_thread(random_workload, pg_dsn, rng=random.Random(3),
                                         transactions=40, points_at=(5, 39), add_column_at=20,
                                         pause=0.1)
        await wait_durable(dests, points[-1].lsn)
    root = tmp_path / "archive"
    url = dests[0].url
    segments = sorted((root / "segments" / "public.guests").iterdir())
    change_segments = [p for p in segments if int(p.name.split("-")[0], 16) > points[0].lsn]
    assert change_segments, segments
    victim = change_segments[len(change_segments) // 2]
    first = Lsn(int(victim.name.split("-")[0], 16))
    name = f"segments/public.guests/{victim.name}"

    async def replay_latest() -> None:
        await run_replay(url, FileTarget(tmp_path / "out", "jsonl", replace_existing=True),
                         LATEST)

    # Every check passes on the intact archive.
    await replay_latest()
    store = open_store(url, sink_environ())
    try:
        assert (await verify(store, keyring())).ok
    finally:
        await store.close()

    data = victim.read_bytes()
    # 1. Corrupted (one byte flipped): named, with the nearest earlier point.
    victim.write_bytes(data[:200] + bytes([data[200] ^ 1]) + data[201:])
    with pytest.raises(ReplayFailed) as info:
        await replay_latest()
    assert info.value.object == name and "cannot be decrypted" in str(info.value)
    assert info.value.nearest is not None and info.value.nearest < first
    assert f"--at {info.value.nearest}" in str(info.value)
    # The point it suggests is restorable.
    await run_replay(url, FileTarget(tmp_path / "near", "jsonl"), info.value.nearest)
    # verify reports the table as differing, and the others as fine.
    store = open_store(url, sink_environ())
    try:
        report = await verify(store, keyring())
    finally:
        await store.close()
    assert not report.ok and report.differing == ["public.guests"]
    assert report.tables["public.vendors"].ok
    # 2. Missing: the transaction records announce changes the archive no longer holds.
    victim.unlink()
    with pytest.raises(ReplayFailed, match="is missing") as info:
        await replay_latest()
    assert info.value.nearest is not None and info.value.nearest < first
    victim.write_bytes(data)
    # 3. A key that is not in the keyring: named, with how to provide it.
    environ = {k: v for k, v in sink_environ().items() if not k.startswith("REPLICATOR_KEK")}
    environ["REPLICATOR_KEK_OTHER"] = "b3RoZXIta2V5LW9mLTMyLWJ5dGVzLWxvbmctLS0tLS0="
    from replicator.crypto import Keyring
    from replicator.replay.run import replay

    store = open_store(url, sink_environ())
    try:
        with pytest.raises(ReplayFailed, match="'TEST1', which is not in the keyring") as info:
            await replay(store, Keyring.from_env(environ),
                         FileTarget(tmp_path / "nokey", "jsonl"), at=LATEST)
    finally:
        await store.close()
    # The first object a replay reads is the sealed checkpoint.
    assert info.value.object is not None and info.value.object.startswith("checkpoints/")
    # 4. A gap in the transaction records: changes without their transaction record.
    # Only an object whose records announce changes that no other object also records leaves
    # a gap: heartbeat transactions announce none, and a redelivery can record a commit twice.
    from replicator.archive.segment import decode_transaction_segment
    from replicator.crypto import decrypt

    def announced(path: Path) -> set[int]:
        key = f"transactions/{path.name}"
        _, records = decode_transaction_segment(decrypt(path.read_bytes(), key, keyring()))
        return {int(r.commit_lsn) for r in records if r.total}

    records = {p: announced(p) for p in sorted((root / "transactions").iterdir())
               if int(p.name.split("-")[0], 16) > points[0].lsn}
    alone = [p for p, lsns in records.items()
             if lsns - set().union(*(other for q, other in records.items() if q != p))]
    assert alone, sorted(p.name for p in records)
    alone[len(alone) // 2].unlink()
    with pytest.raises(ReplayFailed, match="have a gap") as info:
        await replay_latest()
    assert info.value.nearest is not None
    await run_replay(url, FileTarget(tmp_path / "before-gap", "jsonl"), info.value.nearest)


@pytest.mark.parametrize("pg_server_dsn", ["15"], indirect=True)
async def test_verify_proves_the_archived_changes_are_the_ones_captured(
        pg_dsn: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    # The capture records, per transaction and table, a digest of the changes it sent;
    # verify recomputes it from the archive. A segment rewritten with one value changed (its
    # counts, header and encryption all valid, as a buggy writer would leave it) is caught.
    from replicator.archive.segment import decode_record_segment, encode_record_segment
    from replicator.crypto import decrypt, encrypt

    _, dests = await build_archive(pg_dsn, kafka_bootstrap, topic_prefix, tmp_path,
                                   transactions=20, points_at=(19,))
    url = dests[0].url

    async def run_verify() -> Any:
        store = open_store(url, sink_environ())
        try:
            return await verify(store, keyring())
        finally:
            await store.close()

    report = await run_verify()
    assert report.ok, report.lines()
    assert report.tables["public.guests"].digests_checked >= 10
    assert report.to_dict()["tables"]["public.guests"]["digests_checked"] >= 10

    folder = tmp_path / "archive" / "segments" / "public.guests"
    ring = keyring()
    for victim in sorted(folder.iterdir()):
        name = f"segments/public.guests/{victim.name}"
        _, decoded = decode_record_segment(decrypt(victim.read_bytes(), name, ring))
        records = [dict(r) for r in decoded]
        updates = [r for r in records if r["op"] == "u" and "name" in (r["after"] or {})]
        if updates:
            break
    else:
        raise AssertionError("no segment holds an update of a guest's name")
    # The same changes as sent again after a reconnect: only their processing time (ts_ms)
    # differs from what the transaction records were computed over. That is the content.
    resent = [{**r, "ts_ms": r["ts_ms"] + 60_000} for r in records]
    data, _ = encode_record_segment(resent, table="public.guests", codec="zstandard")
    victim.write_bytes(encrypt(data, name, ring))
    report = await run_verify()
    assert report.ok, report.lines()

    altered = updates[0]
    altered["after"] = {**altered["after"], "name": "not what was committed"}
    data, _ = encode_record_segment(records, table="public.guests", codec="zstandard")
    victim.write_bytes(encrypt(data, name, ring))

    report = await run_verify()
    assert report.differing == ["public.guests"], report.lines()
    problem = " ".join(report.tables["public.guests"].problems)
    assert "are not the ones the capture sent" in problem
    assert str(Lsn(altered["source"]["lsn"])) in problem
    assert report.tables["public.vendors"].ok
