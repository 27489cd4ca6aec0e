"""`replicator compact`: fold each table's changes up to a point into a new snapshot, so that
restores from then on read the snapshot and only the changes after it
(`replicator.replay.compact`; docs/ARCHITECTURE.md, "Compaction").

Run it on a schedule (cron, a systemd timer), as pgBackRest users take full backups; it reads
and writes only the store. Exit codes: 0 done; 1 the archive holds an object it could not use
(nothing of the table it was compacting counts: without its manifest a snapshot is never
read); 2 a request only an operator can change (a point past the checkpoint, a bad option).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from replicator.cli.replay import (
    BadOption,
    load_conflicts,
    open_archive,
    parse_at_option,
    run_archive_command,
    split_tables,
)
from replicator.cli.run import setup_logging


@click.command()
@click.option("--from", "store_url", required=True, metavar="STORE_URL",
              help="The destination's store: s3://, az://, gs://, file:///dir.")
@click.option("--at", "at_text", default="latest", show_default=True,
              metavar="TIME|LSN|latest", help="The point the snapshot holds.")
@click.option("--tables", metavar="A,B", help="Only these tables (schema.table or table).")
@click.option("--min-changes", type=click.IntRange(0), default=0, show_default=True,
              help="Pass over a table with fewer changes since its last snapshot.")
@click.option("--min-changes-ratio", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Pass over a table with fewer changes since its last snapshot than this "
                   "fraction of its rows then.")
@click.option("--destination", metavar="NAME",
              help="Whose checkpoint to trust, when the store holds several.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--nice", type=click.IntRange(0, 19), default=0, show_default=True,
              help="Lower this process's CPU priority by this much (the service uses 10).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), metavar="FILE",
              help="The service's configuration: its [conflicts] rules decide rows written "
                   "by several origins, as in every restore.")
@click.option("--conflicts", "conflicts_json", metavar="JSON",
              help="The [conflicts] rules as one JSON object (how the service passes them).")
@click.option("--keyring", "keyring_file", type=click.Path(path_type=Path),
              help="Key file (name base64 lines); default: REPLICATOR_KEK_* variables.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def compact(store_url: str, at_text: str, tables: str | None, min_changes: int,
            min_changes_ratio: float, destination: str | None, as_json: bool, nice: int,
            config_file: Path | None, conflicts_json: str | None, keyring_file: Path | None,
            log_level: str) -> None:
    """Write a compaction snapshot of every table (or --tables) at a point.

    A restore at or after that point then reads the snapshot and the changes after it only.
    The snapshot counts once its manifest is written, last; nothing older is deleted.
    """
    setup_logging(log_level)
    if nice:
        os.nice(nice)
    at = parse_at_option(at_text)
    policies = _conflicts(config_file, conflicts_json)
    store, keyring = open_archive(store_url, keyring_file, os.environ)

    from connectors.errors import StoreError
    from replicator.replay.compact import compact as run_compaction

    async def main() -> Any:
        async with store:
            return await run_compaction(store, keyring, at=at, tables=split_tables(tables),
                                        destination=destination, min_changes=min_changes,
                                        min_changes_ratio=min_changes_ratio,
                                        policies=policies)

    summary = run_archive_command(main(), failed="compaction stopped",
                                  errors=(StoreError, OSError))
    if as_json:
        click.echo(json.dumps(summary.to_dict(), sort_keys=True))
    else:
        for table in summary.tables:
            if not table.done:
                click.echo(f"{table.table}: passed over: {table.reason}")
        click.echo(summary.line())


def _conflicts(config_file: Path | None, conflicts_json: str | None) -> dict[str, Any]:
    if config_file is not None and conflicts_json is not None:
        raise BadOption("give --config or --conflicts, not both")
    if conflicts_json is None:
        return load_conflicts(config_file)
    from replicator.config import ConfigError, conflict_policies

    try:
        return conflict_policies(json.loads(conflicts_json))
    except json.JSONDecodeError as exc:
        raise BadOption(f"--conflicts: not valid JSON: {exc}") from None
    except ConfigError as exc:
        raise BadOption(f"--conflicts: {exc}") from None
