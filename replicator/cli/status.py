"""`replicator status`: every stage on one screen, and a monitoring check
(`replicator.ops.status`).

Exit codes (the Nagios/Icinga plugin convention, so the command serves as a check as it
is): 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the configuration cannot be read, or a stage
could not be read at all). The first line is the plugin's status line
(`WEDSYNC WARNING - ...`); then one row per finding, each WARNING or CRITICAL with why and
what to do. `--json` prints one JSON object instead. `--watch` refreshes in place on a
terminal every `--interval` seconds until interrupted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from replicator.config import ConfigError, load_config
from replicator.crypto import Keyring
from replicator.ops.status import Level, Report, gather
from replicator.sink.service import SinkSetupError, load_keyring

_STYLE = {Level.OK: "green", Level.WARNING: "yellow", Level.CRITICAL: "bold red",
          Level.UNKNOWN: "magenta"}


def status_line(report: Report) -> str:
    bad = [c for c in report.checks if c.level in (Level.WARNING, Level.CRITICAL,
                                                   Level.UNKNOWN)]
    bad.sort(key=lambda c: -int(c.level))
    summary = "; ".join(f"{c.stage}: {c.what}" for c in bad[:3]) or "every stage is fine"
    return f"WEDSYNC {report.verdict.name} - {summary}"


def render(report: Report) -> Group:
    table = Table(show_lines=False, expand=False)
    for column in ("stage", "level", "reading", "why / what to do"):
        table.add_column(column, overflow="fold")
    for check in sorted(report.checks, key=lambda c: c.stage):
        advice = " ".join(part for part in (check.why, check.action and f"-> {check.action}")
                          if part)
        table.add_row(Text(check.stage), Text(check.level.name, style=_STYLE[check.level]),
                      Text(check.what), Text(advice))
    return Group(Text(status_line(report), style=_STYLE[report.verdict]), table)


@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="The service's TOML configuration.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.option("--watch", is_flag=True, help="Refresh in place until interrupted.")
@click.option("--interval", type=float, default=5.0, show_default=True,
              help="Seconds between refreshes with --watch.")
def status(config_path: Path, as_json: bool, watch: bool, interval: float) -> None:
    """Every stage at a glance: the slot, Kafka, each destination, the critical weddings;
    exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # its findings are the report's
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"WEDSYNC UNKNOWN - {exc}", err=False)
        sys.exit(int(Level.UNKNOWN))
    environ = dict(os.environ)
    keyring: Keyring | None
    try:
        keyring = load_keyring(config, environ)
    except SinkSetupError:
        keyring = None  # reported as UNKNOWN for the destinations

    async def once() -> Report:
        return await gather(config, keyring, environ)

    if watch:
        console = Console()
        report = asyncio.run(once())
        try:
            with Live(render(report), console=console, auto_refresh=False) as live:
                while True:
                    asyncio.run(asyncio.sleep(interval))
                    report = asyncio.run(once())
                    live.update(render(report), refresh=True)
        except KeyboardInterrupt:
            pass
        sys.exit(int(report.verdict))
    report = asyncio.run(once())
    if as_json:
        click.echo(json.dumps(report.as_json(), sort_keys=True, default=str))
    else:
        Console(width=max(100, Console().width)).print(render(report))
    sys.exit(int(report.verdict))
