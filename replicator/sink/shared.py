"""Decoded records shared by the sinks of one process.

Each destination's sink is its own consumer group, so every sink reads every record, and
decoding it (to check it and to learn what the segment's header needs) is the largest part
of a sink's work, the same for all of them. The first sink to read a record decodes it and
leaves the result here; the others take it instead of decoding again. An entry goes once
every other sink took it, or, oldest first, when the cache is at its bound: a sink far behind
the others (say while its store is down) decodes for itself.

An entry is found by topic, partition and offset and is used only if the message's bytes are
the same as those it was decoded from (a topic deleted and created again reuses offsets).
A record that cannot be decoded leaves nothing here: each sink parks it on its own.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["SharedDecodes"]

_T = TypeVar("_T")

#: Entries kept at most (each a message's bytes and what was decoded from it).
BOUND = 50_000


class SharedDecodes(Generic[_T]):
    """What was decoded from each record, for *readers* sinks reading the same records."""

    def __init__(self, readers: int, bound: int = BOUND) -> None:
        self.readers = readers
        self.bound = bound
        # (topic, partition, offset) -> [message bytes, decoded, sinks still to take it]
        self._entries: dict[tuple[str, int, int], list[object]] = {}
        self.hits = 0

    def take(self, key: tuple[str, int, int], raw: bytes) -> _T | None:
        """What another sink decoded from *raw* at *key*, or None."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != raw:
            return None
        left = entry[2]
        assert isinstance(left, int)
        if left <= 1:
            del self._entries[key]
        else:
            entry[2] = left - 1
        self.hits += 1
        return entry[1]  # type: ignore[return-value]

    def put(self, key: tuple[str, int, int], raw: bytes, decoded: _T) -> None:
        """Leave what was decoded from *raw* at *key* for the other sinks."""
        if self.readers <= 1:
            return
        entries = self._entries
        entries[key] = [raw, decoded, self.readers - 1]
        while len(entries) > self.bound:
            del entries[next(iter(entries))]

    def __len__(self) -> int:
        return len(self._entries)
