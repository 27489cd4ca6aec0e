"""`replicator rollback`: put one wedding's rows in the live database back as they were at a
point, in one transaction, with an emergency snapshot and an audit record
(`replicator.replay.rollback`).

Exit codes: 0 done (or the dry run's diff printed); 1 the archive or a service failed; 2 a
request only an operator can change (a point that cannot be restored, the wedding-day guard,
a concurrent write to the wedding: nothing was changed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from replicator.cli.replay import (
    BadOption,
    load_calendar,
    load_conflicts,
    open_archive,
    parse_at_option,
    read_config,
    run_archive_command,
)
from replicator.cli.run import setup_logging


def config_destinations(path: Path | None) -> list[tuple[str, str]]:
    """`--config`'s `[[destinations]]`: (name, url) of each (its other sections are read by
    `load_calendar`; only these keys are read here)."""
    if path is None:
        return []
    found = []
    for n, entry in enumerate(read_config(path).get("destinations") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise BadOption(f"--config {path}: destinations[{n}] has no url")
        found.append((str(entry.get("name") or f"destination{n}"), entry["url"]))
    return found


@click.command()
@click.option("--from", "store_url", required=True, metavar="STORE_URL",
              help="The destination's store to restore from: s3://, az://, gs://, file:///dir.")
@click.option("--wedding", required=True, metavar="ID", help="The wedding to roll back.")
@click.option("--at", "at_text", required=True, metavar="TIME|LSN",
              help="Its rows as of this moment: ISO 8601 time with a zone, or an LSN.")
@click.option("--to", "to", required=True, metavar="LIVE_DSN",
              help="The live database (a Postgres connection string).")
@click.option("--reason", required=True, metavar="TEXT",
              help="Why: recorded in the audit record.")
@click.option("--dry-run", is_flag=True,
              help="Print what would change (counts per table; with --json the keys); "
                   "write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--override-reason", metavar="TEXT",
              help="Roll back a wedding that is today or tomorrow, or on a Saturday, anyway "
                   "(recorded).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), metavar="FILE",
              help="The service's configuration: its [priority] section is the calendar "
                   "(weddings table, links); its destinations also get the snapshot and the "
                   "audit record.")
@click.option("--destination", metavar="NAME",
              help="Whose checkpoint to trust, when the store holds several.")
@click.option("--allow-stale", is_flag=True,
              help="Roll back to a time past the newest archived commit anyway.")
@click.option("--keyring", "keyring_file", type=click.Path(path_type=Path),
              help="Key file (name base64 lines); default: REPLICATOR_KEK_* variables.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def rollback(store_url: str, wedding: str, at_text: str, to: str, reason: str, dry_run: bool,
             as_json: bool, override_reason: str | None, config_file: Path | None,
             destination: str | None, allow_stale: bool, keyring_file: Path | None,
             log_level: str) -> None:
    """Put one wedding's rows in the live database back as they were at --at.

    One transaction: the wedding's rows are locked (a concurrent write to the wedding makes
    it refuse, changing nothing), compared with the archive's, and only what differs is
    applied, in foreign-key order. Before the first change, the wedding's current rows are
    written to every store as an emergency snapshot, and an audit record to the database
    and the stores. Undo: a rollback --at the snapshot position it prints.
    """
    setup_logging(log_level)
    at = parse_at_option(at_text)
    if isinstance(at, str):
        raise BadOption("--at: give the moment to roll back to (a time or an LSN)")
    calendar, heartbeat_s = load_calendar(config_file)
    policies = load_conflicts(config_file)
    store, keyring = open_archive(store_url, keyring_file, os.environ)
    others = [(name, url) for name, url in config_destinations(config_file) if url != store_url]

    from replicator.replay.rollback import Copy
    from replicator.replay.rollback import rollback as run_rollback
    from replicator.replay.targets import is_dsn

    if not is_dsn(to):
        raise BadOption(f"--to: {to!r} is not a Postgres connection string")

    async def main() -> Any:
        opened = [(name, open_archive(url, keyring_file, os.environ)[0])
                  for name, url in others]
        copies = [Copy("from", store, keyring), *(Copy(n, s, keyring) for n, s in opened)]
        try:
            async with store:
                return await run_rollback(
                    store, keyring, to, wedding=wedding, at=at, reason=reason,
                    dry_run=dry_run, copies=copies, override_reason=override_reason,
                    calendar=calendar, destination=destination, allow_stale=allow_stale,
                    heartbeat_s=heartbeat_s, policies=policies)
        finally:
            for _, other in opened:
                await other.close()

    report = run_archive_command(main(), failed="rollback stopped, nothing was changed")
    if as_json:
        click.echo(json.dumps(report.to_dict(with_keys=dry_run), sort_keys=True))
    else:
        click.echo("\n".join(report.lines()))
