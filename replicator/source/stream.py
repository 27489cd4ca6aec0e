"""The logical replication stream of one slot, read with psycopg 3 without blocking the loop.

psycopg 3 has no replication API, but a connection opened with `replication="database"` and
`autocommit=True` runs `START_REPLICATION ... LOGICAL` and is left in COPY_BOTH state; from
there the libpq wrapper on `conn.pgconn` reads and writes the copy stream. Two kinds of
message arrive:

    w  XLogData   wal start:8, wal end:8, send time:8, then one pgoutput message (byte 25 on)
    k  keepalive  server WAL end:8, send time:8, reply requested:1

and the client answers with standby status updates:

    r  status     write:8, flush:8, apply:8, client time:8, reply requested:1

(LSNs unsigned, times in microseconds since 2000-01-01 UTC, all big-endian.) Flush is the
position the slot may forget: only what is durable downstream may be confirmed, and only at a
transaction's end LSN, or at a keepalive's LSN when no transaction is open (see `confirm` and
`confirm_keepalive_if_idle`). Status updates go out every `status_interval_s`, at once when a
keepalive asks for one, and promptly (coalesced within one loop iteration) after `confirm()`
moves the position.

Throughput: a client that wakes for every packet makes the walsender send one packet per
message, which doubles its CPU. So `read_batch` returns everything already buffered, tries one
more non-blocking read when the buffer looks empty, and once it found the socket empty it does
not read again for PAUSE_S (0.2 ms, the caller's processing time included), then waits on the
socket. Never longer: the kernel's socket buffers then fill and the walsender stalls. asyncio
cannot sleep that briefly (the epoll selector rounds timeouts up to whole milliseconds), so the
pause is cooperative `sleep(0)` yields; as that costs CPU, it only runs while the rate was high
(BUSY_RATE within the last second, and at start-up, when a stream catches up). Measured on
PostgreSQL 15 (benchmarks/capture_stream.py and variants): receiving alone went from ~185k
changes/s at 4.3 us client CPU per change to ~350k/s at 2.0 us.

Errors, mapped at the boundary from libpq and the server's SQLSTATE:

    SourceError
     ├── SourceUnavailable           the server cannot be reached (retriable)
     │    └── StreamDisconnected     the replication connection ended (retriable)
     ├── StreamClosed                read from a stream after stop()
     ├── ReplicationServerError      the server refused or ended replication (carries sqlstate)
     └── SlotError                   the slot cannot be used as it is
          ├── SlotNotFoundError
          ├── SlotInUseError         another connection holds it (retriable: it may be exiting)
          ├── SlotInvalidatedError   its WAL is gone: stop and record a gap, never paper over
          └── SlotMismatchError      other database or other output plugin

There is no reconnect loop here: the caller reconnects with `Backoff` from the slot's
confirmed position, and treats commits at or below what it already applied as duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, Self

import psycopg
from psycopg import pq, sql

from replicator.backoff import Backoff
from replicator.errors import OperatorError, ReplicatorError, TransientError
from replicator.position import INVALID_LSN, Lsn

__all__ = [
    "Backoff",
    "ReplicationServerError",
    "ReplicationStream",
    "SlotError",
    "SlotInUseError",
    "SlotInvalidatedError",
    "SlotMismatchError",
    "SlotNotFoundError",
    "SourceError",
    "SourceUnavailable",
    "StreamClosed",
    "StreamDisconnected",
    "SystemInfo",
    "XLogData",
    "identify_system",
    "negotiate_protocol",
]

logger = logging.getLogger(__name__)

PAUSE_S: Final = 0.0002
"""How long `read_batch` lets the walsender fill the socket once it found it empty."""
BUSY_RATE: Final = 100_000
"""Messages per second above which the pause is worth its CPU (the walsender nears its limit)."""
_RATE_WINDOW_S: Final = 0.05
_BUSY_HOLD_S: Final = 1.0
STOP_TIMEOUT_S: Final = 10.0
"""How long `stop()` waits for the server to end the COPY cleanly before just closing."""

_PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01 UTC in Unix microseconds
_XLOG = struct.Struct(">QQq")
_KEEPALIVE = struct.Struct(">QqB")
_STATUS = struct.Struct(">cQQQqB")
_W: Final = ord("w")
_K: Final = ord("k")
_HEADER: Final = 1 + _XLOG.size  # 25: where the pgoutput message starts
_new: Any = tuple.__new__  # skips NamedTuple's Python-level __new__ on the hot path
_lsn: Any = int.__new__  # an Lsn without range checks: unpacked ">Q" values are always valid


# --- errors -----------------------------------------------------------------------------


class SourceError(ReplicatorError):
    """Capture from Postgres failed. `retriable` says whether reconnecting may help."""

    retriable: bool = False


class SourceUnavailable(SourceError, TransientError):
    """The server cannot be reached; reconnect with backoff."""

    retriable = True


class StreamDisconnected(SourceUnavailable):
    """The replication connection ended; reconnect from the slot's confirmed position."""

    def __init__(self, slot: str, last_lsn: Lsn, reason: str) -> None:
        super().__init__(
            f"replication stream of slot {slot!r} disconnected after receiving up to "
            f"{last_lsn}: {reason.strip()}; reconnect from the slot's confirmed position "
            f"(transactions after it are sent again)"
        )
        self.slot = slot
        self.last_lsn = last_lsn


class StreamClosed(SourceError, TransientError):
    """`read_batch` was called on a stream that was stopped (or never started)."""


class ReplicationServerError(SourceError):
    """The server refused or ended replication for a reason other than the slot itself."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SlotError(SourceError):
    """The replication slot cannot be used as it is; the message says what to do."""

    def __init__(self, slot: str, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.slot = slot
        self.sqlstate = sqlstate


class SlotNotFoundError(SlotError, OperatorError):
    """The slot does not exist (never created, or dropped)."""


class SlotInUseError(SlotError, TransientError):
    """Another connection streams from the slot. Right after a dropped connection this is
    often the old walsender still exiting, so it is retriable."""

    retriable = True


class SlotInvalidatedError(SlotError, OperatorError):
    """The server invalidated the slot: the WAL it needed is gone."""


class SlotMismatchError(SlotError, OperatorError):
    """The slot belongs to another database or uses another output plugin."""


def server_error(slot: str, sqlstate: str | None, message: str, detail: str | None = None,
                 context: str | None = None) -> SourceError:
    """Map an error reported by the server for `slot` to our error tree."""
    state = sqlstate or ""
    text = message.strip() + (f" ({detail.strip()})" if detail else "")
    lowered = text.lower()
    # An option pgoutput would accept, refused in another plugin's startup callback.
    context = context or ""
    other_plugin = "output plugin" in context and 'output plugin "pgoutput"' not in context
    if state.startswith(("08", "57")):
        return StreamDisconnected(slot, INVALID_LSN, text)
    if state == "42704" and "replication slot" in lowered:
        return SlotNotFoundError(slot, (
            f"replication slot {slot!r} does not exist ({text}). If capture created it before, "
            f"it was dropped and changes since its last confirmed position are gone: stop, and "
            f"start over with a new slot and snapshot, recording the gap"), state)
    if state == "55006":
        return SlotInUseError(slot, (
            f"replication slot {slot!r} is in use by another connection ({text}); stop the "
            f"other replicator, or end that connection with SELECT pg_terminate_backend("
            f"active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}'"), state)
    invalidated = ("can no longer", "invalidated", "cannot read from logical replication slot",
                   "has already been removed")
    if state in ("55000", "58P01") and any(word in lowered for word in invalidated):
        return SlotInvalidatedError(slot, (
            f"replication slot {slot!r} was invalidated by the server ({text}): the WAL it "
            f"needed is gone. Capture must stop; after an operator confirms, create a new slot "
            f"and snapshot and record the gap. Do not reuse or advance this slot"), state)
    if "not created in this database" in lowered or other_plugin:
        return SlotMismatchError(slot, (
            f"replication slot {slot!r} cannot be used by this capture ({text}); it belongs to "
            f"another database or uses another output plugin. Configure a different slot name "
            f"(capture needs a pgoutput slot in its own database)"), state)
    return ReplicationServerError(
        f"the server refused replication on slot {slot!r}: [{state or '?'}] {text}", state)


def _from_psycopg(slot: str, exc: psycopg.Error, last_lsn: Lsn) -> SourceError:
    if exc.sqlstate is None:  # no server error: libpq lost or could not open the connection
        return StreamDisconnected(slot, last_lsn, str(exc))
    diag = exc.diag
    error = server_error(slot, exc.sqlstate, diag.message_primary or str(exc),
                         diag.message_detail, diag.context)
    if isinstance(error, StreamDisconnected):
        error = StreamDisconnected(slot, last_lsn, str(exc))
    return error


# --- small values -----------------------------------------------------------------------


class XLogData(NamedTuple):
    """One `w` message: `payload` is the pgoutput message (bytes 25 on)."""

    wal_start: Lsn
    wal_end: Lsn
    send_time_us: int
    payload: bytes


class SystemInfo(NamedTuple):
    """`IDENTIFY_SYSTEM`: which cluster, timeline and WAL position a replication connection sees."""

    systemid: str
    timeline: int
    xlogpos: Lsn
    dbname: str | None


def negotiate_protocol(server_version_num: int, requested: int | Literal["auto"]) -> int:
    """The pgoutput protocol version to ask for.

    pgoutput speaks v1 everywhere, v2 (streaming in-progress transactions) from PostgreSQL 14,
    v3 (two-phase) from 15, v4 (parallel streaming) from 16. "auto" takes the highest; a
    version the server cannot speak is a ValueError naming both.
    """
    if server_version_num >= 160000:
        highest = 4
    elif server_version_num >= 150000:
        highest = 3
    elif server_version_num >= 140000:
        highest = 2
    else:
        highest = 1
    if requested == "auto":
        return highest
    if requested not in (1, 2, 3, 4):
        raise ValueError(f"pgoutput protocol version {requested!r} is not 1, 2, 3, 4 or 'auto'")
    if requested > highest:
        raise ValueError(
            f"pgoutput protocol version {requested} needs a newer server: server version "
            f"{server_version_num} speaks up to {highest}; use {highest} or 'auto'")
    return requested


def now_pg_us() -> int:
    """The client clock as a wire timestamp (microseconds since 2000-01-01 UTC)."""
    return time.time_ns() // 1000 - _PG_EPOCH_US


async def identify_system(dsn: str) -> SystemInfo:
    """Run `IDENTIFY_SYSTEM` on a replication connection to the database of `dsn`."""
    try:
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, replication="database"
        ) as conn:
            cur = await conn.execute("IDENTIFY_SYSTEM")
            row = await cur.fetchone()
    except psycopg.OperationalError as exc:
        if exc.sqlstate is None:
            raise SourceUnavailable(f"cannot reach PostgreSQL for IDENTIFY_SYSTEM: {exc}") from exc
        raise
    if row is None:
        raise ReplicationServerError("IDENTIFY_SYSTEM returned no row")
    return SystemInfo(str(row[0]), int(row[1]), Lsn.parse(row[2]), row[3])


# --- the stream -------------------------------------------------------------------------


class ReplicationStream:
    """`START_REPLICATION` on one slot, read in batches of XLogData.

    Use as `async with ReplicationStream(...) as stream:` or with `start()`/`stop()` (both
    idempotent; a stopped stream is not restarted: make a new one). All methods must be called
    from the event loop's thread.

    Metrics: `server_wal_end` (the server's WAL end from the last keepalive), `received_lsn`
    (highest wal_end received), `confirmed_lsn` (flush position reported to the slot),
    `last_server_time_us` (server clock of the last message, microseconds since 2000).
    """

    def __init__(
        self,
        dsn: str,
        *,
        slot: str,
        publication: str,
        start_lsn: Lsn,
        protocol_version: int,
        streaming: str | None = None,
        messages: bool = True,
        two_phase: bool = False,
        status_interval_s: float = 1.0,
        origin: str | None = None,
    ) -> None:
        if not slot or not publication:
            raise ValueError("a replication stream needs a slot and a publication name")
        if protocol_version not in (1, 2, 3, 4):
            raise ValueError(f"pgoutput protocol version {protocol_version} is not 1, 2, 3 or 4")
        if streaming not in (None, "on", "parallel"):
            raise ValueError(f"streaming must be 'on', 'parallel' or None, not {streaming!r}")
        if streaming == "on" and protocol_version < 2:
            raise ValueError("streaming 'on' needs pgoutput protocol version 2 or later")
        if streaming == "parallel" and protocol_version < 4:
            raise ValueError("streaming 'parallel' needs pgoutput protocol version 4")
        if two_phase and protocol_version < 3:
            raise ValueError("two_phase needs pgoutput protocol version 3 or later")
        if status_interval_s <= 0:
            raise ValueError(f"status_interval_s must be positive, not {status_interval_s}")
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.start_lsn = Lsn(start_lsn)
        self.protocol_version = protocol_version
        self.streaming = streaming
        self.messages = messages
        self.two_phase = two_phase
        self.status_interval_s = status_interval_s
        # pgoutput's `origin` (PostgreSQL 16+): "none" leaves out changes that have one.
        if origin not in (None, "none", "any"):
            raise ValueError(f"origin must be 'none', 'any' or None, not {origin!r}")
        self.origin = origin

        self.server_wal_end: Lsn = INVALID_LSN
        self.received_lsn: Lsn = INVALID_LSN
        # Reporting the start position back is harmless: the server never moves a slot's
        # confirmed position backwards (checked on 15 and 18), and ignores 0/0.
        self.confirmed_lsn: Lsn = self.start_lsn
        self.last_server_time_us = 0

        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._pgconn: pq.abc.PGconn | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state: Literal["new", "started", "stopped"] = "new"
        self._failure: SourceError | None = None
        self._copy_ended = False
        self._reading = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._status_soon = False
        self._writer_added = False
        self._last_status = 0.0
        self._keepalive_last = False  # no XLogData arrived after the latest keepalive
        self._empty_at = 0.0  # when a read last found the socket empty (0: it did not)
        self._busy_until = 0.0  # pause until then: the rate was at least BUSY_RATE recently
        self._window_start = 0.0
        self._window_count = 0

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect and run START_REPLICATION; raises a SourceError subclass on failure."""
        if self._state == "started":
            return
        if self._state == "stopped":
            raise StreamClosed("a stopped ReplicationStream cannot be restarted; make a new one")
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, replication="database")
        except psycopg.Error as exc:
            raise _from_psycopg(self.slot, exc, self.received_lsn) from exc
        try:
            negotiate_protocol(conn.info.server_version, self.protocol_version)
            command = self._command(conn)
            logger.debug("%s", command.as_string(conn))
            try:
                await conn.execute(command)
            except psycopg.Error as exc:
                raise _from_psycopg(self.slot, exc, self.received_lsn) from exc
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._pgconn = conn.pgconn
        self._fd = conn.pgconn.socket
        self._loop = asyncio.get_running_loop()
        self._state = "started"
        self._window_start = time.perf_counter()
        self._busy_until = self._window_start + _BUSY_HOLD_S  # a new stream often catches up
        self._last_status = time.monotonic()
        self._timer = self._loop.call_later(self.status_interval_s, self._tick)

    def _command(self, conn: psycopg.AsyncConnection[Any]) -> sql.Composed:
        # Replication connections take no bind parameters: the text is built with quoting.
        # publication_names is itself a list of identifiers inside a string literal.
        options = [
            ("proto_version", str(self.protocol_version)),
            ("publication_names", sql.Identifier(self.publication).as_string(conn)),
        ]
        if self.messages:
            options.append(("messages", "true"))
        if self.streaming is not None:
            options.append(("streaming", self.streaming))
        if self.two_phase:
            options.append(("two_phase", "true"))
        if self.origin is not None:
            options.append(("origin", self.origin))
        return sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(self.slot),
            sql.SQL(str(self.start_lsn)),
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.SQL(name), sql.Literal(value))
                               for name, value in options),
        )

    async def stop(self) -> None:
        """Report the confirmed position, end the COPY cleanly, close. Never drops the slot.

        A clean end matters: the server releases the slot before it acknowledges the end of
        the COPY, so a new stream can start on it at once.
        """
        if self._state != "started":
            self._state = "stopped"
            return
        self._state = "stopped"
        if self._timer is not None:
            self._timer.cancel()
        self._wake(StreamClosed(f"replication stream of slot {self.slot!r} was stopped"))
        conn, pgconn = self._conn, self._pgconn
        assert conn is not None and pgconn is not None
        try:
            if self._failure is None and not self._copy_ended and pgconn.status == pq.ConnStatus.OK:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await self._end_copy(pgconn)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            logger.debug("replication stream of slot %s did not end cleanly: %s", self.slot, exc)
        finally:
            self._remove_writer()
            self._pgconn = None
            self._conn = None
            await conn.close()

    async def _end_copy(self, pgconn: pq.abc.PGconn) -> None:
        self._send_status()
        pgconn.put_copy_end()
        await self._flush_out(pgconn)
        while True:  # what the server sent before it saw the end is dropped: not confirmed
            n, _ = pgconn.get_copy_data(1)
            if n == -1:
                break
            if n == 0:
                await self._wait_readable()
                pgconn.consume_input()
        await self._results(pgconn)

    async def _results(self, pgconn: pq.abc.PGconn) -> list[pq.abc.PGresult]:
        results: list[pq.abc.PGresult] = []
        while True:
            pgconn.consume_input()
            if pgconn.is_busy():
                await self._wait_readable()
                continue
            result = pgconn.get_result()
            if result is None:
                return results
            results.append(result)

    # --- reading --------------------------------------------------------------------------

    async def read_batch(self, max_messages: int = 2048) -> list[XLogData]:
        """Every XLogData already buffered (up to `max_messages`), waiting for at least one.

        Keepalives are handled inside. Cancel-safe: it awaits only while holding no message,
        so `async with asyncio.timeout(s): await stream.read_batch()` loses nothing (a quiet
        stream's caller does that to confirm keepalive positions now and then).
        """
        if self._reading:
            raise RuntimeError("read_batch is already running on this stream")
        self._reading = True
        try:
            return await self._read_batch(max_messages)
        finally:
            self._reading = False

    async def _read_batch(self, max_messages: int) -> list[XLogData]:
        batch: list[XLogData] = []
        while True:
            if self._empty_at and self._empty_at < self._busy_until:
                # The socket was empty at the last read: give the walsender the rest of the
                # pause to fill it (the caller's processing time counts), so it sends many
                # messages per packet instead of one.
                remaining = self._empty_at + PAUSE_S - time.perf_counter()
                if remaining > 0:
                    await self._let_socket_fill(remaining)
            if self._copy_ended and self._failure is None and self._state == "started":
                self._failure = await self._copy_end_error()
            self._check_readable()  # after every await: stop() may have taken the connection
            self._drain(batch, max_messages)
            if batch:
                self._measure_rate(len(batch))
                return batch
            if self._failure is None and not self._copy_ended:
                await self._wait_readable()

    def _measure_rate(self, count: int) -> None:
        """Keep pausing for a while after the rate was last high: a backlog arrives in bursts
        (a transaction's changes are sent at its commit), with quiet gaps between them."""
        self._window_count += count
        now = time.perf_counter()
        elapsed = now - self._window_start
        if elapsed >= _RATE_WINDOW_S:
            if self._window_count >= BUSY_RATE * elapsed:
                self._busy_until = now + _BUSY_HOLD_S
            self._window_start = now
            self._window_count = 0

    async def _let_socket_fill(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:  # noqa: ASYNC110 (sub-ms: see the module docstring)
            await asyncio.sleep(0)

    def _check_readable(self) -> None:
        if self._state != "started":
            raise StreamClosed(f"replication stream of slot {self.slot!r} is not started")
        if self._failure is not None:
            raise self._failure

    def _drain(self, batch: list[XLogData], max_messages: int) -> None:
        """Move buffered messages into `batch`; the hot loop, so locals and few calls."""
        pgconn = self._pgconn
        assert pgconn is not None
        get = pgconn.get_copy_data
        received = self.received_lsn
        send_time = 0
        count = len(batch)
        consumed = False
        data_after_keepalive = False
        self._empty_at = 0.0
        try:
            while count < max_messages:
                n, data = get(1)
                if n > 0:
                    consumed = False
                    kind = data[0]
                    if kind == _W:
                        start, end, send_time = _XLOG.unpack_from(data, 1)
                        start_lsn = _lsn(Lsn, start)
                        end_lsn = start_lsn if end == start else _lsn(Lsn, end)
                        batch.append(_new(XLogData, (start_lsn, end_lsn, send_time,
                                                     bytes(data[_HEADER:]))))
                        count += 1
                        if end > received:
                            received = end_lsn
                        data_after_keepalive = True
                    elif kind == _K:
                        self._keepalive(data)
                        data_after_keepalive = False
                    else:
                        self._failure = ReplicationServerError(
                            f"unexpected copy message {bytes(data[:1])!r} on the replication "
                            f"stream of slot {self.slot!r}")
                        break
                elif n == 0:
                    if consumed:
                        self._empty_at = time.perf_counter()
                        return  # the socket had nothing more either
                    pgconn.consume_input()
                    consumed = True
                else:
                    self._copy_ended = True
                    break
        except psycopg.Error as exc:
            self._failure = _from_psycopg(self.slot, exc, Lsn(received))
        finally:
            self.received_lsn = received
            if data_after_keepalive:
                self._keepalive_last = False
            if send_time:
                self.last_server_time_us = send_time

    def _keepalive(self, data: memoryview) -> None:
        end, send_time, reply = _KEEPALIVE.unpack_from(data, 1)
        if end > self.server_wal_end:
            self.server_wal_end = Lsn(end)
        self.last_server_time_us = send_time
        self._keepalive_last = True
        if reply:
            self._send_status()

    async def _copy_end_error(self) -> SourceError:
        """The server ended the COPY: its results say why (none: it is shutting down)."""
        pgconn = self._pgconn
        assert pgconn is not None
        error: SourceError = StreamDisconnected(
            self.slot, self.received_lsn, "the server ended the stream (shutting down?)")
        try:
            results = await self._results(pgconn)
        except psycopg.Error as exc:
            results = []
            error = _from_psycopg(self.slot, exc, self.received_lsn)
        for result in results:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                error = self._result_error(result)
                break
        return error

    def _result_error(self, result: pq.abc.PGresult) -> SourceError:
        fields = pq.DiagnosticField

        def field(which: pq.DiagnosticField) -> str | None:
            value = result.error_field(which)
            return value.decode(errors="replace") if value is not None else None

        message = field(fields.MESSAGE_PRIMARY) or result.error_message.decode(errors="replace")
        error = server_error(self.slot, field(fields.SQLSTATE), message,
                             field(fields.MESSAGE_DETAIL), field(fields.CONTEXT))
        if isinstance(error, StreamDisconnected):
            error = StreamDisconnected(self.slot, self.received_lsn, message)
        return error

    async def _wait_readable(self) -> None:
        loop = self._loop
        assert loop is not None
        waiter = loop.create_future()
        self._waiter = waiter
        loop.add_reader(self._fd, _resolve, waiter)
        try:
            await waiter
        finally:
            # stop() may have taken over the socket for its own wait meanwhile.
            if self._waiter is waiter:
                loop.remove_reader(self._fd)
                self._waiter = None

    def _wake(self, error: SourceError) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    # --- positions and status updates -----------------------------------------------------

    def confirm(self, flush_lsn: Lsn) -> None:
        """Everything up to `flush_lsn` (a transaction's end LSN) is durable downstream.

        The position never moves backwards (lower values are ignored). A status update follows
        promptly, once per loop iteration however many confirms came in it.
        """
        if flush_lsn <= self.confirmed_lsn:
            return
        seen = max(self.received_lsn, self.server_wal_end, self.start_lsn)
        if flush_lsn > seen:
            raise ValueError(f"cannot confirm {Lsn(flush_lsn)} on slot {self.slot!r}: nothing "
                             f"past {seen} has been received")
        self.confirmed_lsn = Lsn(flush_lsn)
        if self._state == "started" and not self._status_soon and self._loop is not None:
            self._status_soon = True
            self._loop.call_soon(self._send_status)

    def confirm_keepalive_if_idle(self, idle: bool) -> Lsn | None:
        """Confirm the latest keepalive's WAL end when that is safe; returns it if it moved.

        The caller passes `idle=True` when no transaction is open and every transaction it has
        received is confirmed. The keepalive position may then be confirmed only if no XLogData
        arrived after that keepalive (which could start a transaction below it). This is what
        lets a slot advance while only other tables or databases write.
        """
        if not idle or not self._keepalive_last or self.server_wal_end <= self.confirmed_lsn:
            return None
        self.confirm(self.server_wal_end)
        return self.confirmed_lsn

    async def flush_status(self) -> None:
        """Send a status update now and wait until it has left the client."""
        if self._state != "started" or self._pgconn is None or self._failure is not None:
            return
        self._send_status()
        try:
            await self._flush_out(self._pgconn)
        except psycopg.Error as exc:
            self._failure = _from_psycopg(self.slot, exc, self.received_lsn)
            raise self._failure from exc

    def _tick(self) -> None:
        loop = self._loop
        if self._state != "started" or loop is None:
            return
        due = self._last_status + self.status_interval_s
        if time.monotonic() >= due - 0.001:
            self._send_status()
            due = self._last_status + self.status_interval_s
        self._timer = loop.call_at(loop.time() + max(0.001, due - time.monotonic()), self._tick)

    def _send_status(self, reply: bool = False) -> None:
        """Queue a standby status update; errors surface on the next read."""
        self._status_soon = False
        pgconn = self._pgconn
        if self._state != "started" or pgconn is None or self._failure is not None:
            return
        flush = self.confirmed_lsn
        message = _STATUS.pack(b"r", max(self.received_lsn, flush), flush, flush, now_pg_us(),
                               1 if reply else 0)
        try:
            pgconn.put_copy_data(message)
            if pgconn.flush() == 1:
                self._add_writer()
        except psycopg.Error as exc:
            self._failure = _from_psycopg(self.slot, exc, self.received_lsn)
            self._wake(self._failure)
            return
        self._last_status = time.monotonic()

    def _add_writer(self) -> None:
        if not self._writer_added and self._loop is not None:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writer_added = True

    def _remove_writer(self) -> None:
        if self._writer_added and self._loop is not None:
            self._loop.remove_writer(self._fd)
            self._writer_added = False

    def _on_writable(self) -> None:
        pgconn = self._pgconn
        try:
            if pgconn is None or pgconn.flush() == 0:
                self._remove_writer()
        except psycopg.Error as exc:
            self._remove_writer()
            self._failure = _from_psycopg(self.slot, exc, self.received_lsn)
            self._wake(self._failure)

    async def _flush_out(self, pgconn: pq.abc.PGconn) -> None:
        loop = self._loop
        assert loop is not None
        self._remove_writer()
        while pgconn.flush() == 1:
            waiter = loop.create_future()
            loop.add_writer(self._fd, _resolve, waiter)
            try:
                await waiter
            finally:
                loop.remove_writer(self._fd)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
