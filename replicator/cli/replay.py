"""`replicator replay` and `replicator verify`: restore the archive as of a point, and prove a
restore is right (docs/ARCHITECTURE.md, "Replay").

Exit codes: 0 done (verify: every table matches); 1 the replay failed on an object or a service
(verify: a table differs); 2 a request only an operator can change (a point past the
checkpoint or before the oldest snapshot, tables that already exist, a bad option).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from replicator.cli.errors import failing_as
from replicator.cli.run import setup_logging
from replicator.errors import EXIT_FAILED, OperatorError

if TYPE_CHECKING:
    from pydantic import BaseModel

T = TypeVar("T")
M = TypeVar("M", bound="BaseModel")


class BadOption(OperatorError):
    """An option's value cannot be used (exit 2)."""


def open_archive(url: str, keyring_file: Path | None, environ: Mapping[str, str]) -> Any:
    """The store of *url*, each request retried on a transient failure (a dropped connection,
    a timeout, a 5xx: up to 6 attempts within 60 s, `connectors.retry`), and the keyring."""
    from connectors.errors import StoreError
    from connectors.registry import open_store
    from connectors.retry import RetryingStore
    from replicator.crypto import CryptoError, Keyring

    try:
        store = RetryingStore(open_store(url, environ))
    except (ValueError, StoreError) as exc:
        raise BadOption(f"--from: {exc}") from exc
    try:
        keyring = (Keyring.from_file(keyring_file) if keyring_file is not None
                   else Keyring.from_env(environ))
    except CryptoError as exc:
        raise BadOption(str(exc)) from exc
    return store, keyring


def read_config(path: Path) -> dict[str, Any]:
    """`--config`'s TOML, read as a plain document (each command validates only the
    sections it uses, so a file with secrets' placeholders or another service's sections is
    fine)."""
    import tomllib

    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BadOption(f"--config {path}: no such file") from None
    except OSError as exc:
        raise BadOption(f"--config {path}: cannot read it ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadOption(f"--config {path}: not valid TOML: {exc}") from None


def config_section(path: Path, raw: Mapping[str, Any], name: str, model: type[M]) -> M:
    """The `[name]` section of *raw* (`read_config`) validated as *model* (its defaults when
    absent); a problem names the file and the key."""
    from pydantic import ValidationError

    try:
        return model.model_validate(raw.get(name, {}))
    except ValidationError as exc:
        problems = "; ".join(f"{name}.{'.'.join(str(p) for p in e['loc'])}: "
                             + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
                             for e in exc.errors())
        raise BadOption(f"--config {path}: {problems}") from None


def load_calendar(path: Path | None) -> tuple[Any, float]:
    """`--config`: its `[priority]` section (the wedding calendar) and the capture's heartbeat
    interval (`[source] heartbeat_interval_s`); the configuration's defaults without it."""
    from replicator.config import PriorityConfig, SourceConfig

    default_heartbeat = float(SourceConfig.model_fields["heartbeat_interval_s"].default)
    if path is None:
        return PriorityConfig(), default_heartbeat
    raw = read_config(path)
    calendar = config_section(path, raw, "priority", PriorityConfig)
    heartbeat = (raw.get("source") or {}).get("heartbeat_interval_s", default_heartbeat)
    if isinstance(heartbeat, bool) or not isinstance(heartbeat, int | float) or heartbeat <= 0:
        raise BadOption(f"--config {path}: source.heartbeat_interval_s must be a number above 0")
    return calendar, float(heartbeat)


def load_conflicts(path: Path | None) -> dict[str, Any]:
    """`--config`'s `[conflicts]`: the conflict rules by table (none without `--config`)."""
    if path is None:
        return {}
    from replicator.config import ConfigError, conflict_policies

    try:
        return conflict_policies(read_config(path).get("conflicts"))
    except ConfigError as exc:
        raise BadOption(f"--config {path}: {exc}") from None


def parse_at_option(text: str) -> Any:
    from replicator.replay.plan import parse_at

    try:
        return parse_at(text)
    except ValueError as exc:
        raise BadOption(str(exc)) from exc


def run_archive_command(main: Coroutine[Any, Any, T], *, failed: str,
                        errors: tuple[type[BaseException], ...] = (OSError,)) -> T:
    """Run *main* on uvloop. A failure (not an operator's error), or one of *errors*, is
    reported as `<failed>: <message>` with exit 1 (`cli.errors`)."""
    import uvloop

    with failing_as(failed, errors):
        result = uvloop.run(main)
    return result


def split_tables(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


@click.command()
@click.option("--from", "store_url", required=True, metavar="STORE_URL",
              help="The destination's store: s3://, az://, gs://, file:///dir.")
@click.option("--at", "at_text", required=True, metavar="TIME|LSN|latest",
              help="ISO 8601 time with a zone, an LSN like 16/B374D848, or 'latest'.")
@click.option("--to", "to", metavar="DSN|DIRECTORY",
              help="A Postgres connection string, or a directory for files.")
@click.option("--tables", metavar="A,B", help="Only these tables (schema.table or table).")
@click.option("--wedding", metavar="ID", help="Only the rows of this wedding, every table.")
@click.option("--format", "format_", type=click.Choice(["jsonl", "csv", "parquet"]),
              default="jsonl", show_default=True, help="File format, when --to is a directory.")
@click.option("--dry-run", is_flag=True, help="Print the plan; read and write no data.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or summary as JSON.")
@click.option("--replace-existing", is_flag=True,
              help="Replace the rows of tables (with --wedding: the wedding's rows) or the "
                   "files that already exist at the target, in one transaction at the end.")
@click.option("--destination", metavar="NAME",
              help="Whose checkpoint to trust, when the store holds several.")
@click.option("--override-reason", metavar="TEXT",
              help="Change existing tables on a wedding day anyway (recorded in the target's "
                   "replicator_audit table and the archive's audit/).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), metavar="FILE",
              help="The service's configuration: its [priority] section is the wedding "
                   "calendar (weddings table, date column, links); default: its defaults.")
@click.option("--allow-stale", is_flag=True,
              help="Restore at a time past the newest archived commit anyway (that commit).")
@click.option("--create-database", is_flag=True,
              help="Create the target database when it does not exist.")
@click.option("--tiered", is_flag=True,
              help="Into an empty Postgres database, nearest weddings first: the rows of "
                   "critical weddings committed first, then high, normal, and last every "
                   "table whole; each step says when it became usable.")
@click.option("--jobs", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Tables restored at once.")
@click.option("--memory-budget", "memory_budget", type=click.FloatRange(min=32), default=2048,
              show_default=True, metavar="MB",
              help="Stop (committing nothing) if the replay's resident memory exceeds this.")
@click.option("--keyring", "keyring_file", type=click.Path(path_type=Path),
              help="Key file (name base64 lines); default: REPLICATOR_KEK_* variables.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def replay(store_url: str, at_text: str, to: str | None, tables: str | None,
           wedding: str | None, format_: str, dry_run: bool, as_json: bool,
           replace_existing: bool, destination: str | None, override_reason: str | None,
           config_file: Path | None, allow_stale: bool, create_database: bool,
           tiered: bool, jobs: int, memory_budget: float,
           keyring_file: Path | None, log_level: str) -> None:
    """Rebuild the database, some tables, or one wedding as of a moment.

    The cut is transaction-consistent: every transaction committed at or before --at, none
    after. A point past the destination's checkpoint, or before its oldest snapshot, or a
    time past the newest archived commit (unless --allow-stale), is refused with the nearest
    restorable point. Into Postgres, tables are loaded with COPY into staging tables, then
    all take effect in one transaction at the end (nothing, if the replay fails).
    """
    setup_logging(log_level)
    if not dry_run and to is None:
        raise click.UsageError("give --to (a Postgres DSN or a directory), or --dry-run")
    at = parse_at_option(at_text)
    calendar, heartbeat_s = load_calendar(config_file)
    policies = load_conflicts(config_file)
    store, keyring = open_archive(store_url, keyring_file, os.environ)
    if tiered:
        _tiered(store, keyring, at, to, calendar, heartbeat_s, policies,
                tables=split_tables(tables),
                wedding=wedding, dry_run=dry_run, replace_existing=replace_existing,
                destination=destination, allow_stale=allow_stale,
                create_database=create_database, jobs=jobs, as_json=as_json)
        return

    from replicator.cli.errors import CommandFailed
    from replicator.replay.run import apply, plan_document, prepare
    from replicator.replay.targets import CommitUnknown, FileTarget, PostgresTarget, is_dsn

    async def main() -> Any:
        async with store:
            prepared = await prepare(store, keyring, at=at, tables=split_tables(tables),
                                     wedding=wedding, destination=destination,
                                     allow_stale=allow_stale, heartbeat_s=heartbeat_s,
                                     policies=policies)
            if dry_run:
                return prepared
            assert to is not None
            target = (PostgresTarget(to, replace_existing=replace_existing,
                                     override_reason=override_reason, calendar=calendar,
                                     create_database=create_database) if is_dsn(to)
                      else FileTarget(to, format_, replace_existing=replace_existing))
            show = None if as_json or not sys.stderr.isatty() else _stderr
            return await apply(prepared, target, jobs=jobs, progress=show,
                               memory_budget_mb=memory_budget)

    try:
        result = run_archive_command(main(), failed="replay stopped, nothing was committed")
    except CommandFailed as exc:
        if isinstance(exc.__cause__, CommitUnknown):  # "nothing was committed" is not known
            raise exc.__cause__ from None
        raise
    if dry_run:
        doc = plan_document(result)
        if as_json:
            click.echo(json.dumps(doc, indent=2, sort_keys=True))
        else:
            click.echo(_plan_text(doc))
        return
    if as_json:
        click.echo(json.dumps(result.to_dict(), sort_keys=True))
    else:
        click.echo(result.line())


def _tiered(store: Any, keyring: Any, at: Any, to: str | None, calendar: Any,
            heartbeat_s: float, policies: dict[str, Any], *, tables: list[str] | None,
            wedding: str | None, dry_run: bool, replace_existing: bool, destination: str | None,
            allow_stale: bool, create_database: bool, jobs: int, as_json: bool) -> None:
    """`replay --tiered` (`replicator.replay.tiered`)."""
    from replicator.replay.targets import is_dsn
    from replicator.replay.tiered import Step, replay_tiered

    if wedding is not None or dry_run or replace_existing:
        raise BadOption("--tiered restores a whole database (or --tables) into an empty one: "
                        "it takes no --wedding, --dry-run or --replace-existing")
    if to is None or not is_dsn(to):
        raise BadOption("--tiered needs --to with a Postgres connection string")

    def told(step: Step) -> None:
        if not as_json:
            what = f"{step.weddings} {step.tier} wedding(s)" if step.tier != "rest" else \
                "every table whole"
            _stderr(f"usable at {step.usable_s:.2f} s: {what} ({step.rows:,} rows)\n")

    async def main() -> Any:
        async with store:
            return await replay_tiered(store, keyring, to, at=at, calendar=calendar,
                                       tables=tables, destination=destination, jobs=jobs,
                                       allow_stale=allow_stale, heartbeat_s=heartbeat_s,
                                       create_database=create_database, on_step=told,
                                       policies=policies)

    summary = run_archive_command(main(), failed="tiered replay stopped; the steps committed "
                                                 "so far stay (each step is a transaction)")
    if as_json:
        click.echo(json.dumps(summary.to_dict(), sort_keys=True))
    else:
        click.echo("\n".join(summary.lines()))


def _stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _plan_text(doc: dict[str, Any]) -> str:
    lines = [f"plan: restore to LSN {doc['target']}"
             + (f" (committed {doc['target_time']})" if doc.get("target_time") else "")
             + f"; latest recoverable {doc['latest']}; destination {doc['destination']}"]
    for table, entry in sorted(doc["tables"].items()):
        lines.append(f"  {table}: base snapshot {entry['base_snapshot']}, "
                     f"{entry['segments']} segment(s), {entry['parts']} snapshot part(s)"
                     + (f", {entry['skipped_for_wedding']} skipped for the wedding"
                        if entry["skipped_for_wedding"] else ""))
    return "\n".join(lines)


@click.command()
@click.option("--from", "store_url", required=True, metavar="STORE_URL",
              help="The destination's store: s3://, az://, gs://, file:///dir.")
@click.option("--at", "at_text", default="latest", show_default=True,
              metavar="TIME|LSN|latest", help="The point to restore and check.")
@click.option("--against", "against", metavar="DSN",
              help="Also compare with this live database, read as of the same LSN.")
@click.option("--scratch", "scratch", metavar="DSN",
              help="Also restore into a new database on this server, and compare it.")
@click.option("--tables", metavar="A,B", help="Only these tables.")
@click.option("--destination", metavar="NAME",
              help="Whose checkpoint to trust, when the store holds several.")
@click.option("--wait", "wait_s", type=float, default=120.0, show_default=True,
              help="With --against: seconds to wait for the archive to reach the live point.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), metavar="FILE",
              help="The service's configuration: its [conflicts] rules decide rows written "
                   "by several origins, as in the service.")
@click.option("--keyring", "keyring_file", type=click.Path(path_type=Path),
              help="Key file (name base64 lines); default: REPLICATOR_KEK_* variables.")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def verify(store_url: str, at_text: str, against: str | None, scratch: str | None,
           tables: str | None, destination: str | None, wait_s: float, as_json: bool,
           config_file: Path | None, keyring_file: Path | None, log_level: str) -> None:
    """Restore to a point and prove it right: every table's changes against the transaction
    records, its rows and content hash; with --scratch, a real restore into a new database;
    with --against, the live database as of the same LSN.

    Exit codes: 0 every table matches; 1 a table differs (the report names it) or a service
    failed; 2 a request that cannot be checked (a point past the checkpoint, a bad option).
    """
    setup_logging(log_level)
    at = parse_at_option(at_text)
    policies = load_conflicts(config_file)
    store, keyring = open_archive(store_url, keyring_file, os.environ)

    import psycopg

    from replicator.replay.verify import verify as run_verify

    async def main() -> Any:
        async with store:
            return await run_verify(store, keyring, at=at, tables=split_tables(tables),
                                    destination=destination, scratch_dsn=scratch,
                                    against_dsn=against, wait_s=wait_s, policies=policies)

    report = run_archive_command(main(), failed="verify could not run",
                                 errors=(OSError, psycopg.Error))
    if as_json:
        click.echo(json.dumps(report.to_dict(), sort_keys=True))
    else:
        click.echo("\n".join(report.lines()))
    if not report.ok:
        sys.exit(EXIT_FAILED)  # the report names what differs
