"""Protection for one destination: a circuit breaker and a bandwidth limit.

A failing destination must never stop the others, nor hammer a store that is down. Each
destination has its own breaker: after `threshold` consecutive failures it opens and calls
are refused for a backoff that doubles (with jitter) up to `max_open_s`; then one trial call
is let through (half-open): success closes it, failure opens it again for longer.

The token bucket caps the bytes per second written to a destination (0 means no limit), so
a catch-up after an outage does not saturate the link the service shares with the database.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Callable

from replicator.errors import TransientError


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpen(TransientError):
    """The destination is failing; the call was not attempted."""


class CircuitBreaker:
    def __init__(self, *, threshold: int = 3, base_open_s: float = 1.0, max_open_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.threshold = threshold
        self.base_open_s = base_open_s
        self.max_open_s = max_open_s
        self.clock = clock
        self._rng = rng or random.Random()
        self.failures = 0
        self.opened = 0  # how many times in a row it opened
        self.state = BreakerState.CLOSED
        self.retry_at = 0.0

    def check(self) -> None:
        """Raise `CircuitOpen` if no call may be made now."""
        if self.state is BreakerState.OPEN:
            if self.clock() < self.retry_at:
                raise CircuitOpen(f"destination failing; next try in "
                                  f"{self.retry_at - self.clock():.1f}s")
            self.state = BreakerState.HALF_OPEN

    def seconds_until_retry(self) -> float:
        return max(0.0, self.retry_at - self.clock()) if self.state is BreakerState.OPEN else 0.0

    def success(self) -> None:
        self.failures = 0
        self.opened = 0
        self.state = BreakerState.CLOSED

    def failure(self) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            ceiling = min(self.max_open_s, self.base_open_s * 2 ** min(self.opened, 30))
            self.opened += 1
            self.state = BreakerState.OPEN
            self.retry_at = self.clock() + ceiling / 2 + self._rng.uniform(0, ceiling / 2)


class TokenBucket:
    """`rate` bytes per second with bursts up to `burst` bytes; `rate <= 0` means unlimited."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, 1.0)
        self.clock = clock
        self.tokens = self.burst
        self.updated = clock()

    def delay_for(self, amount: float) -> float:
        """Take *amount* tokens (going into debt if need be); seconds to wait before using them."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    async def take(self, amount: float) -> None:
        delay = self.delay_for(amount)
        if delay > 0:
            await asyncio.sleep(delay)
