"""An in-process store (`mem://name/prefix`), for tests and dry runs.

Stores opened with the same name share one space of objects for the life of the process, so a
test can write through one store and read through another, as it would with a bucket.
`MemoryStore.discard(name)` forgets a space. Nothing survives the process.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import NamedTuple

from connectors.base import (
    ObjectInfo,
    ObjectStore,
    check_key,
    check_metadata,
    check_range,
    join_prefix,
)
from connectors.errors import AlreadyExists, Fatal, NotFound

__all__ = ["MemoryStore"]


class _Stored(NamedTuple):
    data: bytes
    metadata: dict[str, str]
    etag: str


_SPACES: dict[str, dict[str, _Stored]] = {}
_ETAGS = itertools.count(1)


class MemoryStore(ObjectStore):
    """Objects in a dict shared by every store of the same *name*."""

    def __init__(self, name: str, prefix: str = "") -> None:
        if not name or "/" in name:
            raise ValueError(f"memory store name must be non-empty without '/', got {name!r}")
        self._objects = _SPACES.setdefault(name, {})
        self._prefix = join_prefix(prefix)
        self.url = f"mem://{name}/{self._prefix}"
        self._closed = False

    @staticmethod
    def discard(name: str) -> None:
        """Forget every object of the space *name*."""
        _SPACES.pop(name, None)

    async def put(self, key: str, data: bytes, *,
                  metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        self._check_open()
        name = self._prefix + check_key(key)
        meta = check_metadata(metadata)
        if name in self._objects:
            raise AlreadyExists("object already exists", url=self.url, key=key)
        stored = _Stored(bytes(data), meta, str(next(_ETAGS)))
        self._objects[name] = stored
        return ObjectInfo(key, len(stored.data), dict(meta), stored.etag)

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        check_range(start, end)
        return self._lookup(key).data[start:end]

    async def stat(self, key: str) -> ObjectInfo:
        stored = self._lookup(key)
        return ObjectInfo(key, len(stored.data), dict(stored.metadata), stored.etag)

    async def list(self, prefix: str = "", *,
                   after: str | None = None) -> AsyncIterator[ObjectInfo]:
        self._check_open()
        start = self._prefix + prefix
        names = sorted(n for n in self._objects if n.startswith(start)
                       and (after is None or n > self._prefix + after))
        for name in names:
            stored = self._objects.get(name)
            if stored is not None:  # deleted while the caller was iterating
                yield ObjectInfo(name[len(self._prefix):], len(stored.data), {}, stored.etag)

    async def delete(self, keys: Iterable[str]) -> None:
        self._check_open()
        for key in keys:
            self._objects.pop(self._prefix + check_key(key), None)

    async def close(self) -> None:
        self._closed = True

    def _lookup(self, key: str) -> _Stored:
        self._check_open()
        stored = self._objects.get(self._prefix + check_key(key))
        if stored is None:
            raise NotFound("object does not exist", url=self.url, key=key)
        return stored

    def _check_open(self) -> None:
        if self._closed:
            raise Fatal("store is closed", url=self.url)
