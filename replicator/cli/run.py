"""`replicator run --config FILE`: the always-on service (capture; the sinks join later)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import click

from replicator.config import ConfigError, load_config

log = logging.getLogger("replicator")

#: Exit code for problems only an operator can fix (bad config, bad input, lost slot): a
#: supervisor should not restart on it (systemd: RestartPreventExitStatus=2).
EXIT_NEEDS_OPERATOR = 2


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # "Topic ... not found in cluster metadata" at ERROR while a just-created topic's metadata
    # propagates; real failures surface as exceptions on the calls that need the topic.
    logging.getLogger("aiokafka.cluster").setLevel(logging.CRITICAL)


@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="TOML configuration file (see examples/local.toml).")
@click.option("--accept-gap", is_flag=True,
              help="The slot was lost: create a new one, snapshot again, and record the gap.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: Path, accept_gap: bool, log_level: str) -> None:
    """Capture every committed change into Kafka, by wedding tier.

    The first SIGTERM (or Ctrl-C) stops intake, waits for Kafka to acknowledge what is in
    flight (within shutdown_deadline_s) and confirms it to the slot; a second one exits at once.
    Nothing is lost either way: unconfirmed changes are sent again on the next start.
    """
    setup_logging(log_level)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_NEEDS_OPERATOR)
    from replicator.capture import Capture, CaptureFatal

    capture = Capture(config, accept_gap=accept_gap)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info("stopping: draining in-flight changes (signal again to exit at once)")
                capture.stop()
            else:
                log.warning("second signal: exiting at once; unconfirmed changes will be "
                            "sent again on restart")
                os._exit(130)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await capture.run()

    try:
        import uvloop

        uvloop.run(main())
    except CaptureFatal as exc:
        log.error("capture stopped: %s", exc)
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_NEEDS_OPERATOR)
