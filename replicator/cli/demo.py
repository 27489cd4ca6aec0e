"""`replicator demo`: the main job on embedded defaults, end to end on the local stack.

1. start the local stack (`replicator dev up`);
2. create the sample WedSync database `wedsync` (a few weddings in each tier) if missing;
3. run capture (`examples/local.toml`) while a small live workload writes;
4. print what each stage did.

Safe to run again: the database, slot and topics are reused, the initial snapshot is not
repeated, and capture resumes from the slot's confirmed position.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import click
import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

SAMPLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS weddings (
    id bigint PRIMARY KEY, couple text NOT NULL, wedding_date date NOT NULL, region text);
CREATE TABLE IF NOT EXISTS guests (
    id bigint PRIMARY KEY, wedding_id bigint NOT NULL REFERENCES weddings,
    name text NOT NULL, dietary jsonb, notes text);
CREATE TABLE IF NOT EXISTS bookings (
    id bigint PRIMARY KEY, wedding_id bigint NOT NULL REFERENCES weddings,
    vendor text NOT NULL, role text NOT NULL, price numeric(12,2));
CREATE TABLE IF NOT EXISTS payments (
    id bigint PRIMARY KEY, booking_id bigint NOT NULL REFERENCES bookings,
    amount numeric(12,2) NOT NULL, paid_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE guests REPLICA IDENTITY FULL;
"""

# Days until the wedding: three per tier (critical <= 7, high <= 30, normal <= 90, low).
SAMPLE_DAYS = [0, 3, 6, 10, 21, 30, 45, 60, 88, 120, 200, 365]
ROLES = ["venue", "planner", "photographer", "florist"]


def default_config() -> Path:
    here = Path(__file__).resolve().parents[2] / "examples" / "local.toml"
    return here if here.exists() else Path("examples/local.toml")


async def seed(server_dsn: str, dsn: str) -> bool:
    """Create the sample database if missing; True when it was created now."""
    dbname = str(psycopg.conninfo.conninfo_to_dict(dsn).get("dbname"))
    async with await psycopg.AsyncConnection.connect(server_dsn, autocommit=True) as admin:
        cur = await admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        if await cur.fetchone():
            return False
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    today = date.today()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(SAMPLE_SCHEMA)
        for wid, days in enumerate(SAMPLE_DAYS, start=1):
            await conn.execute("INSERT INTO weddings VALUES (%s, %s, %s, 'uk')",
                               (wid, f"Couple {wid}", today + timedelta(days=days)))
            for g in range(10):
                await conn.execute("INSERT INTO guests VALUES (%s, %s, %s, %s, NULL)",
                                   (wid * 1000 + g, wid, f"Guest {g}", '{"vegan": false}'))
            for b, role in enumerate(ROLES):
                await conn.execute("INSERT INTO bookings VALUES (%s, %s, %s, %s, 1000)",
                                   (wid * 100 + b, wid, f"{role.title()} Ltd", role))
    return True


async def workload(dsn: str, seconds: float) -> int:
    """A small live workload: guests RSVP, payments arrive. Returns commits made."""
    rnd = random.Random()
    commits = 0
    deadline = time.monotonic() + seconds
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            wid = rnd.randint(1, len(SAMPLE_DAYS))
            async with conn.transaction():
                await conn.execute("UPDATE guests SET notes = %s WHERE id = %s",
                                   (f"rsvp {time.time():.0f}", wid * 1000 + rnd.randint(0, 9)))
                await conn.execute(
                    "INSERT INTO payments (id, booking_id, amount) VALUES "
                    "((SELECT coalesce(max(id), 0) + 1 FROM payments), %s, %s)",
                    (wid * 100 + rnd.randint(0, 3), rnd.randint(50, 500)))
            commits += 1
            await asyncio.sleep(0.05)
    return commits


@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Configuration (default: examples/local.toml).")
@click.option("--seconds", default=10.0, show_default=True, help="How long the workload runs.")
def demo(config_path: Path | None, seconds: float) -> None:
    """Run the pipeline on the local stack with a sample wedding database."""
    from replicator.capture import Capture, CaptureFatal
    from replicator.cli.run import EXIT_NEEDS_OPERATOR, setup_logging
    from replicator.config import ConfigError, load_config
    from replicator.devstack.settings import StackSettings
    from replicator.devstack.stack import Stack

    setup_logging("warning")
    console = Console()
    try:
        config = load_config(config_path or default_config())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    stack = Stack(StackSettings.from_env(os.environ))

    async def main() -> dict[str, Any]:
        console.print("[bold]1.[/] starting the local stack")
        await stack.up(["pg15", "kafka"])
        server = stack.services["pg15"].address()
        created = await seed(server, config.source.dsn)
        console.print(f"[bold]2.[/] sample database {'created' if created else 'reused'}")
        capture = Capture(config)
        task = asyncio.create_task(capture.run())
        console.print(f"[bold]3.[/] capture running; live workload for {seconds:.0f}s")
        commits = await workload(config.source.dsn, seconds)
        await asyncio.sleep(2)  # let the last commits be acknowledged and confirmed
        capture.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, config.shutdown_deadline_s + 5)
        return {"commits": commits, "stats": capture.stats}

    try:
        result = asyncio.run(main())
    except CaptureFatal as exc:
        console.print(f"[red]capture stopped:[/] {exc}")
        raise SystemExit(EXIT_NEEDS_OPERATOR) from exc
    stats = result["stats"]
    table = Table("stage", "what happened", title="4. status")
    table.add_row("source", f"{result['commits']} live commits; slot {config.source.slot} "
                            f"confirmed to {stats.confirmed_lsn}")
    table.add_row("snapshot", f"{stats.snapshot_rows} rows (first run only)")
    tiers = ", ".join(f"{t}: {n}" for t, n in sorted(stats.events_by_tier.items())) or "none"
    table.add_row("kafka", f"{stats.transactions} transactions, {stats.events} changes "
                           f"({tiers}) on {config.kafka.topic_prefix}.*")
    rtt = stats.last_heartbeat_rtt_s
    table.add_row("lag", f"heartbeat round trip {rtt:.3f}s" if rtt is not None else "n/a")
    console.print(table)
    console.print("Archive, replay and verify join this demo as they land "
                  "(see README, 'Status').")
