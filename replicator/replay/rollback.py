"""A rollback: one wedding's rows in the live database put back as they were at a point.

`replicator rollback` restores the wedding as of the point from the archive into staging
tables (the wedding restore of `run`, `targets.PostgresTarget`), then, in one transaction of
the live database (`RollbackTarget.commit`):

1. **Locks the wedding.** The transaction is REPEATABLE READ. It takes the wedding's row of
   the calendar table, and the wedding's rows in every table the restore changes (found
   through the calendar's links, `[priority.tables]`), `FOR UPDATE NOWAIT`. A transaction
   writing one of them now, or one that committed a change to them since the rollback's
   snapshot, makes the rollback refuse (`RollbackRefused`, exit 2) and change nothing: run it
   again. Rows of other weddings are not locked. A new row of the wedding in a table whose
   foreign key points at the locked calendar row waits for the rollback's commit (its key
   lock conflicts with the row lock), and lands after it.
2. **Compares** the live rows of the wedding with the restored ones, table by table, by key:
   deletes (live rows the point did not hold), updates (rows whose columns differ, compared
   as text) and inserts (rows of the point that are gone).
3. **Writes an emergency snapshot** before the first change: the wedding's live rows, every
   table, as JSON, encrypted, to `rollbacks/<time>-<id>.json` of every store given (the
   archive read, and each destination of `--config`), with the live database's WAL position
   at the snapshot (`snapshot_position`). Rolling the rollback back is a rollback `--at` that
   position: the changes before it are the wedding as the rollback found it (the rollback's
   own writes are ordinary changes, which capture archives like any other).
4. **Records an audit record**: a row of `public.replicator_audit` in the same transaction
   (action `rollback`, the OS user, `--reason`, the time, the point, the row counts, the
   snapshot's position and objects in `details`), and the same document as `audit/` objects
   of every store, written before the commit.
5. **Applies only what differs**, in foreign-key order (`swap.Swap`): deletes children
   first, then updates and inserts parents first; a row already equal is left alone.

Rules: the wedding-day guard of a rollback looks at the wedding itself: a wedding today or
tomorrow (the calendar's time zone), or any rollback on a Saturday, needs
`--override-reason`. A dry run compares (step 2) and rolls back: nothing is written, and the
guard's finding is reported instead of enforced. The live database must have the archived
columns of each table (a column dropped since the point is refused: a rollback never changes
a table's definition), and tables the archive has but the live database lacks are left
alone (refused if the wedding had rows in them). A foreign key with ON DELETE CASCADE among
the wedding's tables deletes only rows the rollback deletes anyway (children of a row that
did not exist at the point did not exist either); one from a table outside them is refused
(`swap.fk_order`).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from connectors.base import ObjectStore
from replicator.archive.layout import audit_key, rollback_key
from replicator.archive.merge import ConflictPolicy
from replicator.archive.render import utc_text
from replicator.config import PriorityConfig
from replicator.crypto import Keyring, encrypt
from replicator.events import split_qualified
from replicator.replay.plan import At, ReplayRefused
from replicator.replay.swap import AUDIT_TABLE, Swap, create_audit_table, first_line, quoted
from replicator.replay.table import TableSchema
from replicator.replay.targets import PostgresTarget

__all__ = ["Copy", "RollbackRefused", "RollbackReport", "RollbackTarget", "rollback"]

# The audit table's columns a rollback's row needs beyond an override's (`_audit_table`).
_AUDIT_COLUMNS = ("action", "details")

log = logging.getLogger("replicator.replay")

class RollbackRefused(ReplayRefused):
    """The rollback cannot go ahead now; nothing was changed."""


@dataclass(frozen=True, slots=True)
class Copy:
    """A store the rollback's snapshot and audit record go to."""

    name: str
    store: ObjectStore
    keyring: Keyring


@dataclass(slots=True)
class RollbackReport:
    wedding: str
    point: str
    database: str
    dry_run: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    user: str = field(default_factory=getpass.getuser)
    reason: str = ""
    guard: str | None = None  # the wedding-day guard's finding (overridden, or a dry run)
    override_reason: str | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    keys: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    snapshot_position: str | None = None
    snapshot_objects: list[str] = field(default_factory=list)
    audit_objects: list[str] = field(default_factory=list)
    seconds: float = 0.0
    committed: bool = False
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds it took

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time step *name* into `steps` (summed when it repeats)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - started

    @property
    def changed(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def audit(self) -> dict[str, Any]:
        return {"id": self.id, "action": "rollback", "at": self.at.isoformat(),
                "user": self.user, "reason": self.reason, "database": self.database,
                "wedding": self.wedding, "restore_point": self.point, "guard": self.guard,
                "override_reason": self.override_reason,
                "rows": self.counts, "snapshot_position": self.snapshot_position,
                "snapshot_objects": self.snapshot_objects}

    def to_dict(self, with_keys: bool) -> dict[str, Any]:
        doc = {**self.audit(), "dry_run": self.dry_run, "committed": self.committed,
               "audit_objects": self.audit_objects, "seconds": round(self.seconds, 3),
               "steps_s": {k: round(v, 3) for k, v in self.steps.items()}}
        if with_keys:
            doc["keys"] = self.keys
        return doc

    def lines(self) -> list[str]:
        verb = "would change" if self.dry_run else "changed"
        out = [f"{t}: {c['deletes']} delete(s), {c['updates']} update(s), "
               f"{c['inserts']} insert(s)" for t, c in sorted(self.counts.items())]
        head = (f"rollback of wedding {self.wedding} to {self.point} in {self.database}: "
                f"{verb} {self.changed} row(s) in {self.seconds:.2f} s")
        if self.dry_run:
            head += " (dry run: nothing written)"
        else:
            head += (f"; audit {self.id}; the wedding before it is at "
                     f"{self.snapshot_position} (undo: --at {self.snapshot_position})")
        if self.guard:
            head += f"; wedding-day guard: {self.guard}"
        return [head, *out]


class RollbackTarget(PostgresTarget):
    """The wedding restore into the live database as a rollback (module docstring)."""

    def __init__(self, dsn: str, report: RollbackReport, *, copies: Sequence[Copy] = (),
                 override_reason: str | None = None, **options: Any) -> None:
        super().__init__(dsn, replace_existing=True, override_reason=override_reason,
                         **options)
        self.report = report
        self.copies = list(copies)

    async def prepare(self, schemas: Sequence[TableSchema], *, wedding: str | None = None,
                      point: str | None = None) -> None:
        with self.report.step("check_target"):
            await super().prepare(schemas, wedding=wedding, point=point)

    async def _checked(self, conn: Any, swap: Swap) -> None:
        """The audit table created, or given the rollback's columns, when it lacks them
        (step `audit_table`, part of `check_target`; not in a dry run)."""
        if self.report.dry_run:
            return
        cur = await conn.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attname = ANY(%s) AND NOT attisdropped",
            (quoted(".".join(AUDIT_TABLE)), list(_AUDIT_COLUMNS)))
        if (await cur.fetchone())[0] != len(_AUDIT_COLUMNS):
            with self.report.step("audit_table"):
                await self._audit_table(conn)

    async def _guard(self, conn: Any, swap: Swap) -> str | None:
        """A wedding today or tomorrow, or any rollback on a Saturday, needs the override."""
        from psycopg import sql

        c = self.calendar
        found = []
        cur = await conn.execute("SELECT extract(isodow FROM (now() AT TIME ZONE %s)::date) = 6",
                                 (c.timezone,))
        if (await cur.fetchone())[0]:
            found.append("it is Saturday")
        exists = await (await conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                           (quoted(c.weddings_table),))).fetchone()
        if c.calendar and exists[0]:
            cur = await conn.execute(sql.SQL(
                "SELECT t.{day}::date - (now() AT TIME ZONE %s)::date FROM {table} t "
                "WHERE t.{id}::text = %s").format(
                    day=sql.Identifier(c.wedding_date_column),
                    table=sql.Identifier(*split_qualified(c.weddings_table)),
                    id=sql.Identifier(c.wedding_id_column)), (c.timezone, swap.wedding))
            row = await cur.fetchone()
            if row is not None and row[0] in (0, 1):
                found.append(f"wedding {swap.wedding} is {('today', 'tomorrow')[row[0]]}")
        if not found:
            return None
        why = " and ".join(found)
        self.report.guard = why
        if self.report.dry_run:
            return None  # reported, not enforced: a dry run changes nothing
        if not self.override_reason:
            raise RollbackRefused(
                f"rolling back wedding {swap.wedding} is refused: {why}. Give "
                "--override-reason '<why>' (it is recorded with the rollback's audit record)")
        log.warning("wedding-day protection overridden (%s): rolling back wedding %s; reason: "
                    "%s", why, swap.wedding, self.override_reason)
        self.report.override_reason = self.override_reason
        return None  # recorded in the rollback's own audit record, before the first change

    async def commit(self) -> None:
        assert self._plan is not None, "prepare() first"
        with self.report.step("final_transaction"):
            await self._final(self._roll_back)
        self.report.committed = not self.report.dry_run

    async def _roll_back(self, conn: Any) -> None:
        """Steps 1 to 5 of the module docstring, in the final transaction (`_final`)."""
        import psycopg

        assert self._plan is not None
        swap = self._plan
        try:
            step = self.report.step
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            with step("lock"):
                await self._lock(conn, swap)
            await self._leave_out_absent(conn, swap)
            if any(swap.missing.values()):
                lacking = "; ".join(f"{t}: {', '.join(c.name for c in cols)}"
                                    for t, cols in sorted(swap.missing.items()) if cols)
                raise RollbackRefused(
                    f"the live database lacks archived columns ({lacking}): a rollback "
                    "does not change table definitions; restore into another database")
            for table in swap.changed:
                with step("compare"):
                    self.report.keys[table] = await self._diff(conn, swap, table)
                self.report.counts[table] = {k: len(v)
                                             for k, v in self.report.keys[table].items()}
            if self.report.dry_run:
                await conn.rollback()  # the staging schemas go in a transaction of their own
                return
            with step("emergency_snapshot"):
                await self._snapshot(conn, swap)
            with step("audit_record"):
                await self._audit_row(conn, swap)
                await self._write_everywhere(audit_key(self._at_us(), self.report.id),
                                             json.dumps(self.report.audit()).encode(),
                                             self.report.audit_objects)
            with step("apply"):
                await swap.run(conn, staged=self._staged)
        except (psycopg.errors.LockNotAvailable, psycopg.errors.SerializationFailure) as exc:
            raise RollbackRefused(
                f"wedding {swap.wedding} is being written to right now "
                f"({first_line(exc)}): nothing was changed; run the rollback again") from None
        except psycopg.Error as exc:
            raise ReplayRefused(f"the rollback failed, nothing was changed: "
                                f"{first_line(exc)}") from None

    def _at_us(self) -> int:
        return int(self.report.at.timestamp() * 1_000_000)

    async def _lock(self, conn: Any, swap: Swap) -> None:
        """The wedding's calendar row, then its rows in every changed table, FOR UPDATE
        NOWAIT (module docstring, step 1)."""
        from psycopg import sql

        c = self.calendar
        if c.calendar and c.weddings_table in swap.existing:
            await conn.execute(sql.SQL("SELECT FROM {} t WHERE t.{}::text = %s "
                                       "FOR UPDATE NOWAIT").format(
                sql.Identifier(*split_qualified(c.weddings_table)),
                sql.Identifier(c.wedding_id_column)), (swap.wedding,))
        for table in swap.changed:
            await conn.execute(sql.SQL("SELECT FROM {} t WHERE {} FOR UPDATE OF t NOWAIT"
                                       ).format(_identifier(table), swap.filters[table]),
                               (swap.wedding,))

    async def _leave_out_absent(self, conn: Any, swap: Swap) -> None:
        """Tables the live database lacks are not created by a rollback: refused if the
        wedding had rows in them, else left out."""
        from psycopg import sql

        for table in [t for t in swap.schemas if t not in swap.existing]:
            cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                self._staged(table)))
            rows = (await cur.fetchone())[0]
            if rows:
                raise RollbackRefused(
                    f"wedding {swap.wedding} had {rows} row(s) in {table} at the point, and "
                    "the live database has no such table: a rollback does not create tables")
            del swap.schemas[table]

    async def _diff(self, conn: Any, swap: Swap, table: str) -> dict[str, list[Any]]:
        """The keys of the live rows to delete, update and insert (module docstring, 2)."""
        from psycopg import sql

        schema = swap.schemas[table]
        live, staged, where = _identifier(table), self._staged(table), swap.filters[table]
        params: tuple[str | None, ...] = (swap.wedding,)
        if not schema.primary_key:
            cur = await conn.execute(sql.SQL("SELECT to_jsonb(t)::text FROM {} t WHERE {}"
                                             ).format(live, where), params)
            gone = [json.loads(r[0]) for r in await cur.fetchall()]
            cur = await conn.execute(sql.SQL("SELECT to_jsonb(s)::text FROM {} s").format(
                staged))
            return {"deletes": gone, "updates": [],
                    "inserts": [json.loads(r[0]) for r in await cur.fetchall()]}

        def key(alias: str) -> Any:
            return sql.SQL("jsonb_build_object({})::text").format(sql.SQL(", ").join(
                sql.SQL("{}, {}.{}").format(sql.Literal(c), sql.Identifier(alias),
                                            sql.Identifier(c)) for c in schema.primary_key))

        match = sql.SQL(" AND ").join(sql.SQL("s.{0} = t.{0}").format(sql.Identifier(c))
                                      for c in schema.primary_key)
        others = [c for c in schema.names if c not in schema.primary_key]
        # One statement, one round trip: the three kinds, each tagged, keys in order.
        parts = [
            sql.SQL("SELECT 'deletes', {} FROM {} t WHERE ({}) AND NOT EXISTS "
                    "(SELECT FROM {} s WHERE {})").format(key("t"), live, where, staged, match),
            sql.SQL("SELECT 'inserts', {} FROM {} s WHERE NOT EXISTS "
                    "(SELECT FROM {} t WHERE {})").format(key("s"), staged, live, match),
        ]
        if others:
            differ = sql.SQL(" OR ").join(
                sql.SQL("t.{0}::text IS DISTINCT FROM s.{0}::text").format(sql.Identifier(c))
                for c in others)
            # Only the wedding's live rows (its index, not the whole table): a restored key
            # another wedding holds now is refused by the apply (`Swap._upsert`).
            parts.append(sql.SQL("SELECT 'updates', {} FROM {} s JOIN {} t ON {} "
                                 "WHERE ({}) AND ({})").format(key("s"), staged, live, match,
                                                               where, differ))
            params += (swap.wedding,)
        cur = await conn.execute(sql.SQL("{} ORDER BY 1, 2").format(
            sql.SQL(" UNION ALL ").join(parts)), params)
        out: dict[str, list[Any]] = {"deletes": [], "updates": [], "inserts": []}
        for what, found in await cur.fetchall():
            out[what].append(json.loads(found))
        return out

    async def _snapshot(self, conn: Any, swap: Swap) -> None:
        """The wedding's live rows, every changed table, to every store (module docstring,
        step 3)."""
        from psycopg import sql

        cur = await conn.execute("SELECT pg_current_wal_lsn()::text")
        self.report.snapshot_position = (await cur.fetchone())[0]
        # Every table's rows in one statement: a JSON array per table (NULL when none).
        cur = await conn.execute(sql.SQL("SELECT {}").format(sql.SQL(", ").join(
            sql.SQL("(SELECT jsonb_agg(t)::text FROM {} t WHERE {})").format(
                _identifier(table), swap.filters[table]) for table in swap.changed)),
            (swap.wedding,) * len(swap.changed))
        found = await cur.fetchone() if swap.changed else ()
        tables = {table: json.loads(rows) if rows is not None else []
                  for table, rows in zip(swap.changed, found, strict=True)}
        document = {"id": self.report.id, "wedding": swap.wedding,
                    "database": self.report.database, "taken_at": self.report.at.isoformat(),
                    "position": self.report.snapshot_position, "tables": tables}
        await self._write_everywhere(rollback_key(self._at_us(), self.report.id),
                                     json.dumps(document).encode(),
                                     self.report.snapshot_objects)

    async def _write_everywhere(self, key: str, data: bytes, written: list[str]) -> None:
        for copy in self.copies:
            await copy.store.put(key, encrypt(data, key, copy.keyring))
            written.append(f"{copy.name}:{key}")

    async def _audit_table(self, conn: Any) -> None:
        """`public.replicator_audit`, created or given the rollback's columns, committed
        before the final transaction (*conn* is prepare's, in autocommit)."""
        from psycopg import sql

        await create_audit_table(conn)
        await conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS action text, "
                                   "ADD COLUMN IF NOT EXISTS details jsonb").format(
            sql.Identifier(*AUDIT_TABLE)))

    async def _audit_row(self, conn: Any, swap: Swap) -> None:
        from psycopg import sql

        r = self.report
        await conn.execute(sql.SQL(
            "INSERT INTO {} (id, at, by_user, reason, guard, tables, wedding, restore_point, "
            "action, details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'rollback', %s::jsonb)"
        ).format(sql.Identifier(*AUDIT_TABLE)),
            (r.id, r.at, r.user, r.reason, r.guard or "", list(swap.changed), r.wedding,
             r.point, json.dumps(r.audit())))


def _identifier(table: str) -> Any:
    from psycopg import sql

    return sql.Identifier(*split_qualified(table))


async def rollback(store: ObjectStore, keyring: Keyring, dsn: str, *, wedding: str, at: At,
                   reason: str, dry_run: bool = False, copies: Sequence[Copy] = (),
                   override_reason: str | None = None, calendar: PriorityConfig | None = None,
                   destination: str | None = None, allow_stale: bool = False,
                   heartbeat_s: float = 10.0,
                   policies: Mapping[str, ConflictPolicy] | None = None) -> RollbackReport:
    """Put *wedding*'s rows in the live database *dsn* back as they were at *at* (module
    docstring), the conflict rules *policies* deciding rows of several origins. *copies*:
    the stores the snapshot and audit record go to (the archive read is not added by
    itself)."""
    from replicator.replay.run import apply, prepare

    if not reason.strip():
        raise ReplayRefused("--reason must say why the wedding is rolled back (it is recorded)")
    started = time.perf_counter()
    prepared = await prepare(store, keyring, at=at, wedding=wedding, destination=destination,
                             allow_stale=allow_stale, heartbeat_s=heartbeat_s,
                             policies=policies)
    planned = time.perf_counter() - started
    point = str(prepared.plan.target)
    ts = prepared.archive.timeline.times.get(int(prepared.plan.target))
    if ts is not None:
        point += f" ({utc_text(ts)})"
    target = RollbackTarget(dsn, RollbackReport(wedding, point, "", dry_run, reason=reason),
                            copies=copies, override_reason=override_reason, calendar=calendar)
    target.report.database = target.database
    await apply(prepared, target)
    target.report.seconds = time.perf_counter() - started
    steps = target.report.steps
    steps["plan"] = planned
    steps["restore"] = target.report.seconds - planned - sum(
        steps.get(k, 0.0) for k in ("check_target", "final_transaction"))
    return target.report
