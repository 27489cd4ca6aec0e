"""A failing destination backs off; a busy one is held to its bandwidth."""

from __future__ import annotations

import random

import pytest

from replicator.sink.breaker import BreakerState, CircuitBreaker, CircuitOpen, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_backs_off_longer_each_time() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, base_open_s=1.0, max_open_s=8.0, clock=clock,
                             rng=random.Random(1))
    for _ in range(2):
        breaker.check()
        breaker.failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        breaker.check()
    waits = []
    for _ in range(6):
        waits.append(breaker.seconds_until_retry())
        clock.now += waits[-1]
        breaker.check()  # half-open: one trial call allowed
        assert breaker.state is BreakerState.HALF_OPEN
        breaker.failure()  # the trial failed: open again, for longer (up to the cap)
    assert all(0.5 <= w <= 8.0 for w in waits)
    assert waits[-1] > waits[0]
    clock.now += breaker.seconds_until_retry()
    breaker.check()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0


def test_token_bucket_limits_bytes_per_second() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1000, burst=1000, clock=clock)
    assert bucket.delay_for(1000) == 0  # the burst
    assert bucket.delay_for(500) == pytest.approx(0.5)  # in debt: wait for the refill
    clock.now += 2.0
    assert bucket.delay_for(400) == 0


def test_zero_rate_means_no_limit() -> None:
    assert TokenBucket(rate=0).delay_for(10**12) == 0
