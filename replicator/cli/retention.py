"""`replicator retention`: delete what no restore point inside the kept window needs
(`replicator.replay.retention`; README, "Retention").

Exit codes: 0 done (also when nothing was due, or some objects could not be deleted: they
are listed); 1 the store failed; 2 a request to change (a bad --keep, a wedding day without
--override-reason, a bad --config).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from replicator.cli.replay import (
    BadOption,
    config_section,
    open_archive,
    read_config,
    run_archive_command,
)
from replicator.cli.run import setup_logging


async def wedding_day_finding(config_path: Path | None) -> str | None:
    """The wedding-day guard's finding: from the source database's calendar when --config is
    given, else only whether it is Saturday (UTC)."""
    if config_path is None:
        if datetime.now(UTC).isoweekday() == 6:
            return "it is Saturday (give --config for the wedding calendar)"
        return None
    import psycopg
    from psycopg.conninfo import make_conninfo

    from replicator.config import PriorityConfig, SourceConfig
    from replicator.priority import wedding_day

    raw = read_config(config_path)
    calendar = config_section(config_path, raw, "priority", PriorityConfig)
    source = config_section(config_path, raw, "source", SourceConfig)
    password = os.environ.get("REPLICATOR_SOURCE_PASSWORD")
    dsn = make_conninfo(source.dsn, password=password) if password else source.dsn
    try:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=10) as conn:
            return await wedding_day(conn, calendar)
    except psycopg.OperationalError as exc:
        raise BadOption(f"--config {config_path}: the source database (for the wedding "
                        f"calendar) does not answer: {type(exc).__name__}") from None


@click.command()
@click.option("--from", "store_url", required=True, metavar="STORE_URL",
              help="The destination's store: s3://, az://, gs://, file:///dir.")
@click.option("--keep", "keep_text", required=True, metavar="DURATION",
              help="The window every point of which stays restorable: 35d, 12h, 2w.")
@click.option("--grace", "grace_text", default="1h", show_default=True, metavar="DURATION",
              help="How long an object must have been unneeded before it is deleted.")
@click.option("--dry-run", is_flag=True, help="Say what would go; delete and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--destination", metavar="NAME",
              help="Whose checkpoint to trust, when the store holds several.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="The service's configuration: its [source] and [priority] give the "
                   "wedding calendar for the wedding-day guard.")
@click.option("--override-reason", metavar="TEXT",
              help="Delete even on a wedding day; recorded in the audit record.")
@click.option("--keyring", "keyring_file", type=click.Path(path_type=Path),
              help="Key file (name base64 lines); default: REPLICATOR_KEK_* variables.")
@click.option("--nice", type=click.IntRange(0, 19), default=0, show_default=True,
              help="Lower this process's CPU priority by this much (the service uses 10).")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def retention(store_url: str, keep_text: str, grace_text: str, dry_run: bool, as_json: bool,
              destination: str | None, config_path: Path | None,
              override_reason: str | None, keyring_file: Path | None, nice: int,
              log_level: str) -> None:
    """Delete the changes and snapshots no point inside the last --keep needs.

    Only what has been unneeded for --grace goes (a restore reading it is not broken); the
    newest complete snapshot before the window, gaps, dead letters and audit records stay.
    """
    setup_logging(log_level)
    if nice:
        os.nice(nice)
    from replicator.replay.retention import describe, parse_duration
    from replicator.replay.retention import retention as run_retention

    try:
        keep, grace = parse_duration(keep_text), parse_duration(grace_text)
    except ValueError as exc:
        raise BadOption(f"--keep/--grace: {exc}") from None
    store, keyring = open_archive(store_url, keyring_file, os.environ)

    from connectors.errors import StoreError

    async def main() -> Any:
        async with store:
            finding = None if dry_run else await wedding_day_finding(config_path)
            return await run_retention(store, keyring, keep=keep, grace=grace,
                                       destination=destination, dry_run=dry_run,
                                       guard_finding=finding, reason=override_reason,
                                       keep_text=keep_text)

    report = run_archive_command(main(), failed="retention stopped",
                                 errors=(StoreError, OSError))
    if as_json:
        click.echo(json.dumps(report.to_json(), sort_keys=True))
    else:
        for key, why in sorted(report.undeletable.items()):
            click.echo(f"not deleted: {key}: {why}")
        click.echo(describe(report))
