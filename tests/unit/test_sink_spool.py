"""The spool's batches on a real folder (sink/spool.py): whole or absent, shipped in order
into a real local-folder store, kept until the checkpoint passes them, and found again by a
restarted process. (Against the real sink, Kafka and S3: tests/integration/test_sink_spool.py.)"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from connectors.errors import StoreError
from connectors.registry import open_store
from replicator.crypto import Keyring, encrypt
from replicator.events import Tier
from replicator.position import Lsn
from replicator.sink.spool import Spool
from replicator.sink.stats import SinkStats

KEK = base64.b64encode(b"s" * 32).decode()


def ring() -> Keyring:
    return Keyring.from_env({"REPLICATOR_KEK_UNIT": KEK, "REPLICATOR_KEK_ACTIVE": "UNIT"})


async def spooled(spool: Spool, n: int, lsn: int) -> None:
    batch = spool.begin()
    for i in range(n):
        key = f"segments/public.t/{lsn:016X}-{lsn:016X}-{i:04d}.seg"
        await batch.put(key, encrypt(b"body %d" % i, key, spool.keyring))
    await batch.seal([(Tier.CRITICAL, Lsn(lsn), i) for i in range(n)], hold=False)


async def test_batches_ship_in_order_and_stay_until_counted(tmp_path: Path) -> None:
    stats = SinkStats()
    spool = Spool(tmp_path / "spool", "d", ring(), stats)
    spool.open()
    await spooled(spool, 2, 100)
    await spooled(spool, 1, 200)
    assert spool.waiting == 2 and stats.spool_bytes == spool.bytes > 0
    # an unsealed batch (a crash while writing) is deleted by the next process
    (spool.root / f"{3:020d}.partial" / "objects").mkdir(parents=True)

    again = Spool(tmp_path / "spool", "d", ring(), SinkStats())  # a restarted process
    again.open()
    assert again.waiting == 2 and not list(again.root.glob("*.partial"))
    store = open_store(f"file://{tmp_path / 'store'}", {})
    (tmp_path / "store").mkdir()
    try:
        first, second = again.batches()
        shipped = await again.ship(first, store)
        assert sorted(shipped.changes) == [(Tier.CRITICAL, Lsn(100), 0),
                                           (Tier.CRITICAL, Lsn(100), 1)]
        assert [i.key async for i in store.list("segments/")] == [
            f"segments/public.t/{100:016X}-{100:016X}-0000.seg",
            f"segments/public.t/{100:016X}-{100:016X}-0001.seg"]
        assert again.batches() == [second] and again.waiting == 1
        await again.release(Lsn(100))  # the checkpoint has not passed 100: kept
        assert first.exists()
        # a restart now ships it again (create-only: the same bytes already there)
        third = Spool(tmp_path / "spool", "d", ring())
        third.open()
        assert third.waiting == 2
        await again.release(Lsn(101))
        assert not first.exists() and second.exists()
    finally:
        await store.close()


async def test_a_tampered_manifest_is_refused_by_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "d", ring())
    spool.open()
    await spooled(spool, 1, 100)
    (batch,) = spool.batches()
    (batch / "manifest.json").write_bytes(b"{}")
    store = open_store(f"file://{tmp_path}", {})
    try:
        with pytest.raises(StoreError, match=str(batch)):
            await spool.ship(batch, store)
    finally:
        await store.close()
    assert batch.exists()  # nothing is deleted


async def test_a_failed_write_leaves_no_partial_batch(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "d", ring())
    spool.open()
    batch = spool.begin()
    await batch.put("segments/a/x.seg", b"sealed")
    with pytest.raises(ValueError):
        await batch.put("../escape", b"x")  # not an object name
    (spool.root / batch.folder.name / "objects" / "segments" / "b").write_text("a file")
    with pytest.raises(StoreError, match="cannot spool"):
        await batch.put("segments/b/y.seg", b"sealed")  # its folder is a file: OSError
    assert not batch.folder.exists() and not spool.batches()
