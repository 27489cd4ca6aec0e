"""`replicator demo`: the main job on embedded defaults, end to end on the local stack.

1. check that the local stack answers (`replicator dev up` starts it; `make run` does both);
2. create the sample WedSync database `wedsync` (three weddings in each tier) if missing;
3. run capture (`examples/local.toml`) and the sinks (the configuration's destinations, or
   else a local folder `<state dir>/archive`) while a small live workload writes; half-way,
   record the moment and the rows one wedding has then;
4. restore that wedding as of that moment from the archive, into `<database>_restore`, and
   compare it with the rows the source had then;
5. verify the archive against the live database (`replicator verify --against`), while
   capture and sinks still run;
6. stop capture and sinks and print what each stage did, then a short summary. Exit code 1
   when the restore differs or verify fails (2 when capture stops on something only an
   operator can fix).

It runs only on the local stack (`check_local_stack`): it creates tables and writes a
workload into the database it is pointed at, so a source DSN whose host is not a loopback
address, or whose port is not one of the stack's PostgreSQL ports (`REPLICATOR_DEV_PG15_PORT`,
`REPLICATOR_DEV_PG18_PORT`), or Kafka bootstrap servers that are not on a loopback address,
are refused (exit 2) before anything is connected to or written, unless they are the stack's
own external services (`REPLICATOR_DEV_PG15_DSN`, `REPLICATOR_DEV_PG18_DSN`,
`REPLICATOR_DEV_KAFKA`). A Unix socket, a `service=` entry or a host name other than
`localhost` is refused too: where they lead cannot be told from the text.

Safe to run again: the database, slot and topics are reused, the initial snapshot is not
repeated, and capture resumes from the slot's confirmed position. The demo's own archive
folder is tied to the slot that filled it (`<state dir>/archive.source`); when the two no
longer belong together (the slot or the folder was removed, or another database wrote into
the folder), both start over: a new slot with a fresh snapshot, and an empty folder.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import ipaddress
import os
import random
import secrets
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.console import Console
from rich.table import Table

from replicator.config import Config, DestinationConfig, EncryptionConfig, FlushConfig
from replicator.errors import OperatorError
from replicator.position import Lsn

if TYPE_CHECKING:
    from connectors.base import ObjectStore
    from replicator.capture import Capture
    from replicator.crypto import Keyring
    from replicator.devstack.settings import StackSettings
    from replicator.replay.run import ReplaySummary
    from replicator.replay.verify import VerifyReport
    from replicator.sink.service import Sinks

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

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
GUESTS_PER_WEDDING = 10
RESTORE_WEDDING = 2  # three days away: a critical wedding
FIRST_NEW_GUEST = 1_000_000  # guests the workload adds (and may remove again)

# One wedding's rows, table by table, as text (`t::text`: every column, in table order).
WEDDING_ROWS = {
    "public.weddings": "SELECT t::text FROM public.weddings t WHERE id = %(w)s ORDER BY id",
    "public.guests": "SELECT t::text FROM public.guests t WHERE wedding_id = %(w)s ORDER BY id",
    "public.bookings":
        "SELECT t::text FROM public.bookings t WHERE wedding_id = %(w)s ORDER BY id",
    "public.payments": "SELECT t::text FROM public.payments t WHERE booking_id IN "
                       "(SELECT id FROM public.bookings WHERE wedding_id = %(w)s) ORDER BY id",
}

# Short flush intervals and heartbeat, so a demo of a few seconds shows segments, and the
# archive's checkpoint passes a moment (or verify's snapshot) within about two seconds.
DEMO_FLUSH = FlushConfig(critical_s=0.5, high_s=1, normal_s=1.5, low_s=2)
DEMO_HEARTBEAT_S = 0.5


def default_config() -> Path:
    here = Path(__file__).resolve().parents[2] / "examples" / "local.toml"
    return here if here.exists() else Path("examples/local.toml")


# --- 1. the services ---------------------------------------------------------------------------


class DemoRefused(OperatorError):
    """`replicator demo` was pointed at something other than the local stack."""


def check_local_stack(config: Config, settings: StackSettings,
                      environ: Mapping[str, str]) -> None:
    """Refuse (`DemoRefused`) a source or Kafka that is not the local stack's (module
    docstring). Names hosts and ports only: the DSN may hold a password."""
    ports = sorted({settings.ports["pg15"], settings.ports["pg18"]})
    own = {address for name in ("pg15", "pg18") if (dsn := settings.external.get(name))
           for address in _pg_addresses(dsn, {})}
    for host, port in _pg_addresses(config.source.dsn, environ):
        if (host, port) not in own and not (_loopback(host) and port in ports):
            raise DemoRefused(
                f"demo refuses source.dsn (host {host or 'a Unix socket'}, port {port}): it "
                "creates tables and writes into the database it is given, so it runs only on "
                f"the local stack's PostgreSQL (127.0.0.1, port {' or '.join(map(str, ports))})"
                "; use `replicator run` for any other database")
    kafka_own = {s.strip() for s in settings.external.get("kafka", "").split(",") if s.strip()}
    for server in (s.strip() for s in config.kafka.bootstrap_servers.split(",")):
        if server and server not in kafka_own and not _loopback(
                server.rpartition(":")[0].strip("[]")):
            raise DemoRefused(
                f"demo refuses kafka.bootstrap_servers {server}: it creates topics and writes "
                f"into them, so it runs only on the local stack's Kafka (127.0.0.1, port "
                f"{settings.ports['kafka']})")


def _pg_addresses(dsn: str, environ: Mapping[str, str]) -> Iterator[tuple[str, int]]:
    """The (host, port) pairs libpq would connect to for *dsn* (hostaddr over host; the
    PG* variables where the DSN is silent); `DemoRefused` when that cannot be told."""
    params = conninfo_to_dict(dsn)
    if params.get("service") or environ.get("PGSERVICE"):
        raise DemoRefused("demo refuses a source.dsn that names a service (service=, "
                          "PGSERVICE): where it leads cannot be checked; give host and port")
    hosts = str(params.get("hostaddr") or params.get("host") or environ.get("PGHOSTADDR")
                or environ.get("PGHOST") or "").split(",")
    ports = str(params.get("port") or environ.get("PGPORT") or "5432").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    for host, port in zip(hosts, ports, strict=False):
        try:
            number = int(port or "5432")
        except ValueError:
            raise DemoRefused(f"demo refuses source.dsn: port {port!r} is not a number"
                              ) from None
        yield host.strip(), number


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, a Unix socket directory, or nothing
        return False


def _where(dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"


async def check_services(server_dsn: str, bootstrap: str) -> None:
    """Fail with what to do when PostgreSQL or Kafka does not answer."""
    problems = []
    try:
        async with await psycopg.AsyncConnection.connect(server_dsn, connect_timeout=3,
                                                         autocommit=True) as conn:
            await conn.execute("SELECT 1")
    except psycopg.Error as exc:
        text = str(exc).strip()
        problems.append(f"PostgreSQL at {_where(server_dsn)}: "
                        f"{text.splitlines()[0] if text else type(exc).__name__}")
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 3)
        writer.close()
        await writer.wait_closed()
    except (OSError, TimeoutError, ValueError) as exc:
        problems.append(f"Kafka at {bootstrap}: {exc or type(exc).__name__}")
    if problems:
        raise click.ClickException(
            "the local stack is not up (" + "; ".join(problems) + "). Start it with "
            "`replicator dev up` (`make run` starts it, then runs this demo).")


# --- 2. the sample database --------------------------------------------------------------------


async def seed(server_dsn: str, dsn: str) -> bool:
    """Create the sample database if missing; True when it was created now. A database made
    on an earlier day gets its wedding dates moved back to the same distances from today, so
    the weddings stay in their tiers."""
    dbname = str(conninfo_to_dict(dsn).get("dbname"))
    async with await psycopg.AsyncConnection.connect(server_dsn, autocommit=True) as admin:
        cur = await admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        exists = await cur.fetchone() is not None
        if not exists:
            await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    today = date.today()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        if exists:
            for wid, days in enumerate(SAMPLE_DAYS, start=1):
                await conn.execute("UPDATE weddings SET wedding_date = %s WHERE id = %s "
                                   "AND wedding_date <> %s", (today + timedelta(days=days),
                                                              wid, today + timedelta(days=days)))
            return False
        await conn.execute(SAMPLE_SCHEMA)
        async with conn.transaction():
            for wid, days in enumerate(SAMPLE_DAYS, start=1):
                await conn.execute("INSERT INTO weddings VALUES (%s, %s, %s, 'uk')",
                                   (wid, f"Couple {wid}", today + timedelta(days=days)))
                for g in range(GUESTS_PER_WEDDING):
                    await conn.execute("INSERT INTO guests VALUES (%s, %s, %s, %s, NULL)",
                                       (wid * 1000 + g, wid, f"Guest {g}", '{"vegan": false}'))
                for b, role in enumerate(ROLES):
                    await conn.execute("INSERT INTO bookings VALUES (%s, %s, %s, %s, 1000)",
                                       (wid * 100 + b, wid, f"{role.title()} Ltd", role))
                    await conn.execute(  # a deposit per booking
                        "INSERT INTO payments (id, booking_id, amount) VALUES (%s, %s, 100)",
                        (wid * 100 + b, wid * 100 + b))
    return True


# --- the demo's archive folder and its slot ----------------------------------------------------


async def claim_archive(folder: Path, marker: Path, dsn: str, slot: str, prefix: str
                        ) -> tuple[str, str | None]:
    """Tie the demo's archive folder to the slot that fills it. Returns the identity to
    record in *marker* once the archive holds this slot's snapshot, and why the folder and
    slot started over (None when they are resumed, or new)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()), "
            "(SELECT oid::text FROM pg_database WHERE datname = current_database()), "
            "(SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s), "
            "EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)", (slot, slot))
        row = await cur.fetchone()
        assert row is not None
        system, oid, active_pid, has_slot = row
        identity = f"system {system} database {oid} slot {slot} topics {prefix}"
        has_objects, recorded = _folder_state(folder, marker)
        if has_slot and has_objects and recorded == identity:
            return identity, None
        if not has_slot and not has_objects:
            return identity, None
        if not has_slot:
            reason = f"slot {slot} is gone, so the archive cannot be continued"
        elif not has_objects:
            reason = f"the archive folder is empty, but slot {slot} has moved on"
        else:
            reason = "the archive folder was not filled by this database's slot"
        if has_slot:
            if active_pid is not None:
                raise click.ClickException(
                    f"{reason}, and slot {slot} is in use (process {active_pid}): stop that "
                    f"capture first")
            await conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    _empty_folder(folder, marker)
    return identity, reason


def _folder_state(folder: Path, marker: Path) -> tuple[bool, str | None]:
    """Whether the folder holds objects, and the identity its marker records."""
    has_objects = folder.exists() and any(not p.name.startswith(".") for p in folder.iterdir())
    return has_objects, marker.read_text().strip() if marker.exists() else None


def _empty_folder(folder: Path, marker: Path) -> None:
    marker.unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)


# --- 3. the live workload ----------------------------------------------------------------------


@dataclass
class Workload:
    """A small live workload: guests are added and removed and change their answers,
    suppliers change their prices, payments arrive. A third of it goes to `wedding`."""

    conn: Conn
    wedding: int
    rnd: random.Random = field(default_factory=random.Random)
    commits: int = 0
    touched: int = 0  # commits that changed `wedding`
    ops: dict[str, int] = field(default_factory=lambda: {"insert": 0, "update": 0,
                                                         "delete": 0})

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            wid = (self.wedding if self.rnd.random() < 0.33
                   else self.rnd.randint(1, len(SAMPLE_DAYS)))
            async with self.conn.transaction():
                await self._change(wid)
            self.commits += 1
            self.touched += wid == self.wedding
            await asyncio.sleep(0.04)

    async def _change(self, wid: int) -> None:
        conn, rnd, ops = self.conn, self.rnd, self.ops
        action = rnd.random()
        if action < 0.3:
            await conn.execute(
                "INSERT INTO guests (id, wedding_id, name, dietary) "
                "SELECT greatest(max(id), %s) + 1, %s, 'Plus-one', %s::jsonb FROM guests",
                (FIRST_NEW_GUEST - 1, wid, rnd.choice(['{"vegan": true}', '{"halal": true}',
                                                       None])))
            ops["insert"] += 1
            return
        if action < 0.55:  # about as many leave as come, so the weddings stay small
            cur = await conn.execute(
                "DELETE FROM guests WHERE id = (SELECT id FROM guests WHERE wedding_id = %s "
                "AND id >= %s ORDER BY random() LIMIT 1)", (wid, FIRST_NEW_GUEST))
            if cur.rowcount:
                ops["delete"] += 1
                return
        if action < 0.8:
            await conn.execute(
                "UPDATE guests SET notes = %s, dietary = %s::jsonb WHERE id = %s",
                (f"rsvp {rnd.choice(['yes', 'no', 'maybe'])} at {time.strftime('%H:%M:%S')}",
                 rnd.choice(['{"vegan": false}', '{"nuts": "allergic"}']),
                 wid * 1000 + rnd.randrange(GUESTS_PER_WEDDING)))
            ops["update"] += 1
            return
        booking = wid * 100 + rnd.randrange(len(ROLES))
        await conn.execute("UPDATE bookings SET price = price + %s WHERE id = %s",
                           (rnd.randint(-50, 100), booking))
        await conn.execute("INSERT INTO payments (id, booking_id, amount) "
                           "SELECT coalesce(max(id), 0) + 1, %s, %s FROM payments",
                           (booking, rnd.randint(50, 500)))
        ops["update"] += 1
        ops["insert"] += 1


async def wedding_rows(conn: Conn, wedding: int) -> dict[str, list[str]]:
    """The wedding's rows in each sample table that *conn*'s database has."""
    out: dict[str, list[str]] = {}
    for table, query in WEDDING_ROWS.items():
        cur = await conn.execute("SELECT to_regclass(%s)", (table,))
        row = await cur.fetchone()
        if row is None or row[0] is None:
            continue
        cur = await conn.execute(query, {"w": wedding})
        out[table] = [r[0] for r in await cur.fetchall()]
    return out


@dataclass(frozen=True)
class Moment:
    """A moment between two commits of the workload, and the wedding's rows then."""

    at: datetime
    lsn: Lsn  # at or past the end of every commit before `at`
    rows: dict[str, list[str]]


async def record_moment(conn: Conn, wedding: int) -> Moment:
    cur = await conn.execute("SELECT clock_timestamp(), pg_current_wal_lsn()::text")
    row = await cur.fetchone()
    assert row is not None
    return Moment(row[0], Lsn.parse(row[1]), await wedding_rows(conn, wedding))


# --- running the pipeline ----------------------------------------------------------------------


class Pipeline:
    """Capture and sinks as tasks; anything awaited next to them stops if one of them ends."""

    def __init__(self, capture: Capture, sinks: Sinks) -> None:
        self.capture = capture
        self.sinks = sinks
        self.tasks = [asyncio.create_task(capture.run()), asyncio.create_task(sinks.run())]

    async def guard(self, awaitable: Awaitable[T]) -> T:
        job = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({job, *self.tasks}, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            return job.result()
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await job
        for task in self.tasks:
            if task.done() and not task.cancelled():
                task.result()  # its error
        raise click.ClickException("capture or the sinks stopped unexpectedly")

    async def until(self, check: Callable[[], Awaitable[bool] | bool], what: str,
                    within: float = 60.0) -> None:
        async def done() -> bool:
            result = check()
            return await result if inspect.isawaitable(result) else bool(result)

        async def poll() -> None:
            deadline = time.monotonic() + within
            while not await done():
                if time.monotonic() > deadline:
                    raise click.ClickException(f"gave up after {within:.0f} s waiting for {what}")
                await asyncio.sleep(0.2)
        await self.guard(poll())

    async def stop(self, deadline_s: float) -> None:
        self.capture.stop()
        self.sinks.stop()
        errors = []
        for task in self.tasks:
            try:
                await asyncio.wait_for(task, deadline_s)
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the first one is raised below
                errors.append(exc)
        if errors:
            raise errors[0]


@contextlib.asynccontextmanager
async def slow_notice(say: Callable[[str], None], text: str, after_s: float = 10.0
                      ) -> AsyncIterator[None]:
    """Say *text* if the block is still running after *after_s* seconds."""
    async def later() -> None:
        await asyncio.sleep(after_s)
        say(f"   (still waiting: {text})")

    task = asyncio.create_task(later())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- 4. the wedding restore --------------------------------------------------------------------


@dataclass
class Restore:
    database: str
    summary: ReplaySummary | None = None
    restored: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.summary is not None and not self.problems


async def restore_wedding(store: ObjectStore, keyring: Keyring, destination: str,
                          server_dsn: str, database: str, moment: Moment, wedding: int
                          ) -> Restore:
    """Restore *wedding* as of *moment* into *database* (made afresh: into existing tables a
    wedding restore would merge the wedding in), read it back, and compare it with the rows
    the source had at the moment."""
    from replicator.archive.reader import ReplayFailed
    from replicator.replay.plan import ReplayRefused
    from replicator.replay.run import replay
    from replicator.replay.targets import PostgresTarget

    result = Restore(database)
    async with await psycopg.AsyncConnection.connect(server_dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(database)))
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    target_dsn = make_conninfo(server_dsn, dbname=database)
    try:
        result.summary = await replay(store, keyring, PostgresTarget(target_dsn),
                                      at=moment.at, wedding=str(wedding),
                                      destination=destination)
    except (ReplayRefused, ReplayFailed) as exc:
        result.problems.append(f"the restore failed: {exc}")
        return result
    async with await psycopg.AsyncConnection.connect(target_dsn, autocommit=True) as conn:
        result.restored = await wedding_rows(conn, wedding)
        for table in result.restored:  # nothing of another wedding either
            cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(*table.split("."))))
            row = await cur.fetchone()
            if row is not None and row[0] != len(result.restored[table]):
                result.problems.append(f"{table} holds rows of other weddings")
    for table, expected in moment.rows.items():
        got = result.restored.get(table)
        if got is None:
            result.problems.append(f"{table} was not restored")
        elif got != expected:
            missing, extra = len(set(expected) - set(got)), len(set(got) - set(expected))
            result.problems.append(f"{table}: {len(got)} rows restored, {len(expected)} at the "
                                   f"source ({missing} missing or different, {extra} extra)")
    return result


async def archive_size(store: ObjectStore) -> tuple[int, int]:
    objects = size = 0
    async for info in store.list(""):
        objects += 1
        size += info.size
    return objects, size


# --- the command -------------------------------------------------------------------------------


@dataclass
class Outcome:
    database: str
    created: bool
    workload: Workload
    moment: Moment
    restore: Restore
    report: VerifyReport | None
    verify_error: str | None
    archive: tuple[int, int]
    capture: Capture
    sinks: Sinks


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Configuration (default: examples/local.toml).")
@click.option("--seconds", default=6.0, show_default=True,
              help="How long the live workload runs (the restore's moment is half-way).")
def demo(config_path: Path | None, seconds: float) -> None:
    """Run the pipeline on the local stack with a sample wedding database, restore one
    wedding as of a moment in the past, and verify the archive against the database."""
    from connectors.registry import open_store
    from replicator.archive.reader import ReplayFailed, checkpoint
    from replicator.capture import Capture
    from replicator.cli.run import setup_logging
    from replicator.config import load_config
    from replicator.devstack.settings import StackSettings
    from replicator.replay.plan import ReplayRefused
    from replicator.replay.verify import verify
    from replicator.sink.service import Sinks, load_keyring

    setup_logging("warning")
    console = Console(highlight=False)

    def say(text: str) -> None:
        console.print(text, markup=False, soft_wrap=True)

    started = time.monotonic()
    config = load_config(config_path or default_config())
    settings = StackSettings.from_env(os.environ)
    check_local_stack(config, settings, os.environ)
    state_dir = settings.state_dir
    own_folder = not config.destinations
    config, environ = with_demo_archive(config, state_dir, dict(os.environ))
    src = config.source
    config = config.model_copy(update={"source": src.model_copy(update={
        "heartbeat_interval_s": min(src.heartbeat_interval_s, DEMO_HEARTBEAT_S)})})
    password = src.password.get_secret_value() if src.password else None
    source_dsn = make_conninfo(src.dsn, password=password) if password else src.dsn
    server_dsn = make_conninfo(source_dsn, dbname="postgres")
    dbname = str(conninfo_to_dict(src.dsn).get("dbname"))
    destination = config.destinations[0]
    wedding = RESTORE_WEDDING

    async def main() -> Outcome:
        await check_services(server_dsn, config.kafka.bootstrap_servers)
        say(f"1. local stack up: PostgreSQL at {_where(server_dsn)}, Kafka at "
            f"{config.kafka.bootstrap_servers}")
        created = await seed(server_dsn, source_dsn)
        say(f"2. sample database {dbname} {'created' if created else 'reused'}: "
            f"{len(SAMPLE_DAYS)} weddings, 3 per tier\n"
            f"   (critical: <= 7 days away, high: <= 30, normal: <= 90, low: later)")
        identity = reason = None
        folder = state_dir / "archive"
        if own_folder:
            identity, reason = await claim_archive(folder, state_dir / "archive.source",
                                                   source_dsn, src.slot,
                                                   config.kafka.topic_prefix)
            if reason:
                say(f"   the archive folder and the slot start over: {reason}")
        # The demo's own folder and slot were just made to belong together: a slot the
        # capture state remembers but that is gone has nothing left to continue.
        capture = Capture(config, accept_gap=own_folder)
        sinks = Sinks(config, environ)
        await sinks.open()
        keyring = load_keyring(config, environ)
        store = open_store(destination.url, environ)
        pipeline = Pipeline(capture, sinks)
        try:
            async with slow_notice(say, "capture is starting: a new slot waits for the "
                                        "transactions open on the server to finish"):
                await pipeline.until(lambda: capture.stats.last_heartbeat_rtt_s is not None,
                                     "capture to stream (after its snapshot)", 120)
            say(f"3. capture -> Kafka topics {config.kafka.topic_prefix}.* -> sinks -> archive "
                f"{destination.url}\n   running; live workload for {seconds:.0f} s")
            async with await psycopg.AsyncConnection.connect(source_dsn,
                                                             autocommit=True) as conn:
                work = Workload(conn, wedding)
                await pipeline.guard(work.run(seconds / 2))
                moment = await record_moment(conn, wedding)
                before = work.touched
                say(f"   half-way, moment recorded: {_when(moment.at)}, wedding {wedding} "
                    f"has {sum(map(len, moment.rows.values()))} rows")
                await pipeline.guard(work.run(seconds / 2))
                after = work.touched - before
            say(f"   workload done: {work.commits} commits ({work.ops['insert']} inserts, "
                f"{work.ops['update']} updates, {work.ops['delete']} deletes),\n"
                f"   {after} of them changed wedding {wedding} after the moment")

            async def past_moment() -> bool:
                return await checkpoint(store, destination.name,
                                        keyring=keyring) >= moment.lsn
            await pipeline.until(past_moment, "the archive's checkpoint to pass the moment")
            if identity is not None:
                (state_dir / "archive.source").write_text(identity + "\n")
            restore = await pipeline.guard(restore_wedding(
                store, keyring, destination.name, server_dsn, f"{dbname}_restore", moment,
                wedding))
            show_restore(say, restore, moment, config)
            say("5. verify: the whole archive restored as of now, compared with the live database")
            report, verify_error = None, None
            try:
                async with slow_notice(say, "verify's snapshot of the live database waits for "
                                            "the transactions open on the server to finish"):
                    report = await pipeline.guard(verify(
                        store, keyring, destination=destination.name, against_dsn=source_dsn,
                        scratch_dsn=server_dsn, wait_s=60))
            except (ReplayRefused, ReplayFailed) as exc:
                verify_error = str(exc)
            for line in report.lines() if report is not None else [
                    f"verify FAILED: {verify_error}"]:
                say(f"   {line}")
            size = await archive_size(store)
        finally:
            try:
                await pipeline.stop(config.shutdown_deadline_s + 5)
            finally:
                await store.close()
        return Outcome(dbname, created, work, moment, restore, report, verify_error, size, capture,
                       sinks)

    out = asyncio.run(main())  # errors: cli.errors.ReplicatorGroup
    console.print(status_table(out, config))
    show_summary(say, out, time.monotonic() - started)
    if not (out.report is not None and out.report.ok and out.restore.ok):
        raise SystemExit(1)


def show_restore(say: Callable[[str], None], restore: Restore, moment: Moment,
                 config: Config) -> None:
    say(f"4. restore of wedding {RESTORE_WEDDING} as of {_when(moment.at)} into database "
        f"{restore.database}:")
    if restore.summary is not None:
        per_table = ", ".join(f"{t.removeprefix('public.')} {len(rows)}"
                              for t, rows in restore.restored.items())
        say(f"   {restore.summary.rows} rows ({per_table}) from "
            f"{restore.summary.objects_read} archive objects in {restore.summary.seconds:.2f} s")
    say("   " + ("identical to the rows the source had at that moment" if restore.ok
                 else "DIFFERENT from the source: " + "; ".join(restore.problems)))
    keyring = (f" --keyring {shlex.quote(str(config.encryption.keyring_file))}"
               if config.encryption.keyring_file else "")
    target = make_conninfo(config.source.dsn, dbname=restore.database)
    say(f"   by hand: replicator replay --from {config.destinations[0].url}{keyring} \\\n"
        f"              --at {moment.at.astimezone(UTC).isoformat()} "
        f"--wedding {RESTORE_WEDDING} --to {shlex.quote(target)} --replace-existing")


def status_table(out: Outcome, config: Config) -> Table:
    stats = out.capture.stats
    table = Table("stage", "what happened", title="6. status")
    table.add_row("source", f"{out.workload.commits} live commits; slot {config.source.slot} "
                            f"confirmed to {stats.confirmed_lsn}")
    table.add_row("snapshot", f"{stats.snapshot_rows} rows (first run only)")
    tiers = ", ".join(f"{t}: {n}" for t, n in sorted(stats.events_by_tier.items())) or "none"
    table.add_row("kafka", f"{stats.transactions} transactions, {stats.events} changes "
                           f"({tiers}) on {config.kafka.topic_prefix}.*")
    rtt = stats.last_heartbeat_rtt_s
    table.add_row("lag", f"heartbeat round trip {rtt:.3f}s" if rtt is not None else "n/a")
    for name, sink in out.sinks.stats.items():
        table.add_row(f"archive: {name}",
                      f"{sink.segments_written} objects, {sink.bytes_written} bytes (compressed, "
                      f"encrypted); checkpoint {sink.checkpoint}; breaker {sink.breaker}")
    return table


def show_summary(say: Callable[[str], None], out: Outcome, seconds: float) -> None:
    stats, restore, report = out.capture.stats, out.restore, out.report
    objects, size = out.archive
    say("")
    say(f"Summary ({seconds:.0f} s): {out.workload.commits} live commits captured from "
        f"{out.database} into Kafka and archived, encrypted")
    say(f"  captured  {stats.snapshot_rows} snapshot rows + {stats.events} changes; archive "
        f"{size / 1e6:.2f} MB in {objects} objects")
    say(f"  restored  wedding {RESTORE_WEDDING} as of {_when(out.moment.at)}: "
        f"{restore.summary.rows if restore.summary is not None else 0} rows, "
        + ("identical to the source" if restore.ok else "DIFFERENT from the source"))
    say("  verify    " + (f"PASSED: {len(report.tables)} tables equal the live database at "
                          f"LSN {report.target}" if report is not None and report.ok
                          else "FAILED"))


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
