"""The storage seam: one small async interface that every backend implements.

The replicator's archive (`replicator.archive`) needs very little from a store: write an
object once, read it (or a byte range of it), list names in order from a position, delete, and
stat. `ObjectStore` is exactly that, and its docstrings are the contract that
`tests/integration/test_store_contract.py` checks against every backend, the way Litestream's
`ReplicaClient` is one interface with one short file per backend.

Keys are `/`-separated names relative to the store's root (the prefix of its URL). A key is
not empty, does not start or end with `/`, and has no empty, `.` or `..` segment: the same
archive must be writable to a local folder as to a bucket. Metadata names are lower-case
identifiers (`[a-z][a-z0-9_]*`, at most 64 characters) with printable ASCII values, at most
2 KiB in all: the intersection of what S3 (lower-cases names), Azure (C# identifiers) and GCS
accept, so a round trip is exact on every backend.

Shared logic lives here as plain functions over the interface (validation, range arithmetic,
bounded concurrency), not in a base-class template, so each backend reads top to bottom.
"""

from __future__ import annotations

import abc
import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import NamedTuple, TypeVar

__all__ = [
    "DEFAULT_MULTIPART_THRESHOLD",
    "DEFAULT_PAGE_SIZE",
    "ObjectInfo",
    "ObjectStore",
    "check_key",
    "check_metadata",
    "check_range",
    "join_prefix",
    "run_bounded",
]

#: Objects larger than this are uploaded in parts (S3 multipart, Azure staged blocks, GCS
#: resumable upload). Segments are usually smaller; snapshots often are not.
DEFAULT_MULTIPART_THRESHOLD = 8 * 1024 * 1024
#: Names asked for per LIST request; 1000 is the most S3 and GCS return per page.
DEFAULT_PAGE_SIZE = 1000

_METADATA_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_METADATA_VALUE = re.compile(r"[\x20-\x7e]*")
_METADATA_MAX_BYTES = 2048

T = TypeVar("T")


class ObjectInfo(NamedTuple):
    """What a store knows about one object.

    `etag` identifies this version of the object where the backend has such a thing (the S3 or
    Azure ETag, the GCS generation); it is opaque and only comparable within one backend.
    """

    key: str
    size: int
    metadata: dict[str, str]
    etag: str | None


class ObjectStore(abc.ABC):
    """An object store holding immutable objects under a root.

    Every method may raise `connectors.errors.Retriable` (try again later) or `Fatal` (a person
    must act), besides the kinds named below; SDK exceptions never escape. Invalid arguments
    (a malformed key, a bad range, bad metadata) raise `ValueError` before any I/O.

    A store is an async context manager; `close()` releases its connections and is idempotent.
    Network clients are created on first use, so constructing a store does no I/O.
    """

    #: The store's display URL: scheme, bucket and prefix, no credentials. Errors name it.
    url: str

    @abc.abstractmethod
    async def put(self, key: str, data: bytes, *,
                  metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        """Create the object *key* holding *data* and *metadata*; never overwrite.

        Raises `AlreadyExists` if *key* exists, and then the existing object is unchanged. The
        check and the write are one atomic step on the server (S3 `If-None-Match: *`, Azure
        `If-None-Match: *`, GCS `ifGenerationMatch=0`, a hard link on a local disk), so of two
        concurrent writers exactly one wins. When the call returns, the object is durable and
        visible to `get`, `stat` and `list`. Large objects are uploaded in parts and become
        visible all at once, or not at all.
        """

    @abc.abstractmethod
    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        """The bytes `[start, end)` of *key* (`end=None`: to the end).

        Like a slice, a range reaching past the end is cut short, and one starting at or past
        the end is empty. Raises `NotFound` if *key* does not exist, whatever the range.
        `start < 0` or `end < start` is a `ValueError`.
        """

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectInfo:
        """Size, metadata and version tag of *key*. Raises `NotFound` if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "", *, after: str | None = None) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with *prefix*, in key order (byte order of UTF-8).

        With *after*, only keys strictly greater than it: a listing resumes from the last key a
        caller saw, which is how the replicator plans from positions. All pages are followed.
        The `metadata` of listed objects is always empty (S3 does not return it in a listing);
        call `stat()` for it. An empty store or prefix yields nothing; it is not an error.
        """

    @abc.abstractmethod
    async def delete(self, keys: Iterable[str]) -> None:
        """Delete *keys*. A key that does not exist is not an error, so deleting is idempotent.

        Backends delete in batches where the service allows it. If a key cannot be deleted,
        the error names it; keys deleted before the failure stay deleted.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent; a closed store raises `Fatal` when used."""

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def check_key(key: str) -> str:
    """*key* if it is a valid object key, else `ValueError` saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key must be a non-empty string, got {key!r}")
    if "\x00" in key:
        raise ValueError(f"object key {key!r} contains a NUL character")
    if len(key.encode("utf-8", "surrogatepass")) > 1024:
        raise ValueError(f"object key {key[:40]!r}… is longer than 1024 bytes")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(
                f"object key {key!r} has an empty, '.' or '..' segment; keys are relative "
                "'/'-separated names like 'folder/name.ext'"
            )
    return key


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of *metadata* if every backend can store it exactly, else `ValueError`."""
    if not metadata:
        return {}
    size = 0
    for name, value in metadata.items():
        if not isinstance(name, str) or _METADATA_NAME.fullmatch(name) is None:
            raise ValueError(f"metadata name {name!r} must match [a-z][a-z0-9_]{{0,63}}")
        if not isinstance(value, str) or _METADATA_VALUE.fullmatch(value) is None:
            raise ValueError(f"metadata {name!r} must be printable ASCII text, got {value!r}")
        size += len(name) + len(value)
    if size > _METADATA_MAX_BYTES:
        raise ValueError(f"metadata is {size} bytes; at most {_METADATA_MAX_BYTES} are portable")
    return dict(metadata)


def check_range(start: int, end: int | None) -> None:
    """`ValueError` unless `0 <= start` and (`end is None` or `start <= end`)."""
    if start < 0:
        raise ValueError(f"range start must be >= 0, got {start}")
    if end is not None and end < start:
        raise ValueError(f"range end {end} is before its start {start}")


def join_prefix(prefix: str) -> str:
    """A store prefix in canonical form: empty, or `/`-separated segments ending in `/`."""
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    check_key(prefix)
    return prefix + "/"


async def run_bounded(calls: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Await every call, at most *limit* at a time; results in order.

    The first failure cancels the calls still running and is raised as it is (not wrapped in
    an exception group), so callers see one `StoreError` naming one key.
    """
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    tasks = [asyncio.ensure_future(one(call)) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
