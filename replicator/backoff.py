"""Capped exponential backoff with full jitter, for every reconnect loop (capture's source
and Kafka, the sinks' broker at start-up)."""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Capped exponential backoff with full jitter, for the caller's reconnect loop.

    The n-th delay is uniform in [0, min(max_s, base_s * 2**n)]: full jitter spreads
    reconnecting clients apart. `reset()` after a connection has worked again.
    """

    def __init__(self, base_s: float = 0.5, max_s: float = 30.0, *,
                 rng: random.Random | None = None) -> None:
        if not 0 < base_s <= max_s:
            raise ValueError(f"backoff needs 0 < base_s <= max_s, got {base_s} and {max_s}")
        self.base_s = base_s
        self.max_s = max_s
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.base_s * 2 ** min(self.attempts, 62))
        self.attempts += 1
        return self._rng.uniform(0, ceiling)

    async def sleep(self) -> float:
        delay = self.next_delay()
        await asyncio.sleep(delay)
        return delay

    def reset(self) -> None:
        self.attempts = 0
