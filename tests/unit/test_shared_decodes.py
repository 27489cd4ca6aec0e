"""The sinks of one process share what they decoded: one decodes, the others take it; an
entry is used only for the same bytes, goes once every other sink took it, and the cache
stays within its bound (a sink far behind decodes for itself)."""

from __future__ import annotations

from replicator.sink.shared import SharedDecodes


def test_the_others_take_it_once_each_then_it_is_gone() -> None:
    shared: SharedDecodes[str] = SharedDecodes(readers=3)
    key = ("wedsync.critical", 0, 41)
    assert shared.take(key, b"message") is None
    shared.put(key, b"message", "decoded")
    assert shared.take(key, b"message") == "decoded"
    assert shared.take(key, b"message") == "decoded"
    assert shared.take(key, b"message") is None and len(shared) == 0
    assert shared.hits == 2


def test_other_bytes_at_the_same_offset_are_decoded_again() -> None:
    # A topic deleted and created again reuses offsets.
    shared: SharedDecodes[str] = SharedDecodes(readers=2)
    key = ("wedsync.critical", 0, 7)
    shared.put(key, b"first", "first decoded")
    assert shared.take(key, b"second") is None
    assert shared.take(key, b"first") == "first decoded"


def test_the_bound_drops_the_oldest_and_one_sink_keeps_nothing() -> None:
    shared: SharedDecodes[int] = SharedDecodes(readers=2, bound=100)
    for offset in range(250):
        shared.put(("t", 0, offset), b"%d" % offset, offset)
    assert len(shared) == 100
    assert shared.take(("t", 0, 149), b"149") is None  # dropped: the laggard decodes
    assert shared.take(("t", 0, 150), b"150") == 150
    alone: SharedDecodes[int] = SharedDecodes(readers=1)
    alone.put(("t", 0, 1), b"1", 1)
    assert len(alone) == 0 and alone.take(("t", 0, 1), b"1") is None
