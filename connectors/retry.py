"""Retries for object stores: `RetryingStore(store)` wraps any store with one policy.

A wrapper rather than a decorator on each backend, so backends stay single-attempt and simple
(their SDKs' own retries are switched off), every backend retries the same way, and a test can
run a bare store to see raw errors. Only `Retriable` is retried; `NotFound`, `AlreadyExists`
and `Fatal` pass straight through.

- Backoff is capped exponential with full jitter: before attempt n+1 the wait is uniform in
  `[0, min(max_s, base_s * 2**(n-1))]`, which spreads many writers apart after an outage.
- A call gives up after `max_attempts` attempts or once the next wait would pass `deadline_s`
  since it started, raising `Retriable` that says so, `from` the last failure. The caller
  decides what comes next (a sink keeps its batch and tries the flush again later).
- Logging: one warning when the store starts failing and one info line when a call gets an
  answer again, per wrapped store, however many calls fail in between.
- Cancellation is never caught: a cancelled call stops at once, mid-wait or mid-request, and
  logs nothing.

Calls are made safe to repeat where the store's contract alone would not be:
- `put` may fail with `Retriable` after the object was in fact written (the answer was lost).
  If a later attempt then meets `AlreadyExists`, the object is read back; when it holds exactly
  our bytes and metadata, the put succeeded and its `ObjectInfo` is returned.
- `list` resumes after the last key it yielded, so a failure on page 40 does not replay pages
  1 to 39 to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from connectors.base import ObjectInfo, ObjectStore
from connectors.errors import AlreadyExists, NotFound, Retriable

__all__ = ["RetryPolicy", "RetryingStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long one call keeps trying: waits between `0` and `max_s`, within both limits."""

    base_s: float = 0.25
    max_s: float = 10.0
    max_attempts: int = 6
    deadline_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.max_s:
            raise ValueError(f"retry needs 0 < base_s <= max_s, got {self.base_s}, {self.max_s}")
        if self.max_attempts < 1 or self.deadline_s <= 0:
            raise ValueError("retry needs max_attempts >= 1 and deadline_s > 0")

    def ceiling(self, failures: int) -> float:
        """The longest wait after *failures* consecutive failures (1 or more)."""
        return min(self.max_s, self.base_s * 2.0 ** min(failures - 1, 62))


class RetryingStore(ObjectStore):
    """*store*, with every call retried on `Retriable` under *policy*."""

    def __init__(self, store: ObjectStore, policy: RetryPolicy | None = None, *,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.policy = policy or RetryPolicy()
        self.url = store.url
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clock = clock
        self._failing_since: float | None = None
        self._failures = 0

    async def put(self, key: str, data: bytes, *,
                  metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        attempts = 0

        async def once() -> ObjectInfo:
            nonlocal attempts
            attempts += 1
            return await self.store.put(key, data, metadata=metadata)

        try:
            return await self._retry(once)
        except AlreadyExists:
            if attempts < 2:
                raise
            info = await self.stat(key)
            if (info.size == len(data) and info.metadata == dict(metadata or {})
                    and await self.get(key) == bytes(data)):
                return info
            raise

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        return await self._retry(lambda: self.store.get(key, start=start, end=end))

    async def stat(self, key: str) -> ObjectInfo:
        return await self._retry(lambda: self.store.stat(key))

    async def list(self, prefix: str = "", *,
                   after: str | None = None) -> AsyncIterator[ObjectInfo]:
        attempt = _Attempt(self)
        while True:
            try:
                async for info in self.store.list(prefix, after=after):
                    self._succeeded()
                    yield info
                    after = info.key
                self._succeeded()
                return
            except Retriable as exc:
                await attempt.failed(exc)

    async def delete(self, keys: Iterable[str]) -> None:
        batch = tuple(keys)  # an iterator would be spent by the first attempt
        await self._retry(lambda: self.store.delete(batch))

    async def close(self) -> None:
        await self.store.close()

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = _Attempt(self)
        while True:
            try:
                result = await call()
            except Retriable as exc:
                await attempt.failed(exc)
            except (NotFound, AlreadyExists):
                self._succeeded()  # the store answered: it works again
                raise
            else:
                self._succeeded()
                return result

    def _failed(self, exc: Retriable) -> None:
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = self._clock()
            logger.warning("object store %s is failing, retrying with backoff: %s", self.url, exc)

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            logger.info("object store %s recovered after %.1f s and %d failed attempts",
                        self.url, self._clock() - self._failing_since, self._failures)
            self._failing_since = None
            self._failures = 0


class _Attempt:
    """The backoff state of one call."""

    def __init__(self, owner: RetryingStore) -> None:
        self._owner = owner
        self._started = owner._clock()
        self._failures = 0

    async def failed(self, exc: Retriable) -> None:
        """Wait before the next attempt, or raise if this call has tried long enough."""
        owner = self._owner
        owner._failed(exc)
        self._failures += 1
        delay = owner._rng.uniform(0, owner.policy.ceiling(self._failures))
        elapsed = owner._clock() - self._started
        if (self._failures >= owner.policy.max_attempts
                or elapsed + delay > owner.policy.deadline_s):
            raise Retriable(f"{exc.reason}; gave up after {self._failures} attempts in "
                            f"{elapsed:.1f} s", url=exc.url, key=exc.key) from exc
        await owner._sleep(delay)
