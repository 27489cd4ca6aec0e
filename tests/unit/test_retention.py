"""Retention's pure parts: durations, and deleting around objects a store refuses to delete
(Object Lock, a legal hold, a credential without delete): each is reported, the rest go.
(Against real archives on every store kind: tests/integration/test_retention.py.)"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import pytest

from connectors.base import ObjectStore
from connectors.errors import Fatal
from connectors.registry import open_store
from replicator.replay.retention import RetentionReport, _delete, parse_duration


def test_durations() -> None:
    assert parse_duration("35d") == timedelta(days=35)
    assert parse_duration(" 12H ") == timedelta(hours=12)
    assert parse_duration("2w") == timedelta(weeks=2)
    for bad in ("", "d", "0d", "-1d", "1.5h", "35", "35y"):
        with pytest.raises(ValueError):
            parse_duration(bad)


class Locking:
    """A real local-folder store whose objects named *locked* cannot be deleted."""

    def __init__(self, inner: ObjectStore, locked: set[str]) -> None:
        self.inner = inner
        self.locked = locked

    async def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for key in keys:
            if key in self.locked:
                raise Fatal("AccessDenied: the object is under a legal hold", url="file://x",
                            key=key)
        await self.inner.delete(keys)


async def test_refused_objects_are_reported_and_the_rest_go(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}", {})
    try:
        keys = [f"segments/public.t/{n:016X}-{n:016X}-00.seg" for n in range(7)]
        for key in keys:
            await store.put(key, b"x")
        report = RetentionReport("d", "", "1d", 0)
        locked = {keys[2], keys[5]}
        await _delete(Locking(store, locked), keys, report, batch=3)  # type: ignore[arg-type]
        assert sorted(report.deleted) == sorted(set(keys) - locked)
        assert set(report.undeletable) == locked
        assert all("legal hold" in why for why in report.undeletable.values())
        left = {info.key async for info in store.list("segments/")}
        assert left == locked
    finally:
        await store.close()
