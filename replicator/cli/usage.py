"""`replicator usage`: what a destination's archive holds, its growth per day, and what
retention would free (`replicator.replay.usage`). Exit codes: 0 done; 1 the store failed;
2 a bad option."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from replicator.cli.replay import BadOption, open_archive, run_archive_command
from replicator.cli.run import setup_logging


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


@click.command()
@click.option("--from", "store_url", required=True, metavar="STORE_URL",
              help="The destination's store: s3://, az://, gs://, file:///dir.")
@click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True,
              help="Growth per day over this many days.")
@click.option("--keep", "keep_text", metavar="DURATION",
              help="Also say what retention with this window would free now (35d, 12h).")
@click.option("--destination", metavar="NAME",
              help="Whose checkpoint to trust, when the store holds several.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--keyring", "keyring_file", type=click.Path(path_type=Path),
              help="Key file (name base64 lines); default: REPLICATOR_KEK_* variables.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def usage(store_url: str, days: int, keep_text: str | None, destination: str | None,
          as_json: bool, keyring_file: Path | None, log_level: str) -> None:
    """Objects and bytes per kind and table, growth per day, what retention would free."""
    setup_logging(log_level)
    from replicator.replay.retention import parse_duration
    from replicator.replay.usage import usage as run_usage

    try:
        keep = parse_duration(keep_text) if keep_text else None
    except ValueError as exc:
        raise BadOption(f"--keep: {exc}") from None
    store, keyring = open_archive(store_url, keyring_file, os.environ)

    from connectors.errors import StoreError

    async def main() -> Any:
        async with store:
            return await run_usage(store, keyring, days=days, keep=keep,
                                   destination=destination)

    report = run_archive_command(main(), failed="usage stopped", errors=(StoreError, OSError))
    if as_json:
        click.echo(json.dumps(report.to_json(), sort_keys=True))
        return
    click.echo(f"destination {report.destination}: {report.objects:,} objects, "
               f"{_size(report.bytes)}")
    for title, rows in (("by kind", report.by_kind), ("by table", report.by_table)):
        click.echo(f"{title}:")
        for name, row in sorted(rows.items(), key=lambda kv: -kv[1]["bytes"]):
            click.echo(f"  {name:<40} {row['objects']:>10,} objects {_size(row['bytes']):>12}")
    click.echo(f"growth per day (last {days} days):")
    for day, size in report.by_day.items():
        click.echo(f"  {day:<12} {_size(size):>12}")
    if report.retention is not None:
        freed = report.retention
        click.echo(f"retention with --keep {keep_text} would free {freed['objects']:,} objects, "
                   f"{_size(freed['bytes'])}" + (f" ({freed['note']})" if freed["note"] else ""))
