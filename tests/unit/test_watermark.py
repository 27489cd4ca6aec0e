"""The acknowledgement watermark never confirms past an unacknowledged or failed message."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.position import Lsn
from replicator.transport.watermark import AckWatermark


def tx_lsns(i: int) -> tuple[Lsn, Lsn]:
    """Commit and end LSN of the i-th transaction: commits 0x100 apart, end 0x30 past commit."""
    commit = 0x1000 + 0x100 * i
    return Lsn(commit), Lsn(commit + 0x30)


class Model:
    """Drives an AckWatermark through one interleaving and checks it against a direct model."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.watermark = AckWatermark()
        self.begun = 0
        self.unacked: list[int] = []  # one entry per outstanding message: its tx index
        self.acked = [0] * len(sizes)
        self.failed: set[int] = set()
        self.last: Lsn | None = None

    def begin_next(self) -> None:
        i = self.begun
        commit, end = tx_lsns(i)
        self.watermark.begin_tx(commit, end, self.sizes[i])
        self.unacked.extend([i] * self.sizes[i])
        self.begun += 1

    def ack(self, position: int) -> None:
        i = self.unacked.pop(position)
        self.watermark.ack(tx_lsns(i)[0])
        self.acked[i] += 1

    def fail(self, position: int) -> None:
        i = self.unacked.pop(position)
        self.watermark.fail(tx_lsns(i)[0])
        self.failed.add(i)

    def expected(self) -> Lsn | None:
        """End LSN of the newest transaction of the fully acknowledged, failure-free prefix."""
        best = None
        for i in range(self.begun):
            if self.acked[i] < self.sizes[i] or i in self.failed:
                break
            best = tx_lsns(i)[1]
        return best

    def check(self) -> None:
        now = self.watermark.confirmable()
        assert now == self.expected()
        if self.last is not None:
            assert now is not None and now >= self.last, "the watermark went backwards"
        # Never past a transaction with an unacknowledged message or a failure.
        for i in {*self.unacked, *self.failed}:
            assert now is None or now < tx_lsns(i)[1]
        self.last = now


SIZES = st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=12)


@given(SIZES, st.data())
def test_any_ack_order_confirms_only_fully_acked_prefixes(sizes: list[int],
                                                          data: st.DataObject) -> None:
    model = Model(sizes)
    while model.begun < len(sizes) or model.unacked:
        # Either register the next transaction or acknowledge any outstanding message.
        can_begin = model.begun < len(sizes)
        if can_begin and (not model.unacked or data.draw(st.booleans(), label="begin")):
            model.begin_next()
        else:
            model.ack(data.draw(st.integers(0, len(model.unacked) - 1), label="ack"))
        model.check()
    assert model.watermark.confirmable() == tx_lsns(len(sizes) - 1)[1]
    assert model.watermark.pending_transactions == 0


@given(SIZES, st.data())
def test_a_failed_message_stops_the_watermark_for_good(sizes: list[int],
                                                       data: st.DataObject) -> None:
    model = Model(sizes)
    for _ in sizes:
        model.begin_next()
    failing = data.draw(st.integers(0, len(model.unacked) - 1), label="fail")
    failed_tx = model.unacked[failing]
    order = data.draw(st.permutations(range(len(model.unacked))), label="order")
    # Acknowledge everything else in a random order, failing one message on the way.
    outstanding = list(range(len(model.unacked)))
    for message in order:
        position = outstanding.index(message)
        outstanding.pop(position)
        if message == failing:
            model.fail(position)
        else:
            model.ack(position)
        model.check()
    assert model.watermark.confirmable() == (tx_lsns(failed_tx - 1)[1] if failed_tx else None)
    assert model.watermark.failed_at == tx_lsns(failed_tx)[0]
    model.watermark.idle_lsn(Lsn(0xFFFF_FFFF))  # a keepalive cannot jump over the failure
    assert model.watermark.confirmable() == (tx_lsns(failed_tx - 1)[1] if failed_tx else None)


def test_idle_position_confirms_only_when_nothing_before_it_is_pending() -> None:
    watermark = AckWatermark()
    assert watermark.confirmable() is None
    watermark.idle_lsn(Lsn(0x500))
    assert watermark.confirmable() == 0x500

    commit, end = tx_lsns(0)  # 0x1000 / 0x1030
    watermark.begin_tx(commit, end, 2)
    watermark.idle_lsn(Lsn(0x2000))  # a keepalive after the transaction
    assert watermark.confirmable() == 0x500
    watermark.ack(commit)
    assert watermark.confirmable() == 0x500
    watermark.ack(commit)
    assert watermark.confirmable() == 0x2000
    watermark.idle_lsn(Lsn(0x1800))  # an older keepalive never moves it back
    assert watermark.confirmable() == 0x2000


def test_idle_position_below_a_pending_transaction_is_confirmable() -> None:
    watermark = AckWatermark()
    watermark.idle_lsn(Lsn(0x900))
    watermark.begin_tx(Lsn(0x1000), Lsn(0x1030), 1)
    # Confirming 0x900 cannot skip a transaction that commits at 0x1000.
    assert watermark.confirmable() == 0x900


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda w: w.begin_tx(Lsn(10), Lsn(20), 0), "at least one message"),
        (lambda w: w.begin_tx(Lsn(10), Lsn(5), 1), "before its commit LSN"),
        (lambda w: (w.begin_tx(Lsn(10), Lsn(20), 1), w.begin_tx(Lsn(10), Lsn(30), 1)),
         "out of commit order"),
        (lambda w: w.ack(Lsn(10)), "no unacknowledged message"),
        (lambda w: (w.begin_tx(Lsn(10), Lsn(20), 1), w.ack(Lsn(10)), w.ack(Lsn(10))),
         "no unacknowledged message"),
        (lambda w: w.fail(Lsn(10)), "not pending"),
        (lambda w: (w.idle_lsn(Lsn(50)), w.confirmable(), w.begin_tx(Lsn(10), Lsn(20), 1)),
         "before the already confirmable"),
    ],
)
def test_misuse_is_an_error(setup: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        setup(AckWatermark())  # type: ignore[operator]


async def test_track_acks_delivered_and_fails_undelivered_futures() -> None:
    watermark = AckWatermark()
    loop = asyncio.get_running_loop()
    first, second = tx_lsns(0), tx_lsns(1)
    watermark.begin_tx(*first, 2)
    watermark.begin_tx(*second, 1)
    futures = [loop.create_future() for _ in range(3)]
    watermark.track(first[0], futures[0])
    watermark.track(first[0], futures[1])
    watermark.track(second[0], futures[2])

    futures[2].set_result("metadata")
    futures[0].set_result("metadata")
    await asyncio.sleep(0)
    assert watermark.confirmable() is None  # the first transaction still has one message out
    futures[1].set_result("metadata")
    await asyncio.sleep(0)
    assert watermark.confirmable() == second[1]

    third = tx_lsns(2)
    watermark.begin_tx(*third, 2)
    failing, cancelled = loop.create_future(), loop.create_future()
    watermark.track(third[0], failing)
    watermark.track(third[0], cancelled)
    error = RuntimeError("broker said no")
    failing.set_exception(error)
    cancelled.cancel()
    await asyncio.sleep(0)
    assert watermark.confirmable() == second[1]
    assert watermark.failed_at == third[0] and watermark.failure is error


def test_delivery_reports_without_futures() -> None:
    watermark = AckWatermark()
    first, second = tx_lsns(0), tx_lsns(1)
    watermark.begin_tx(*first, 2)
    watermark.begin_tx(*second, 1)
    watermark.delivered(first[0], None)
    assert watermark.confirmable() is None  # one message of the first still out
    watermark.delivered(first[0], None)
    assert watermark.confirmable() == first[1]
    error = RuntimeError("broker said no")
    watermark.delivered(second[0], error)
    assert watermark.confirmable() == first[1]
    assert watermark.failed_at == second[0] and watermark.failure is error
