"""When the service's compaction checks begin: on the timer, or early for a burst of rows
(`replicator.sink.compaction.Compactor`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from replicator.config import CompactionConfig, DestinationConfig
from replicator.sink import compaction
from replicator.sink.compaction import Compactor


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Polls *condition* for up to *within* seconds of the clock (a busy machine makes each
    sleep longer, so no count of sleeps bounds the time)."""
    deadline = time.monotonic() + within
    while True:  # until it holds or the time is up
        if condition() or time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.01)


def compactor(written: list[int] | None, **settings: float) -> Compactor:
    destination = DestinationConfig(name="local", url="file:///nowhere",
                                    compaction=CompactionConfig(**settings))
    counter = None if written is None else (lambda: written[0])
    return Compactor(destination, {}, written=counter)


def test_the_timer_starts_a_check_whatever_was_written() -> None:
    c = compactor([0], check_every_s=600, min_changes=100, min_interval_s=60)
    assert not c.due(now=599.0, last_started=0.0, written_then=0)
    assert c.due(now=600.0, last_started=0.0, written_then=0)


def test_a_burst_starts_a_check_early_but_not_before_the_minimum_interval() -> None:
    written = [0]
    c = compactor(written, check_every_s=600, min_changes=100, min_interval_s=60)
    written[0] = 99
    assert not c.due(now=120.0, last_started=0.0, written_then=0)  # fewer than min_changes
    written[0] = 100
    assert c.due(now=120.0, last_started=0.0, written_then=0)
    assert not c.due(now=59.0, last_started=0.0, written_then=0)  # too soon after the last
    # Counted from the last check: 100 rows then, 150 now.
    written[0] = 150
    assert not c.due(now=120.0, last_started=0.0, written_then=100)


def test_no_early_check_without_a_threshold_or_a_count() -> None:
    written = [10**6]
    assert not compactor(written, check_every_s=600, min_changes=0,
                         min_interval_s=0).due(now=1.0, last_started=0.0, written_then=0)
    assert not compactor(None, check_every_s=600, min_changes=1,
                         min_interval_s=0).due(now=1.0, last_started=0.0, written_then=0)


async def test_the_schedule_runs_once_per_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compaction, "POLL_S", 0.01)
    written = [0]
    c = compactor(written, check_every_s=3600, min_changes=100, min_interval_s=0)
    runs: list[int] = []

    async def run_once() -> bool:
        runs.append(written[0])
        return True

    monkeypatch.setattr(c, "run_once", run_once)
    task = asyncio.create_task(c.run())
    await asyncio.sleep(0.1)
    assert runs == []  # nothing written, an hour to the next check
    written[0] = 100
    await until(lambda: bool(runs))
    assert runs == [100]
    written[0] = 150  # 50 rows since that check: not yet
    await asyncio.sleep(0.1)
    assert runs == [100]
    written[0] = 200
    await until(lambda: len(runs) == 2)
    assert runs == [100, 200]
    c.stop()
    await asyncio.wait_for(task, 5)
