"""Prometheus metrics, `/healthz` and `/readyz` on one small HTTP endpoint.

Values are read from the stages' stats objects at scrape time (a custom collector), so the
hot loops only bump plain integers. The endpoint listens on localhost unless configured
otherwise (`metrics.listen`), and exposes no configuration and no secrets.

| metric | labels | meaning |
|---|---|---|
| `wedsync_capture_confirmed_lsn` | | slot position confirmed (durable in Kafka) |
| `wedsync_capture_lag_bytes` | | server WAL end minus confirmed position |
| `wedsync_capture_heartbeat_rtt_seconds` | | last heartbeat round trip: source lag in seconds |
| `wedsync_capture_events_total` | tier | changes published |
| `wedsync_capture_transactions_total` | | transactions published |
| `wedsync_capture_reconnects_total` | | stream reconnects |
| `wedsync_capture_unresolved_weddings_total` | | changes whose wedding id did not resolve |
| `wedsync_sink_checkpoint_lsn` | destination, tier | durable position (tier `all`: overall) |
| `wedsync_sink_lag_records` | destination, partition | records not yet read |
| `wedsync_sink_bytes_written_total` | destination | bytes of objects written |
| `wedsync_sink_segments_written_total` | destination | objects written |
| `wedsync_sink_failures_total` | destination | failed flushes |
| `wedsync_sink_breaker_open` | destination | 1 while the destination's breaker is not closed |
| `wedsync_compaction_runs_total` | destination | compaction runs (`replicator compact`) |
| `wedsync_compaction_failures_total` | destination | compaction runs that failed |
| `wedsync_compaction_last_success_timestamp_seconds` | destination | end of the last good run |
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from replicator.errors import OperatorError

log = logging.getLogger(__name__)


class MetricsError(OperatorError):
    """The metrics endpoint cannot listen where it is configured to."""


class PipelineCollector(Collector):
    def __init__(self, capture: Callable[[], Any | None],
                 sinks: Callable[[], Mapping[str, Any]],
                 compaction: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self._capture = capture
        self._sinks = sinks
        self._compaction = compaction or dict

    def collect(self) -> Iterator[Metric]:
        capture = self._capture()
        if capture is not None:
            stats = capture.stats
            yield GaugeMetricFamily("wedsync_capture_confirmed_lsn",
                                    "Slot position confirmed (durable in Kafka)",
                                    value=int(stats.confirmed_lsn))
            yield GaugeMetricFamily("wedsync_capture_lag_bytes",
                                    "Server WAL end minus the confirmed position",
                                    value=max(0, int(stats.server_lsn) - int(stats.confirmed_lsn)))
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
        for name, stats in sorted(sinks.items()):
            checkpoint.add_metric([name, "all"], int(stats.checkpoint))
            for tier, lsn in sorted(stats.tier_checkpoints.items()):
                checkpoint.add_metric([name, tier.value], int(lsn))
            for partition, behind in sorted(stats.lag.items()):
                lag.add_metric([name, partition], behind)
            written.add_metric([name], stats.bytes_written)
            segments.add_metric([name], stats.segments_written)
            failures.add_metric([name], stats.failures)
            breaker.add_metric([name], 0 if stats.breaker == "closed" else 1)
        yield from (checkpoint, lag, written, segments, failures, breaker)
        runs = CounterMetricFamily("wedsync_compaction_runs", "Compaction runs",
                                   labels=["destination"])
        failed = CounterMetricFamily("wedsync_compaction_failures", "Failed compaction runs",
                                     labels=["destination"])
        last = GaugeMetricFamily("wedsync_compaction_last_success_timestamp_seconds",
                                 "End of the last successful compaction run (Unix time)",
                                 labels=["destination"])
        for name, stats in sorted(self._compaction().items()):
            runs.add_metric([name], stats.runs)
            failed.add_metric([name], stats.failures)
            last.add_metric([name], stats.last_success_at)
        yield from (runs, failed, last)


class MetricsServer:
    """`GET /metrics`, `/healthz` (the process runs), `/readyz` (every stage is running)."""

    def __init__(self, listen: str, collector: Collector,
                 ready: Callable[[], bool] = lambda: True) -> None:
        host, _, port = listen.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise MetricsError(f"metrics.listen {self.host}:{self.port}: cannot listen there "
                               f"({exc.strerror}); choose another address or port") from exc
        sockets = self._server.sockets or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)).strip():
                pass  # headers: nothing in them matters here
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else ""
            if path == "/metrics":
                status, body = "200 OK", generate_latest(self.registry)
                kind = "text/plain; version=0.0.4; charset=utf-8"
            elif path == "/healthz":
                status, body, kind = "200 OK", b"ok\n", "text/plain"
            elif path == "/readyz":
                ok = self.ready()
                status = "200 OK" if ok else "503 Service Unavailable"
                body, kind = (b"ready\n" if ok else b"not ready\n"), "text/plain"
            else:
                status, body, kind = "404 Not Found", b"not found\n", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
