"""`replicator run --config FILE`: the always-on service (capture; the sinks join later)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from replicator.config import load_config
from replicator.errors import EXIT_OPERATOR

log = logging.getLogger("replicator")

#: Exit code for problems only an operator can fix (bad config, bad input, lost slot): a
#: supervisor should not restart on it (systemd: RestartPreventExitStatus=2).
EXIT_NEEDS_OPERATOR = EXIT_OPERATOR


def tune_gc() -> None:
    """The service holds many small objects in flight (decoded rows buffered by the sinks,
    events awaiting Kafka's acknowledgement); with the default thresholds the collector
    walks them all again and again (measured: a third of the CPU, pauses of 0.4 s under
    2,000 commits/s). Collect young objects less often; the memory cost is small."""
    gc.set_threshold(50_000, 20, 50)


#: aiokafka's ERROR lines for broker states that pass on their own (a broker warming up, a
#: leader or coordinator moving); it retries them itself.
_TRANSIENT_BROKER = re.compile(
    r"GroupCoordinatorNotAvailable|NotCoordinatorForGroup|CoordinatorLoadInProgress|"
    r"NotLeaderForPartition|LeaderNotAvailable|UnknownTopicOrPartition|"
    r"RequestTimedOut|KafkaConnectionError|Unable connect|Unable to update metadata")
#: How long such a state may last before it is logged (once per spell).
TRANSIENT_GRACE_S = 60.0


class QuietTransientBroker(logging.Filter):
    """Drops aiokafka's ERROR lines about transient broker states while they are brief; one
    that persists past `TRANSIENT_GRACE_S` passes once, as a warning, per spell."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self._since: float | None = None  # start of the current spell
        self._last = 0.0
        self._told = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka") or record.levelno < logging.ERROR:
            return True
        if _TRANSIENT_BROKER.search(record.getMessage()) is None:
            return True
        now = self.clock()
        if self._since is None or now - self._last > TRANSIENT_GRACE_S:
            self._since, self._told = now, False  # a new spell
        self._last = now
        if self._told or now - self._since < TRANSIENT_GRACE_S:
            return False
        self._told = True
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = f"Kafka has been in a transient state for {now - self._since:.0f}s: " \
                     f"{record.getMessage()}"
        record.args = ()
        return True


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet = QuietTransientBroker()
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # "Topic ... not found in cluster metadata" at ERROR while a just-created topic's metadata
    # propagates; real failures surface as exceptions on the calls that need the topic.
    logging.getLogger("aiokafka.cluster").setLevel(logging.CRITICAL)
    # The Azure SDK logs every HTTP request and response at INFO (about 30 lines a second
    # from one busy destination); the store's failures reach our own log as they matter.
    for noisy in ("azure", "botocore", "aiobotocore", "urllib3", "google"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _keyring_or_none(config: Any) -> Any:
    """The archive's keys, for the incident watcher's impact reports; None without them."""
    from replicator.sink.service import SinkSetupError, load_keyring

    try:
        return load_keyring(config, os.environ)
    except SinkSetupError:
        return None


@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="TOML configuration file (see examples/local.toml).")
@click.option("--only", type=click.Choice(["capture", "sinks"]), default=None,
              help="Run one side only (to scale them out separately); default both.")
@click.option("--accept-gap", is_flag=True,
              help="The slot was lost: create a new one, snapshot again, and record the gap.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: Path, only: str | None, accept_gap: bool, log_level: str) -> None:
    """Capture every committed change into Kafka by wedding tier, and archive it into every
    configured destination.

    The first SIGTERM (or Ctrl-C) stops intake, waits for Kafka to acknowledge what is in
    flight (within shutdown_deadline_s), confirms it to the slot, and lets each sink flush and
    commit; a second one exits at once. Nothing is lost either way: what was not confirmed or
    committed is read again on the next start.
    """
    # A stop asked for while the service is still starting (loading its configuration and
    # modules) is kept, and carried out as soon as the event loop handles signals: the
    # default action would kill the process without a clean stop.
    from replicator.entry import EARLY as early  # recorded since the process began

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    setup_logging(log_level)
    tune_gc()
    config = load_config(config_path)
    from replicator.capture import Capture
    from replicator.ops.metrics import MetricsServer, PipelineCollector
    from replicator.sink.service import Sinks

    capture = Capture(config, accept_gap=accept_gap) if only != "sinks" else None
    sinks = Sinks(config) if only != "capture" and config.destinations else None
    from replicator.eve import EveSnapshots

    eve = (EveSnapshots(config, capture.dsn) if capture is not None and config.eve.enabled
           and config.priority.weddings_table else None)
    from replicator.ops.incidents import IncidentWatcher

    watcher = (IncidentWatcher(config, capture.dsn, _keyring_or_none(config), dict(os.environ))
               if capture is not None and config.incidents.enabled
               and config.priority.weddings_table else None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("stopping: draining in-flight changes (signal again to exit at once)")
                if capture is not None:
                    capture.stop()
                if eve is not None:
                    eve.stop()
                if watcher is not None:
                    watcher.stop()
                if sinks is not None:
                    sinks.stop()
            else:
                log.warning("second signal: exiting at once; what was not confirmed is read "
                            "again on restart")
                os._exit(130)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        if early:
            on_signal()
        tasks: list[asyncio.Task[None]] = []

        def readiness() -> bool | str:
            """True, or why not: a stage that stopped, the capture's reason (waiting for
            PostgreSQL or Kafka, reconnecting), or a sink's (waiting for Kafka)."""
            if not tasks:
                return "starting"
            stopped = [t.get_name() for t in tasks if t.done()]
            if stopped:
                return f"{', '.join(stopped)} stopped"
            if capture is not None and capture.not_ready:
                return capture.not_ready
            waiting = [f"sink {name}: {stats.waiting}"
                       for name, stats in (sinks.stats if sinks else {}).items() if stats.waiting]
            return "; ".join(waiting) or True

        metrics = MetricsServer(
            config.metrics.listen,
            PipelineCollector(lambda: capture, lambda: sinks.stats if sinks else {},
                              lambda: sinks.compaction_stats if sinks else {},
                              lambda: watcher.total if watcher else None),
            ready=readiness)
        await metrics.start()  # first: if its port is taken, nothing else was opened
        try:
            if sinks is not None:
                await sinks.open()
            async with asyncio.TaskGroup() as group:
                if capture is not None:
                    tasks.append(group.create_task(capture.run(), name="capture"))
                if sinks is not None:
                    tasks.append(group.create_task(sinks.run(), name="sinks"))
                if eve is not None:
                    tasks.append(group.create_task(eve.run(), name="eve snapshots"))
                if watcher is not None:
                    tasks.append(group.create_task(watcher.run(), name="incident watcher"))
        finally:
            await metrics.stop()

    import uvloop

    uvloop.run(main())  # errors: cli.errors.ReplicatorGroup
