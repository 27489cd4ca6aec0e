"""Progress objects of several sink processes for one destination (sink/members.py): what a
member writes is what the checkpointer counts; a forged or unsealed one is not counted; the
checkpointer deletes only what the checkpoint passed, never an object that holds."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from connectors.registry import open_store
from replicator.archive.layout import progress_key, progress_prefix
from replicator.crypto import Keyring, encrypt
from replicator.events import Tier, TransactionRecord
from replicator.position import Lsn
from replicator.sink.checkpoint import CompletenessTracker
from replicator.sink.members import (
    ProgressReader,
    ProgressWriter,
    decode_progress,
    encode_progress,
)

KEK = base64.b64encode(b"m" * 32).decode()


def ring() -> Keyring:
    return Keyring.from_env({"REPLICATOR_KEK_UNIT": KEK, "REPLICATOR_KEK_ACTIVE": "UNIT"})


def test_round_trip_groups_by_tier_and_commit() -> None:
    changes = [(Tier.CRITICAL, Lsn(100), 0), (Tier.CRITICAL, Lsn(100), 2),
               (Tier.LOW, Lsn(100), 1), (Tier.HIGH, Lsn(300), 0)]
    doc = json.loads(encode_progress("d", "m1", changes, hold=False))
    assert doc["changes"]["critical"] == [[100, [0, 2]]]
    found, hold, top = decode_progress(doc)
    assert sorted(found) == sorted(changes) and not hold and top == 300


@pytest.mark.parametrize("doc", [
    {"changes": [], "hold": False, "max_lsn": 1},
    {"changes": {"urgent": [[1, [0]]]}, "hold": False, "max_lsn": 1},
    {"changes": {"critical": [[1, ["0"]]]}, "hold": False, "max_lsn": 1},
    {"changes": {"critical": [[1, [0]]]}, "hold": "no", "max_lsn": 1},
    {"changes": {"critical": [[1, [0]]]}, "hold": False},
])
def test_malformed_progress_is_refused(doc: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        decode_progress(doc)


def test_names_sort_in_the_order_written() -> None:
    writer = ProgressWriter("d/1", member="abc")
    names = [writer.next([])[0] for _ in range(12)]
    assert names == sorted(names)
    assert names[0] == progress_key("d/1", "abc", 1)
    assert names[0].startswith(progress_prefix("d/1")) and "d%2F1" in names[0]


async def test_reader_counts_sealed_objects_only_and_prunes(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}", {})
    keys = ring()
    writer = ProgressWriter("dest")
    try:
        key1, doc1 = writer.next([(Tier.CRITICAL, Lsn(10), 0), (Tier.CRITICAL, Lsn(20), 0)])
        await store.put(key1, encrypt(doc1, key1, keys))
        # a forged object: plain JSON claiming a change durable
        forged = progress_key("dest", "intruder", 1)
        await store.put(forged, encode_progress("dest", "intruder",
                                                [(Tier.CRITICAL, Lsn(30), 0)], hold=False))
        # sealed under another name (copied): refused as well
        moved = progress_key("dest", "intruder", 2)
        await store.put(moved, encrypt(doc1, key1, keys))
        reader = ProgressReader(store, "dest", keys)
        changes, hold, _ = await reader.read_new()
        assert sorted(changes) == [(Tier.CRITICAL, Lsn(10), 0), (Tier.CRITICAL, Lsn(20), 0)]
        assert not hold and reader.refused == 2
        assert await reader.read_new() == ([], False, [])  # each object is read once

        writer.hold = True
        key2, doc2 = writer.next([])
        await store.put(key2, encrypt(doc2, key2, keys))
        assert (await reader.read_new())[1] is True

        await reader.prune(Lsn(21))  # key1's changes are all below: deleted; key2 holds
        left = {info.key async for info in store.list(progress_prefix("dest"))}
        assert key1 not in left and key2 in left and forged in left and moved in left
        reader.reset()
        assert (await reader.read_new())[1] is True  # read again from the start
    finally:
        await store.close()


def test_checkpoint_waits_for_every_member() -> None:
    """The checkpointer's own changes and a member's reported ones complete a transaction
    together; either alone does not."""
    tracker = CompletenessTracker()
    record = TransactionRecord(xid=5, commit_lsn=Lsn(100), end_lsn=Lsn(120), commit_ts_us=1,
                               counts={"public.guests": 2},
                               tier_counts={"critical": 1, "low": 1})
    tracker.records_durable([record])
    tracker.changes_durable([(Tier.CRITICAL, Lsn(100), 0)])  # its own partition
    assert tracker.advance() < Lsn(120)
    found, _, _ = decode_progress(json.loads(encode_progress(
        "d", "m", [(Tier.LOW, Lsn(100), 1)], hold=False)))
    tracker.changes_durable(found)  # a member's
    assert tracker.advance() == Lsn(120)
