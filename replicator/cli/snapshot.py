"""`replicator snapshot --config FILE (--table T | --wedding ID) [--json]`: an on-demand
snapshot of one table or one wedding, taken next to the running service.

It runs as its own process beside `replicator run`, which keeps streaming: a temporary slot's
exported snapshot gives a fresh consistent point; the rows are read with COPY, classified by
wedding tier, and published as op `r` events to the tier topics; the command returns once Kafka
has acknowledged every one, and prints one summary line (or one JSON object with `--json`).
The capture slot and the initial snapshot's records are left alone.

Exit codes: 0 done; 1 a wedding that matched no row (nothing published), or a service that
could not be reached; 2 a request or configuration only an operator can fix (a table that is
not captured, a wedding id the id column cannot hold, a bad configuration file).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from replicator.cli.errors import failing_as
from replicator.cli.run import setup_logging
from replicator.config import load_config
from replicator.errors import EXIT_FAILED

log = logging.getLogger("replicator")



@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="TOML configuration file (the one `replicator run` uses).")
@click.option("--table", metavar="SCHEMA.TABLE", help="Snapshot this captured table.")
@click.option("--wedding", metavar="ID",
              help="Snapshot every row of this wedding (the tables linked to a wedding).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def snapshot(config_path: Path, table: str | None, wedding: str | None, as_json: bool,
             log_level: str) -> None:
    """Snapshot one table or one wedding now, while capture goes on streaming.

    The rows go to the tier topics as op `r` events at the snapshot's LSN, exactly as the
    initial snapshot's do. Exit codes: 0 done; 1 the wedding matched no row (nothing was
    published) or a service failed; 2 a table that is not captured, a wedding id that does
    not fit, or a bad configuration.
    """
    if (table is None) == (wedding is None):
        raise click.UsageError("give exactly one of --table and --wedding")
    setup_logging(log_level)
    config = load_config(config_path)

    import psycopg
    from aiokafka.errors import KafkaError

    from replicator.capture import Capture

    capture = Capture(config)
    import uvloop

    with failing_as("snapshot failed, nothing is recorded as done",
                    (psycopg.OperationalError, KafkaError, OSError)):
        result = uvloop.run(capture.snapshot_on_demand(table=table, wedding=wedding))

    from replicator.events import TIER_ORDER
    from replicator.transport.kafka import topic_names

    topics = topic_names(config.kafka.topic_prefix)
    summary: dict[str, Any] = {
        "table": result.table,
        "wedding": result.wedding,
        "lsn": str(result.lsn),
        "rows": result.total,
        "tables": dict(result.rows),
        "topics": {topics[tier]: result.tiers[tier] for tier in TIER_ORDER
                   if result.tiers[tier]},
        "skipped": list(result.skipped),
    }
    empty = result.wedding is not None and result.total == 0
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(_line(summary))
    if empty:
        click.echo(f"error: wedding {result.wedding} matched no row in "
                   f"{', '.join(result.rows) or 'any captured table'} at {result.lsn}; "
                   f"nothing was published", err=True)
        sys.exit(EXIT_FAILED)


def _line(summary: dict[str, Any]) -> str:
    what = (f"wedding {summary['wedding']}" if summary["wedding"] is not None
            else summary["table"])
    tables = ", ".join(f"{t} {n}" for t, n in summary["tables"].items()) or "no tables"
    topics = ", ".join(f"{t} {n}" for t, n in summary["topics"].items()) or "none"
    return (f"snapshot of {what} at {summary['lsn']}: {tables} ({summary['rows']} rows; "
            f"topics: {topics})")
