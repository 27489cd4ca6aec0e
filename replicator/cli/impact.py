"""`replicator impact`: which weddings, tables and vendors the changes committed in a time
window touched, from the archive alone (`replicator.replay.impact`).

Exit codes: 0 done (also when the window holds no change); 1 an object or the store failed;
2 a request to change (a bad time, --since after --until, a window entirely after the newest
archived commit, --tables or --wedding matching nothing in the archive, a bad --config).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from replicator.cli.replay import (
    BadOption,
    config_section,
    load_calendar,
    load_conflicts,
    open_archive,
    read_config,
    run_archive_command,
    split_tables,
)
from replicator.cli.run import setup_logging


def parse_time(text: str, option: str) -> datetime:
    """An ISO 8601 time with a zone (`2026-06-13T14:02:00+02:00`, `...Z`)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadOption(f"{option} {text!r} is not an ISO 8601 time like "
                        "2026-06-13T14:02:00+02:00") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise BadOption(f"{option} {text!r} has no time zone: give one (e.g. +00:00 or Z)")
    return moment


def load_vendor_link(path: Path | None) -> Any:
    """`--config`'s `[impact] vendors` link (`config.VendorLink`), None without one. Only
    this section is read (`load_calendar` reads `[priority]`)."""
    if path is None:
        return None
    from replicator.config import ImpactConfig

    return config_section(path, read_config(path), "impact", ImpactConfig).vendors


@click.command()
@click.option("--from", "store_url", required=True, metavar="STORE_URL",
              help="The destination's store: s3://, az://, gs://, file:///dir.")
@click.option("--since", "since_text", required=True, metavar="TIME",
              help="Start of the window (commit time), ISO 8601 with a zone.")
@click.option("--until", "until_text", metavar="TIME",
              help="End of the window, inclusive; default: the newest archived commit.")
@click.option("--tables", metavar="A,B", help="Only changes of these tables.")
@click.option("--wedding", metavar="ID",
              help="Only this wedding (reads only the segments whose header may hold it).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), metavar="FILE",
              help="The service's configuration: [priority] is the wedding calendar (dates, "
                   "tiers), [impact] vendors the vendor link; default: the defaults.")
@click.option("--destination", metavar="NAME",
              help="Whose checkpoint to trust, when the store holds several.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--csv", "as_csv", is_flag=True,
              help="Print CSV: one line per wedding and table.")
@click.option("--keyring", "keyring_file", type=click.Path(path_type=Path),
              help="Key file (name base64 lines); default: REPLICATOR_KEK_* variables.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def impact(store_url: str, since_text: str, until_text: str | None, tables: str | None,
           wedding: str | None, config_file: Path | None, destination: str | None,
           as_json: bool, as_csv: bool, keyring_file: Path | None, log_level: str) -> None:
    """Which weddings the changes committed between --since and --until touched: per
    wedding its tables with inserts, updates and deletes, the first and last change, its
    date and tier, and its vendors; changes of unknown wedding apart.

    Reads only the change segments holding commits of the window (with --wedding, only
    those whose header may hold the wedding) and says how much it read.
    """
    setup_logging(log_level)
    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    since = parse_time(since_text, "--since")
    until = parse_time(until_text, "--until") if until_text is not None else None
    calendar, heartbeat_s = load_calendar(config_file)
    link = load_vendor_link(config_file)
    policies = load_conflicts(config_file)
    store, keyring = open_archive(store_url, keyring_file, os.environ)

    from replicator.replay.impact import impact as run_impact

    async def main() -> Any:
        async with store:
            return await run_impact(store, keyring, since=since, until=until,
                                    tables=split_tables(tables), wedding=wedding,
                                    destination=destination, calendar=calendar,
                                    vendors=link, heartbeat_s=heartbeat_s, policies=policies)

    report = run_archive_command(main(), failed="impact could not run")
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), sort_keys=True))
    elif as_csv:
        click.echo(csv_text(report), nl=False)
    else:
        click.echo(readable(report))


def csv_text(report: Any) -> str:
    from replicator.replay.impact import CSV_HEADER

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(report.csv_rows())
    return out.getvalue()


def readable(report: Any) -> str:
    """The report as tables (rich), then notes and a summary line."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def row(*cells: str) -> list[Text]:
        return [Text(cell) for cell in cells]  # shown as they are, never as markup

    doc = report.to_dict()
    # On a terminal, its width (cells wrap); piped, every cell on one line.
    width = shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else 10_000
    out = io.StringIO()
    console = Console(file=out, width=width, highlight=False, color_system=None,
                      markup=False)
    window = f"{doc['since']} .. {doc['until']}"
    if doc["weddings"]:
        truncates = any("truncates" in c for w in doc["weddings"] for c in w["tables"].values())
        table = Table("wedding", "date", "tier", "table", "inserts", "updates", "deletes",
                      *(["truncates"] if truncates else []), "first change", "last change",
                      "vendors", title=f"weddings touched, {window}")
        for w in doc["weddings"]:
            for n, (name, counts) in enumerate(sorted(w["tables"].items())):
                head = [w["wedding_id"], w["wedding_date"] or "-", w["tier"] or "-"] if n == 0 \
                    else ["", "", ""]
                tail = [w["first_change"], w["last_change"], ", ".join(w["vendors"])] \
                    if n == 0 else ["", "", ""]
                table.add_row(*row(*head, name, str(counts["inserts"]),
                                   str(counts["updates"]), str(counts["deletes"]),
                                   *([str(counts.get("truncates", 0))] if truncates else []),
                                   *tail))
        console.print(table)
    else:
        console.print(f"no wedding was touched by a change committed in {window}"
                      + (f" (wedding {report.wedding})" if report.wedding is not None else ""))
    if doc["unresolved"]:
        table = Table("table", "inserts", "updates", "deletes", "truncates",
                      title="changes of unknown wedding (unresolved)")
        for name, counts in doc["unresolved"].items():
            table.add_row(*row(name, str(counts["inserts"]), str(counts["updates"]),
                               str(counts["deletes"]), str(counts.get("truncates", 0))))
        console.print(table)
    if doc["conflicts"]:
        table = Table("time", "table", "key", "group", "decided by", "winner", "loser",
                      title="conflicts between origins")
        for c in doc["conflicts"]:
            def side(v: dict[str, Any]) -> str:
                return f"{v['origin'] or '(local)'} {v['role'] or '-'} {v['op']}"
            table.add_row(*row(c["at"], c["table"], json.dumps(c["key"]), c["group"] or "row",
                               c["rule"], side(c["winner"]), side(c["loser"])))
        console.print(table)
    if report.wedding is not None:
        console.print("with --wedding, changes of unknown wedding are not counted")
    if report.vendor_link is None:
        console.print("no vendor link is configured: add [impact] vendors = { table = ..., "
                      "column = ..., wedding_column = ... } to --config to list vendors")
    skipped = (f", {report.segments_skipped} of {report.segments} segments skipped by their "
               "header" if report.wedding is not None else "")
    console.print(f"{len(doc['weddings'])} wedding(s); read {doc['objects_read']} objects "
                  f"and {doc['headers_read']} headers, {doc['bytes_read'] / 1e6:,.2f} MB, "
                  f"in {doc['seconds']:.2f} s{skipped}")
    return out.getvalue().rstrip("\n")
