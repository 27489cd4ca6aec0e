"""`replicator dev`: the local stack of real services, natively, without Docker."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from replicator.devstack.settings import StackSettings
from replicator.devstack.stack import SERVICE_NAMES, Stack


def _stack(ctx: click.Context) -> Stack:
    stack = ctx.obj
    assert isinstance(stack, Stack)
    return stack


def _names(only: str | None) -> list[str] | None:
    return [n.strip() for n in only.split(",") if n.strip()] if only else None


ONLY = click.option("--only", metavar="NAMES",
                    help=f"Comma-separated subset of: {', '.join(SERVICE_NAMES)}.")


@click.group()
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where data, logs and PID files live [env REPLICATOR_DEV_DIR; "
                   "default .replicator-dev].")
@click.pass_context
def dev(ctx: click.Context, state_dir: Path | None) -> None:
    """Run the local stack: PostgreSQL 15 and 18, Kafka, S3, Azure Blob and GCS emulators,
    and Toxiproxy (the fault injector of the fault tests)."""
    ctx.obj = Stack(StackSettings.from_env(os.environ, state_dir))


@dev.command()
@ONLY
@click.pass_context
def install(ctx: click.Context, only: str | None) -> None:
    """Fetch what the services need (apt, Maven, npm, go) without starting them."""
    _stack(ctx).install(_names(only))
    click.echo("installed")


@dev.command()
@ONLY
@click.pass_context
def up(ctx: click.Context, only: str | None) -> None:
    """Start the services (idempotent) and wait until each answers."""
    started = time.monotonic()
    results = asyncio.run(_stack(ctx).up(_names(only)))
    for name, what in results.items():
        click.echo(f"{name:9} {what}")
    click.echo(f"stack ready in {time.monotonic() - started:.1f}s")


@dev.command()
@ONLY
@click.pass_context
def down(ctx: click.Context, only: str | None) -> None:
    """Stop the services this stack started."""
    stopped = _stack(ctx).down(_names(only))
    for name, was_running in stopped.items():
        click.echo(f"{name:9} {'stopped' if was_running else 'was not running'}")


@dev.command()
@ONLY
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def status(ctx: click.Context, only: str | None, as_json: bool) -> None:
    """Connect to each service; exit 0 only if every one is healthy."""
    health = asyncio.run(_stack(ctx).status(_names(only)))
    if as_json:
        click.echo(json.dumps({"services": [h.as_dict() for h in health]}, indent=2))
    else:
        table = Table("service", "address", "state", "mode", "pid", "detail")
        colour = {"healthy": "green", "unhealthy": "red", "stopped": "yellow"}
        for h in health:
            table.add_row(h.name, h.address, f"[{colour[h.state]}]{h.state}[/]", h.mode,
                          str(h.pid or ""), h.detail)
        console = Console()
        console.width = max(console.width, 130)
        console.print(table)
    if any(h.state != "healthy" for h in health):
        ctx.exit(1)


@dev.command()
@click.pass_context
def env(ctx: click.Context) -> None:
    """Print the connection settings as shell exports (eval "$(replicator dev env)")."""
    for key, value in _stack(ctx).exports().items():
        click.echo(f"export {key}={shlex.quote(value)}")
