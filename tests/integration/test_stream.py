"""The replication stream against real PostgreSQL 15 and 18, decoded with pgoutput.Decoder."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from replicator.position import Lsn
from replicator.source import pgoutput as pg
from replicator.source.stream import (
    Backoff,
    ReplicationStream,
    SlotInUseError,
    SlotMismatchError,
    SlotNotFoundError,
    StreamClosed,
    StreamDisconnected,
    identify_system,
    negotiate_protocol,
    server_error,
)

SLOT = "cap_slot"
PUB = "cap_pub"
Message = pg.PgOutputMessage


async def execute(dsn: str, *statements: str, params: tuple[Any, ...] | None = None) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            await conn.execute(statement, params)


async def fetch(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
    return None if row is None else row[0]


async def prepare(dsn: str) -> None:
    await execute(
        dsn,
        "CREATE TABLE guest (id int PRIMARY KEY, name text NOT NULL)",
        "CREATE TABLE other (id int PRIMARY KEY)",
        f"CREATE PUBLICATION {PUB} FOR TABLE guest",
        f"SELECT pg_create_logical_replication_slot('{SLOT}', 'pgoutput')",
    )


def stream(dsn: str, **kwargs: Any) -> ReplicationStream:
    settings: dict[str, Any] = {"slot": SLOT, "publication": PUB, "start_lsn": Lsn(0),
                                "protocol_version": 1, "streaming": None}
    settings.update(kwargs)
    return ReplicationStream(dsn, **settings)


async def read_until(s: ReplicationStream, decoder: pg.Decoder,
                     done: Callable[[list[Message]], bool]) -> list[Message]:
    messages: list[Message] = []
    async with asyncio.timeout(20):
        while not done(messages):
            for m in await s.read_batch():
                messages.append(decoder.decode(m.payload, lsn=m.wal_start))
    return messages


def commits(messages: list[Message]) -> list[pg.Commit]:
    return [m for m in messages if isinstance(m, pg.Commit)]


async def poll(check: Callable[[], Any]) -> Any:
    """`check()` until it is true, for up to 5 s."""
    deadline = time.monotonic() + 5
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


# --- no server ----------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "auto"), [(130000, 1), (140000, 2), (150000, 3),
                                               (160000, 4), (180000, 4)])
def test_negotiate_protocol_takes_the_highest_the_server_speaks(version: int, auto: int) -> None:
    assert negotiate_protocol(version, "auto") == auto
    assert negotiate_protocol(version, 1) == 1
    if auto < 4:
        with pytest.raises(ValueError, match=f"speaks up to {auto}"):
            negotiate_protocol(version, auto + 1)


def test_options_the_protocol_cannot_carry_are_refused() -> None:
    with pytest.raises(ValueError, match="parallel"):
        stream("", protocol_version=3, streaming="parallel")
    with pytest.raises(ValueError, match="version 2"):
        stream("", protocol_version=1, streaming="on")
    with pytest.raises(ValueError, match="two_phase"):
        stream("", protocol_version=2, two_phase=True)


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    backoff = Backoff(base_s=0.5, max_s=4.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(200)]
    ceilings = [min(4.0, 0.5 * 2**i) for i in range(200)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[10:]) > 3.0  # reaches the cap, jittered below it
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_server_errors_map_to_slot_errors_with_advice() -> None:
    invalid = server_error("s1", "55000", 'can no longer access replication slot "s1"',
                           'This replication slot has been invalidated due to "wal_removed".')
    assert type(invalid).__name__ == "SlotInvalidatedError"
    assert "'s1'" in str(invalid) and "new slot" in str(invalid)
    old = server_error("s1", "55000", 'can no longer get changes from replication slot "s1"',
                       "This slot has been invalidated because it exceeded the maximum "
                       "reserved size.")
    assert type(old).__name__ == "SlotInvalidatedError"
    elsewhere = server_error("s1", "55000",
                             'replication slot "s1" was not created in this database')
    assert isinstance(elsewhere, SlotMismatchError)
    assert isinstance(server_error("s1", "57P01", "terminating connection"), StreamDisconnected)


# --- against the server -------------------------------------------------------------------


async def test_identify_system(pg_dsn: str) -> None:
    info = await identify_system(pg_dsn)
    assert info.timeline >= 1 and info.xlogpos > 0 and info.systemid.isdigit()
    assert info.dbname == await fetch(pg_dsn, "SELECT current_database()")


async def test_streams_transactions_that_decode(pg_dsn: str) -> None:
    await prepare(pg_dsn)
    await execute(pg_dsn,
                  "INSERT INTO guest VALUES (1, 'Ada'), (2, 'Grace')",
                  "UPDATE guest SET name = 'Ada L.' WHERE id = 1",
                  "INSERT INTO other VALUES (1)",  # not published
                  "DELETE FROM guest WHERE id = 2",
                  "SELECT pg_logical_emit_message(true, 'wedsync', 'hello')")
    decoder = pg.Decoder(1)
    async with stream(pg_dsn) as s:
        messages = await read_until(s, decoder, lambda ms: len(commits(ms)) == 4)
        assert s.received_lsn >= commits(messages)[-1].end_lsn
        assert s.last_server_time_us > 0
    rows = [m for m in messages if isinstance(m, pg.Insert | pg.Update | pg.Delete)]
    assert [type(m).__name__ for m in rows] == ["Insert", "Insert", "Update", "Delete"]
    first, _, update, delete = rows
    assert isinstance(first, pg.Insert) and first.new == (b"1", b"Ada")
    assert isinstance(update, pg.Update) and update.new == (b"1", b"Ada L.")
    assert isinstance(delete, pg.Delete) and delete.old == (b"2", None)
    relation = next(m for m in messages if isinstance(m, pg.Relation))
    assert relation.name == "guest"
    [note] = [m for m in messages if isinstance(m, pg.LogicalMessage)]
    assert (note.prefix, note.content) == ("wedsync", b"hello")
    ends = [c.end_lsn for c in commits(messages)]
    assert ends == sorted(ends)


async def test_xlogdata_carries_positions(pg_dsn: str) -> None:
    await prepare(pg_dsn)
    await execute(pg_dsn, "INSERT INTO guest VALUES (1, 'Ada')")
    async with stream(pg_dsn) as s:
        batch: list[Any] = []
        async with asyncio.timeout(20):
            while len(batch) < 4:  # Begin, Relation, Insert, Commit
                batch += await s.read_batch()
    begin, _, insert, commit = (pg.Decoder(1).decode(m.payload) for m in batch[:4])
    assert isinstance(commit, pg.Commit) and isinstance(begin, pg.Begin)
    assert isinstance(insert, pg.Insert)
    assert batch[1].wal_start == 0  # Relation messages carry 0/0
    assert batch[3].wal_start == commit.end_lsn  # a Commit is sent at its end LSN
    assert all(m.wal_end == m.wal_start for m in batch)


async def test_confirm_advances_the_slot(pg_dsn: str) -> None:
    await prepare(pg_dsn)
    await execute(pg_dsn, "INSERT INTO guest VALUES (1, 'A')", "INSERT INTO guest VALUES (2, 'B')")
    query = f"SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
    async with stream(pg_dsn, status_interval_s=30.0) as s:
        messages = await read_until(s, pg.Decoder(1), lambda ms: len(commits(ms)) == 2)
        first = commits(messages)[0].end_lsn
        s.confirm(first)
        s.confirm(Lsn(first - 1))  # never backwards
        assert s.confirmed_lsn == first

        async def advanced() -> bool:
            return Lsn.parse(await fetch(pg_dsn, query)) == first

        # The status interval is 30 s: only the prompt update after confirm() can do this.
        assert await poll(advanced), "confirm() did not reach pg_replication_slots"
        with pytest.raises(ValueError, match="nothing past"):
            s.confirm(Lsn(s.received_lsn + 10**9))


async def test_restart_resends_only_unconfirmed_transactions(pg_dsn: str) -> None:
    await prepare(pg_dsn)
    for i in range(3):
        await execute(pg_dsn, f"INSERT INTO guest VALUES ({i}, 'g{i}')")
    async with stream(pg_dsn) as s:
        first = await read_until(s, pg.Decoder(1), lambda ms: len(commits(ms)) == 3)
        confirmed = commits(first)[0].end_lsn
        s.confirm(confirmed)
        await s.flush_status()
    # A clean stop releases the slot at once: the next stream starts without SlotInUseError.
    async with stream(pg_dsn, start_lsn=confirmed) as s:
        again = await read_until(s, pg.Decoder(1), lambda ms: len(commits(ms)) == 2)
    inserted = [m.new[0] for m in again if isinstance(m, pg.Insert)]
    assert inserted == [b"1", b"2"]
    assert [c.end_lsn for c in commits(again)] == [c.end_lsn for c in commits(first)[1:]]
    assert any(isinstance(m, pg.Relation) for m in again)  # the server re-sends relations


async def test_idle_stream_answers_keepalives(pg_dsn: str) -> None:
    """With a 1 s wal_sender_timeout and no periodic status (60 s), only the answers to the
    server's reply-requested keepalives keep the connection alive through 3 s of silence."""
    await prepare(pg_dsn)
    dsn = make_conninfo(pg_dsn, options="-c wal_sender_timeout=1000")
    async with stream(dsn, status_interval_s=60.0) as s:
        reading = asyncio.ensure_future(s.read_batch())
        await asyncio.sleep(0.5)
        pid = await fetch(pg_dsn, "SELECT active_pid FROM pg_replication_slots "
                                  "WHERE slot_name = %s", (SLOT,))
        reply_query = "SELECT reply_time FROM pg_stat_replication WHERE pid = %s"
        before = await fetch(pg_dsn, reply_query, (pid,))
        await asyncio.sleep(3.0)
        after = await fetch(pg_dsn, reply_query, (pid,))
        assert after is not None and (before is None or after > before)
        assert not reading.done()
        await execute(pg_dsn, "SELECT pg_logical_emit_message(false, 'ping', 'pong')")
        async with asyncio.timeout(10):
            batch = await reading
        message = pg.Decoder(1).decode(batch[0].payload)
        assert isinstance(message, pg.LogicalMessage) and message.content == b"pong"
        assert s.server_wal_end > 0 and s.last_server_time_us > 0


async def test_keepalive_position_is_confirmed_only_when_idle(pg_dsn: str) -> None:
    await prepare(pg_dsn)
    await execute(pg_dsn, "INSERT INTO guest VALUES (1, 'Ada')")
    async with stream(pg_dsn) as s:
        messages = await read_until(s, pg.Decoder(1), lambda ms: len(commits(ms)) == 1)
        s.confirm(commits(messages)[0].end_lsn)
        # Writes to an unpublished table send no data, only keepalives that move past them.
        await execute(pg_dsn, "INSERT INTO other VALUES (1)")
        target = Lsn.parse(await fetch(pg_dsn, "SELECT pg_current_wal_lsn()::text"))
        deadline = time.monotonic() + 10
        while s.server_wal_end < target and time.monotonic() < deadline:
            try:
                async with asyncio.timeout(0.2):
                    await s.read_batch()
            except TimeoutError:
                pass
        assert s.server_wal_end >= target
        assert s.confirm_keepalive_if_idle(False) is None
        moved = s.confirm_keepalive_if_idle(True)
        assert moved is not None and moved >= target and s.confirmed_lsn == moved


@pytest.mark.parametrize("protocol", ["2", "auto"])
async def test_large_transactions_stream_before_commit(pg_dsn: str, protocol: str) -> None:
    """64kB of decoding memory: a big transaction arrives in stream blocks while still open;
    a rolled-back one ends with Stream Abort. (PostgreSQL 18 no longer streams a transaction it
    already knows to be aborted, so the rollback happens while the stream is reading.) "auto"
    is protocol 3 with streaming 'on' on 15, and 4 with streaming 'parallel' on 18."""
    await prepare(pg_dsn)
    dsn = make_conninfo(pg_dsn, options="-c logical_decoding_work_mem=64kB")
    version = await fetch(pg_dsn, "SELECT current_setting('server_version_num')::int")
    proto = negotiate_protocol(version, "auto") if protocol == "auto" else int(protocol)
    streaming = "parallel" if proto >= 4 else "on"
    decoder = pg.Decoder(proto)

    def streamed_rows(ms: list[Message]) -> int:
        return sum(1 for m in ms if isinstance(m, pg.Insert) and m.xid is not None)

    async with stream(dsn, protocol_version=proto, streaming=streaming) as s, \
            await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        await conn.execute("INSERT INTO guest SELECT g, repeat('x', 50) "
                           "FROM generate_series(1, 5000) g")
        messages = await read_until(s, decoder, lambda ms: streamed_rows(ms) > 0
                                    and isinstance(ms[-1], pg.StreamStop))
        assert not commits(messages)  # still open: these rows came before any commit
        await conn.commit()
        await conn.execute("INSERT INTO guest SELECT g, 'gone' "
                           "FROM generate_series(5001, 10000) g")
        messages += await read_until(s, decoder, lambda ms: streamed_rows(ms) > 0
                                     and isinstance(ms[-1], pg.StreamStop))
        await conn.rollback()
        await execute(pg_dsn, "INSERT INTO guest VALUES (0, 'marker')")
        messages += await read_until(s, decoder, lambda ms: len(commits(ms)) == 1)
    kinds = {type(m).__name__ for m in messages}
    assert {"StreamStart", "StreamStop", "StreamCommit", "StreamAbort"} <= kinds
    streamed = [m for m in messages if isinstance(m, pg.Insert) and m.xid is not None]
    committed_xid = next(m.xid for m in messages if isinstance(m, pg.StreamCommit))
    aborted = next(m for m in messages if isinstance(m, pg.StreamAbort))
    assert sum(1 for m in streamed if m.xid == committed_xid) == 5000
    assert aborted.xid != committed_xid
    assert any(m.xid == aborted.xid for m in streamed)  # rolled-back rows were streamed too
    if streaming == "parallel":  # protocol 4 tells a parallel apply worker where it aborted
        assert aborted.abort_lsn is not None and aborted.abort_lsn > 0
    [marker] = [m for m in messages if isinstance(m, pg.Insert) and m.xid is None]
    assert marker.new == (b"0", b"marker")


async def test_dropped_slot_is_a_slot_error_naming_it(pg_dsn: str) -> None:
    await prepare(pg_dsn)
    await execute(pg_dsn, f"SELECT pg_drop_replication_slot('{SLOT}')")
    with pytest.raises(SlotNotFoundError, match=SLOT) as caught:
        await stream(pg_dsn).start()
    assert caught.value.slot == SLOT and not caught.value.retriable


async def test_slot_in_use_and_other_plugin(pg_dsn: str) -> None:
    await prepare(pg_dsn)
    await execute(pg_dsn, "SELECT pg_create_logical_replication_slot('td_slot', 'test_decoding')")
    async with stream(pg_dsn):
        with pytest.raises(SlotInUseError, match="pg_terminate_backend") as caught:
            await stream(pg_dsn).start()
        assert caught.value.retriable
    with pytest.raises(SlotMismatchError, match="td_slot"):
        await stream(pg_dsn, slot="td_slot").start()


async def test_connection_loss_is_stream_disconnected(pg_dsn: str) -> None:
    await prepare(pg_dsn)
    await execute(pg_dsn, "INSERT INTO guest VALUES (1, 'Ada')")
    s = stream(pg_dsn)
    await s.start()
    try:
        await read_until(s, pg.Decoder(1), lambda ms: len(commits(ms)) == 1)
        reading = asyncio.ensure_future(s.read_batch())
        await execute(pg_dsn, "SELECT pg_terminate_backend(active_pid) "
                              f"FROM pg_replication_slots WHERE slot_name = '{SLOT}'")
        with pytest.raises(StreamDisconnected, match=SLOT) as caught:
            async with asyncio.timeout(10):
                await reading
        assert str(s.received_lsn) in str(caught.value) and caught.value.retriable
    finally:
        await s.stop()
        await s.stop()  # idempotent
    with pytest.raises(StreamClosed):
        await s.read_batch()


async def test_stop_wakes_a_waiting_reader(pg_dsn: str) -> None:
    await prepare(pg_dsn)
    s = stream(pg_dsn)
    await s.start()
    reading = asyncio.ensure_future(s.read_batch())
    await asyncio.sleep(0.2)
    await s.stop()
    with pytest.raises(StreamClosed):
        await reading
    # The slot was released cleanly and is still there.
    assert await fetch(pg_dsn, "SELECT NOT active FROM pg_replication_slots "
                               "WHERE slot_name = %s", (SLOT,))


async def test_reading_never_blocks_the_loop_and_loses_nothing_on_timeouts(pg_dsn: str) -> None:
    """A ticker shares the loop with a stream that is read under short timeouts while rows
    are written: the ticker is never held up, and every transaction arrives once, in order."""
    await prepare(pg_dsn)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def writer() -> None:
        for first in range(0, 20_000, 2_000):
            await execute(pg_dsn, "INSERT INTO guest SELECT g, 'n' "
                                  f"FROM generate_series({first + 1}, {first + 2_000}) g")
            await asyncio.sleep(0.05)

    decoder = pg.Decoder(1)
    ids: list[int] = []
    ends: list[Lsn] = []
    gc.collect()  # a full collection of earlier tests' garbage is not the stream's pause
    ticking = asyncio.create_task(ticker())
    try:
        async with stream(pg_dsn) as s:
            writing = asyncio.create_task(writer())
            async with asyncio.timeout(60):
                while len(ends) < 10:
                    try:
                        async with asyncio.timeout(0.01):
                            batch = await s.read_batch(max_messages=500)
                    except TimeoutError:
                        continue
                    for m in batch:
                        message = decoder.decode(m.payload)
                        if isinstance(message, pg.Insert):
                            ids.append(int(message.new[0]))  # type: ignore[arg-type]
                        elif isinstance(message, pg.Commit):
                            ends.append(message.end_lsn)
            await writing
    finally:
        ticking.cancel()
    assert ids == list(range(1, 20_001))
    assert ends == sorted(ends)
    # Blocking reads would hold it for seconds; the margin is for a busy two-core machine.
    assert max(gaps) < 0.25, f"the event loop was held up for {max(gaps) * 1000:.0f} ms"
