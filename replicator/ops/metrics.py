"""Prometheus metrics, `/healthz` and `/readyz` on one small HTTP endpoint.

Values are read from the stages' stats objects at scrape time (a custom collector), so the
hot loops only bump plain integers. The endpoint listens on localhost unless configured
otherwise (`metrics.listen`), and exposes no configuration and no secrets.

| metric | labels | meaning |
|---|---|---|
| `wedsync_capture_confirmed_lsn` | | slot position confirmed (durable in Kafka) |
| `wedsync_capture_lag_bytes` | | WAL the slot holds (read from the server) |
| `wedsync_capture_heartbeat_rtt_seconds` | | last heartbeat round trip: source lag in seconds |
| `wedsync_capture_events_total` | tier | changes published |
| `wedsync_capture_transactions_total` | | transactions published |
| `wedsync_capture_reconnects_total` | | stream reconnects |
| `wedsync_capture_unresolved_weddings_total` | | changes whose wedding id did not resolve |
| `wedsync_incidents_total` | | incidents raised (`ops.incidents`) |
| `wedsync_sink_checkpoint_lsn` | destination, tier | durable position (tier `all`: overall) |
| `wedsync_sink_lag_records` | destination, partition | records not yet read |
| `wedsync_rpo_seconds` | destination, tier | age of the oldest change not yet durable (0: none) |
| `wedsync_sink_bytes_written_total` | destination | bytes of objects written |
| `wedsync_sink_segments_written_total` | destination | objects written |
| `wedsync_sink_failures_total` | destination | failed flushes |
| `wedsync_sink_breaker_open` | destination | 1 while the destination's breaker is not closed |
| `wedsync_sink_dead_letters_total` | destination | undecodable records parked as dead letters |
| `wedsync_sink_paused` | destination | 1 while intake is paused (buffers full or breaker open) |
| `wedsync_sink_raw_records_total` | destination, kind | records archived undecoded |
| `wedsync_sink_spool_bytes` | destination | bytes in the local spool, not yet shipped |
| `wedsync_sink_spooling` | destination | 1 while flushes go into the local spool (store out) |
| `wedsync_sink_held` | destination, what | what the sink holds in memory (below) |
| `wedsync_conflicts_total` | destination, table, rule, group | cross-origin conflicts seen |
| `process_resident_memory_bytes`, … | | the process (Prometheus's standard metrics) |
| `wedsync_compaction_runs_total` | destination | compaction runs (`replicator compact`) |
| `wedsync_compaction_failures_total` | destination | compaction runs that failed |
| `wedsync_compaction_last_success_timestamp_seconds` | destination | end of the last good run |
| `wedsync_archive_objects`, `..._bytes` | destination, kind | the archive, after each compaction |

`wedsync_conflicts_total` (`sink/conflicts.py`): `rule` is what decided (`precedence`,
`commit_time`, `origin`), `group` the column group (empty: the whole row).
`wedsync_sink_held`'s `what`: `buffered_rows` and `buffered_bytes` (changes read, not yet
written), `uncommitted_runs` (records read whose offsets are not committed yet, in runs),
`tracked_transactions` (the completeness tracker's), `transaction_records` (read, not yet
written). The process metrics (`process_resident_memory_bytes`, `process_cpu_seconds_total`,
`process_open_fds`, ...) come from Linux's /proc.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from replicator.errors import OperatorError

log = logging.getLogger(__name__)


class MetricsError(OperatorError):
    """The metrics endpoint cannot listen where it is configured to."""


class PipelineCollector(Collector):
    def __init__(self, capture: Callable[[], Any | None],
                 sinks: Callable[[], Mapping[str, Any]],
                 compaction: Callable[[], Mapping[str, Any]] | None = None,
                 incidents: Callable[[], int | None] | None = None) -> None:
        self._capture = capture
        self._sinks = sinks
        self._compaction = compaction or dict
        self._incidents = incidents or (lambda: None)

    def collect(self) -> Iterator[Metric]:
        incidents = self._incidents()
        if incidents is not None:
            yield CounterMetricFamily("wedsync_incidents", "Incidents raised (a bulk delete or "
                                      "rewrite of a near wedding's rows)", value=incidents)
        capture = self._capture()
        if capture is not None:
            stats = capture.stats
            yield GaugeMetricFamily("wedsync_capture_confirmed_lsn",
                                    "Slot position confirmed (durable in Kafka)",
                                    value=int(stats.confirmed_lsn))
            held = getattr(stats, "slot_lag_bytes", None)  # from the server, when read
            yield GaugeMetricFamily(
                "wedsync_capture_lag_bytes",
                "WAL the slot holds: the server's WAL position minus its confirmed_flush_lsn",
                value=held if held is not None else
                max(0, int(stats.server_lsn) - int(stats.confirmed_lsn)))
            if stats.last_heartbeat_rtt_s is not None:
                yield GaugeMetricFamily("wedsync_capture_heartbeat_rtt_seconds",
                                        "Last heartbeat round trip through the slot",
                                        value=stats.last_heartbeat_rtt_s)
            events = CounterMetricFamily("wedsync_capture_events", "Changes published",
                                         labels=["tier"])
            for tier, count in sorted(stats.events_by_tier.items()):
                events.add_metric([tier], count)
            yield events
            yield CounterMetricFamily("wedsync_capture_transactions", "Transactions published",
                                      value=stats.transactions)
            yield CounterMetricFamily("wedsync_capture_reconnects", "Stream reconnects",
                                      value=stats.reconnects)
            yield CounterMetricFamily("wedsync_capture_unresolved_weddings",
                                      "Changes whose wedding id did not resolve",
                                      value=capture.calendar.unresolved)
        sinks = self._sinks()
        checkpoint = GaugeMetricFamily("wedsync_sink_checkpoint_lsn", "Durable position",
                                       labels=["destination", "tier"])
        lag = GaugeMetricFamily("wedsync_sink_lag_records", "Records not yet read",
                                labels=["destination", "partition"])
        written = CounterMetricFamily("wedsync_sink_bytes_written", "Bytes of objects written",
                                      labels=["destination"])
        segments = CounterMetricFamily("wedsync_sink_segments_written", "Objects written",
                                       labels=["destination"])
        failures = CounterMetricFamily("wedsync_sink_failures", "Failed flushes",
                                       labels=["destination"])
        breaker = GaugeMetricFamily("wedsync_sink_breaker_open",
                                    "1 while the destination's breaker is not closed",
                                    labels=["destination"])
        dead = CounterMetricFamily("wedsync_sink_dead_letters",
                                   "Undecodable records parked as dead letters",
                                   labels=["destination"])
        rpo = GaugeMetricFamily("wedsync_rpo_seconds",
                                "Age of the oldest committed change not yet durable in the "
                                "destination (0: nothing pending)",
                                labels=["destination", "tier"])
        now = time.time()
        paused = GaugeMetricFamily("wedsync_sink_paused",
                                   "1 while intake is paused (buffers full or breaker open)",
                                   labels=["destination"])
        raw = CounterMetricFamily("wedsync_sink_raw_records",
                                  "Records archived without being decoded (the raw path)",
                                  labels=["destination", "kind"])
        spool = GaugeMetricFamily("wedsync_sink_spool_bytes",
                                  "Bytes in the local spool, not yet shipped to the store",
                                  labels=["destination"])
        spooling = GaugeMetricFamily("wedsync_sink_spooling",
                                     "1 while flushes go into the local spool (the store is out)",
                                     labels=["destination"])
        held = GaugeMetricFamily("wedsync_sink_held",
                                 "What the sink holds in memory (buffered rows and bytes, "
                                 "uncommitted offset runs, tracked transactions, transaction "
                                 "records not yet written)", labels=["destination", "what"])
        conflicts = CounterMetricFamily("wedsync_conflicts", "Cross-origin conflicts seen, by "
                                        "the rule that decided them", labels=[
                                            "destination", "table", "rule", "group"])
        for name, stats in sorted(sinks.items()):
            for (table, rule, group), count in sorted(stats.conflicts.items()):
                conflicts.add_metric([name, table, rule, group], count)
            for what, count in sorted(stats.held.items()):
                held.add_metric([name, what], count)
            spool.add_metric([name], stats.spool_bytes)
            spooling.add_metric([name], 1 if stats.spooling else 0)
            raw.add_metric([name, "change"], stats.raw_changes)
            raw.add_metric([name, "transaction"], stats.raw_transactions)
            checkpoint.add_metric([name, "all"], int(stats.checkpoint))
            for tier, lsn in sorted(stats.tier_checkpoints.items()):
                checkpoint.add_metric([name, tier.value], int(lsn))
            for tier, age in stats.rpo_seconds(now).items():
                rpo.add_metric([name, tier], age)
            for partition, behind in sorted(stats.lag.items()):
                lag.add_metric([name, partition], behind)
            written.add_metric([name], stats.bytes_written)
            segments.add_metric([name], stats.segments_written)
            failures.add_metric([name], stats.failures)
            breaker.add_metric([name], 0 if stats.breaker == "closed" else 1)
            dead.add_metric([name], stats.dead_letters)
            paused.add_metric([name], 1 if stats.paused else 0)
        yield from (checkpoint, lag, rpo, written, segments, failures, breaker, dead, paused,
                    raw, spool, spooling, held, conflicts)
        runs = CounterMetricFamily("wedsync_compaction_runs", "Compaction runs",
                                   labels=["destination"])
        failed = CounterMetricFamily("wedsync_compaction_failures", "Failed compaction runs",
                                     labels=["destination"])
        last = GaugeMetricFamily("wedsync_compaction_last_success_timestamp_seconds",
                                 "End of the last successful compaction run (Unix time)",
                                 labels=["destination"])
        objects = GaugeMetricFamily("wedsync_archive_objects", "Objects the archive holds",
                                    labels=["destination", "kind"])
        size = GaugeMetricFamily("wedsync_archive_bytes", "Bytes the archive holds",
                                 labels=["destination", "kind"])
        for name, stats in sorted(self._compaction().items()):
            runs.add_metric([name], stats.runs)
            failed.add_metric([name], stats.failures)
            last.add_metric([name], stats.last_success_at)
            for kind, row in sorted(stats.usage.items()):
                objects.add_metric([name, kind], row.get("objects", 0))
                size.add_metric([name, kind], row.get("bytes", 0))
        yield from (runs, failed, last, objects, size)


#: What one client may take of the endpoint: the request line and headers together, the
#: connections served at once (one more is answered 503 and closed), and the time a request
#: may take to arrive and its answer to leave, so that a slow client is cut off rather than
#: holding the endpoint that a liveness probe needs.
MAX_REQUEST_BYTES = 8 * 1024
MAX_CONNECTIONS = 32
REQUEST_TIMEOUT_S = 5.0


class _TooLarge(Exception):
    """The request line and headers outgrow `MAX_REQUEST_BYTES`."""


class MetricsServer:
    """`GET /metrics`, `/healthz` (the process runs), `/readyz` (every stage is running).

    *listen* is `host:port` or `[IPv6 address]:port`. Each client gets `request_timeout_s`
    for its request and the answer, `MAX_REQUEST_BYTES` of request line and headers (431
    beyond), and at most `max_connections` are served at once (503 beyond)."""

    def __init__(self, listen: str, collector: Collector,
                 ready: Callable[[], bool | str] = lambda: True, *,
                 request_timeout_s: float = REQUEST_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.host, self.port = _listen_address(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        # The standard process metrics (memory, CPU, open files), where /proc has them.
        ProcessCollector(registry=self.registry)
        self.ready = ready
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self._active = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                      limit=MAX_REQUEST_BYTES)
        except OSError as exc:
            raise MetricsError(f"metrics.listen {shown}:{self.port}: cannot listen there "
                               f"({exc.strerror}); choose another address or port") from exc
        sockets = self._server.sockets or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", shown, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= self.max_connections:
            _respond(writer, "503 Service Unavailable", b"busy\n")
            writer.close()
            return
        self._active += 1
        try:
            async with asyncio.timeout(self.request_timeout_s):
                try:
                    path = await _read_request(reader)
                except _TooLarge:
                    _respond(writer, "431 Request Header Fields Too Large",
                             b"request too large\n")
                    await writer.drain()
                    writer.write_eof()
                    # Read what the client still sends (within the deadline), so closing
                    # does not reset the connection before it reads the answer.
                    while await reader.read(MAX_REQUEST_BYTES):
                        pass
                    return
                if path is not None:
                    _respond(writer, *self._answer(path))
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._active -= 1
            writer.close()

    def _answer(self, path: str) -> tuple[str, bytes, str]:
        if path == "/metrics":
            return ("200 OK", generate_latest(self.registry),
                    "text/plain; version=0.0.4; charset=utf-8")
        if path == "/healthz":
            return "200 OK", b"ok\n", "text/plain"
        if path == "/readyz":
            ok = self.ready()  # True, or False or the reason why not (one line)
            if ok is True:
                return "200 OK", b"ready\n", "text/plain"
            reason = f": {ok}".splitlines()[0] if isinstance(ok, str) and ok else ""
            return "503 Service Unavailable", f"not ready{reason}\n".encode(), \
                "text/plain; charset=utf-8"
        return "404 Not Found", b"not found\n", "text/plain"


async def _read_request(reader: asyncio.StreamReader) -> str | None:
    """The path of the request once its line and headers are in (nothing in the headers
    matters here); None when the client left before sending a request line."""
    request: bytes | None = None
    size = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # a line longer than the reader's limit
            raise _TooLarge from None
        size += len(line)
        if size > MAX_REQUEST_BYTES:
            raise _TooLarge
        if not line:
            if request is None:
                return None
            break
        if request is None:
            request = line
        elif not line.strip():
            break
    parts = request.decode("latin-1").split()
    return parts[1] if len(parts) > 1 else ""


def _respond(writer: asyncio.StreamWriter, status: str, body: bytes,
             kind: str = "text/plain") -> None:
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: "
                 f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


def _listen_address(listen: str) -> tuple[str, int]:
    """`(host, port)` of `host:port` or `[IPv6 address]:port` (as `config.listen_address`)."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]") and len(host) > 2:
        host = host[1:-1]
    elif ":" in host or not sep or not port.isdigit() or int(port) > 65535:
        raise MetricsError(f"metrics.listen {listen!r} is not host:port (an IPv6 address in "
                           "brackets: '[::1]:9187')")
    return host or "127.0.0.1", int(port)
