"""`replicator demo`: the main job on embedded defaults, end to end on the local stack.

1. start the local stack (`replicator dev up`);
2. create the sample WedSync database `wedsync` (a few weddings in each tier) if missing;
3. run capture (`examples/local.toml`) and the sinks (the configuration's destinations, or
   else a local folder `<state dir>/archive`) while a small live workload writes;
4. print what each stage did.

Safe to run again: the database, slot and topics are reused, the initial snapshot is not
repeated, and capture resumes from the slot's confirmed position.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import secrets
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import click
import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from replicator.config import Config, DestinationConfig, EncryptionConfig, FlushConfig

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
    from replicator.sink.service import Sinks

    setup_logging("warning")
    console = Console()
    try:
        config = load_config(config_path or default_config())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    stack = Stack(StackSettings.from_env(os.environ))

    config, environ = with_demo_archive(config, stack.settings.state_dir, dict(os.environ))

    async def main() -> dict[str, Any]:
        console.print("[bold]1.[/] starting the local stack")
        await stack.up(["pg15", "kafka"])
        server = stack.services["pg15"].address()
        created = await seed(server, config.source.dsn)
        console.print(f"[bold]2.[/] sample database {'created' if created else 'reused'}")
        capture = Capture(config)
        sinks = Sinks(config, environ)
        await sinks.open()
        tasks = [asyncio.create_task(capture.run()), asyncio.create_task(sinks.run())]
        names = ", ".join(f"{d.name} ({d.url})" for d in config.destinations)
        console.print(f"[bold]3.[/] capture and sinks into {names} running; live workload "
                      f"for {seconds:.0f}s")
        commits = await workload(config.source.dsn, seconds)
        await asyncio.sleep(3)  # let the last commits be acknowledged, flushed and confirmed
        capture.stop()
        sinks.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, config.shutdown_deadline_s + 5)
        return {"commits": commits, "stats": capture.stats, "sinks": sinks.stats}

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
    for name, sink in result["sinks"].items():
        table.add_row(f"archive: {name}",
                      f"{sink.segments_written} objects, {sink.bytes_written} bytes (compressed, "
                      f"encrypted); checkpoint {sink.checkpoint}; breaker {sink.breaker}")
    console.print(table)
    console.print("Replay and verify join this demo as they land (see README, 'Status').")


DEMO_FLUSH = FlushConfig(critical_s=1, high_s=2, normal_s=2, low_s=3)


def with_demo_archive(config: Config, state_dir: Path, environ: dict[str, str]
                      ) -> tuple[Config, dict[str, str]]:
    """A configuration without destinations archives into `<state dir>/archive` (short
    flush intervals, so a short demo shows segments); without keys in the environment, a
    development key is made once in the state directory (mode 0600) and used."""
    if not config.destinations:
        folder = state_dir / "archive"
        folder.mkdir(parents=True, exist_ok=True)
        local = DestinationConfig(name="local", url=f"file://{folder}", flush=DEMO_FLUSH)
        config = config.model_copy(update={"destinations": (local,)})
    if config.encryption.keyring_file is None and not any(
            k.startswith("REPLICATOR_KEK_") for k in environ):
        keyfile = state_dir / "demo-keyring"
        if not keyfile.exists():
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(f"demo {base64.b64encode(secrets.token_bytes(32)).decode()}\n")
        config = config.model_copy(update={"encryption": EncryptionConfig(keyring_file=keyfile)})
    return config, environ
