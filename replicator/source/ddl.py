"""DDL in the stream: every table's schema archived as of the exact position of each change.

pgoutput announces a table's columns (a Relation message: names, type OIDs, type modifiers,
key flags) only with the next change after a DDL, and says nothing of NOT NULL, defaults,
the values existing rows take for an added column (`attmissingval`), renames, drops, or
rewrites (a table rewrite is not decoded at all). So the capture installs, in the source
database, three event triggers that describe each DDL inside its own transaction and put the
description in the WAL with `pg_logical_emit_message(true, 'wedsync.ddl', <json>)`:

- `ddl_command_end`: for each table a command created or altered, the table as the catalog
  shows it at that moment, inside the DDL's transaction: columns in order (name, type as
  `format_type`, type OID and modifier, NOT NULL, default expression, missing value,
  generated), primary key, OID, schema and name, and the command tag;
- `sql_drop`: the tables dropped (OID, schema, name);
- `table_rewrite`: the OID of a table being rewritten (`ALTER COLUMN TYPE`, a volatile
  default, `SET LOGGED`...), whose new contents are not in the WAL's decoded changes.

The messages are transactional, so they arrive at the DDL transaction's commit, in commit
order with every change: the capture archives the table's schema at that commit LSN, and a
restore on either side of the DDL has the shape the table had there. What each DDL means:

- column added, dropped, renamed, default or NOT NULL changed: a schema document at the
  commit LSN, from the description (no catalog read afterwards). An added column's
  `missing` value is what every row written before it reads as; replay fills it in;
- table rewritten, renamed, or created by `CREATE TABLE AS` / `SELECT INTO` (whose rows are
  not decoded), or created in a `FOR ALL TABLES` publication: the document carries
  `resnapshot: true`, and the capture re-snapshots the table at a fresh consistent point (a
  temporary slot, like a table added at start-up); replay refuses points between the DDL and
  that snapshot for the table, and is exact again from it;
- table dropped (or renamed away): a document with `dropped: true` (and `renamed_to`).

Without the triggers (the capture's role may not create event triggers, which needs a
superuser), the capture says so once and falls back to the Relation messages: names, types
and keys exactly as of each change, NOT NULL and defaults from the catalog as it is when the
change is captured (by OID, so a table renamed or dropped since does not stop the capture),
and no missing values or rewrites. `docs/ARCHITECTURE.md` has the SQL to install them by hand.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from replicator.events import join_qualified
from replicator.position import Lsn
from replicator.source import pgoutput as pg

log = logging.getLogger(__name__)

#: The logical message prefix of DDL descriptions.
DDL_PREFIX = "wedsync.ddl"
#: The schema the trigger functions live in.
FUNCTION_SCHEMA = "wedsync_replicator"
#: Commands whose table's rows are not (all) in the decoded stream afterwards.
_RESNAPSHOT_COMMANDS = frozenset({"CREATE TABLE AS", "SELECT INTO"})

# One table as the catalog shows it now (in the caller's snapshot): the trigger's description
# and the capture's reads of a table by OID share this text.
_DESCRIBE = """
SELECT jsonb_build_object(
  'oid', c.oid::bigint, 'schema', n.nspname, 'name', c.relname, 'relkind', c.relkind::text,
  'columns', COALESCE((
    SELECT jsonb_agg(jsonb_build_object(
      'name', a.attname, 'attnum', a.attnum,
      'type', pg_catalog.format_type(a.atttypid, a.atttypmod),
      'type_oid', a.atttypid::bigint, 'type_modifier', a.atttypmod,
      'not_null', a.attnotnull, 'default', pg_catalog.pg_get_expr(d.adbin, d.adrelid),
      'missing', CASE WHEN a.atthasmissing
                 THEN (a.attmissingval::text::text[])[1] END,
      'generated', a.attgenerated <> '') ORDER BY a.attnum)
    FROM pg_catalog.pg_attribute a
    LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]'::jsonb),
  'primary_key', COALESCE((
    SELECT jsonb_agg(a.attname ORDER BY k.ord)
    FROM pg_catalog.pg_index i
    JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
    JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = c.oid AND i.indisprimary), '[]'::jsonb))
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = {oid} AND c.relkind IN ('r', 'p')
"""

INSTALL_SQL = f"""
CREATE SCHEMA IF NOT EXISTS {FUNCTION_SCHEMA};

CREATE OR REPLACE FUNCTION {FUNCTION_SCHEMA}.describe(rel oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog AS $body$
{_DESCRIBE.format(oid="rel")}
$body$;

CREATE OR REPLACE FUNCTION {FUNCTION_SCHEMA}.on_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $body$
DECLARE
  r record;
  described jsonb;
  tables jsonb := '[]'::jsonb;
BEGIN
  IF current_setting('wal_level') <> 'logical' THEN
    RETURN;
  END IF;
  FOR r IN SELECT objid, min(command_tag) AS command_tag
           FROM pg_event_trigger_ddl_commands()
           WHERE classid = 'pg_catalog.pg_class'::regclass
           GROUP BY objid LOOP
    described := {FUNCTION_SCHEMA}.describe(r.objid);
    IF described IS NOT NULL THEN
      tables := tables || jsonb_build_array(
        described || jsonb_build_object('command', r.command_tag));
    END IF;
  END LOOP;
  IF jsonb_array_length(tables) > 0 THEN
    PERFORM pg_logical_emit_message(true, '{DDL_PREFIX}',
      jsonb_build_object('event', 'ddl', 'tables', tables)::text);
  END IF;
END
$body$;

CREATE OR REPLACE FUNCTION {FUNCTION_SCHEMA}.on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $body$
DECLARE
  dropped jsonb;
BEGIN
  IF current_setting('wal_level') <> 'logical' THEN
    RETURN;
  END IF;
  SELECT jsonb_agg(jsonb_build_object('oid', objid::bigint, 'schema', schema_name,
                                      'name', object_name))
    INTO dropped
    FROM pg_event_trigger_dropped_objects() WHERE object_type = 'table';
  IF dropped IS NOT NULL THEN
    PERFORM pg_logical_emit_message(true, '{DDL_PREFIX}',
      jsonb_build_object('event', 'drop', 'tables', dropped, 'command', tg_tag)::text);
  END IF;
END
$body$;

CREATE OR REPLACE FUNCTION {FUNCTION_SCHEMA}.on_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $body$
BEGIN
  IF current_setting('wal_level') <> 'logical' THEN
    RETURN;
  END IF;
  PERFORM pg_logical_emit_message(true, '{DDL_PREFIX}', jsonb_build_object(
    'event', 'rewrite', 'oid', pg_event_trigger_table_rewrite_oid()::bigint,
    'reason', pg_event_trigger_table_rewrite_reason(), 'command', tg_tag)::text);
END
$body$;

DO $body$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'wedsync_replicator_ddl') THEN
    CREATE EVENT TRIGGER wedsync_replicator_ddl ON ddl_command_end
      EXECUTE FUNCTION {FUNCTION_SCHEMA}.on_ddl();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'wedsync_replicator_drop') THEN
    CREATE EVENT TRIGGER wedsync_replicator_drop ON sql_drop
      EXECUTE FUNCTION {FUNCTION_SCHEMA}.on_drop();
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_event_trigger
                 WHERE evtname = 'wedsync_replicator_rewrite') THEN
    CREATE EVENT TRIGGER wedsync_replicator_rewrite ON table_rewrite
      EXECUTE FUNCTION {FUNCTION_SCHEMA}.on_rewrite();
  END IF;
END
$body$;
"""


async def install(dsn: str) -> bool:
    """Install (or update) the DDL event triggers in the source database; False, with one
    warning, when the role may not (event triggers need a superuser)."""
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn, \
                conn.transaction():
            await conn.execute(INSTALL_SQL)
    except psycopg.errors.InsufficientPrivilege as exc:
        log.warning("DDL capture is off: the capture's role cannot create event triggers "
                    "(%s). Schemas follow the Relation messages; a column added with a "
                    "default restores as NULL for older rows and table rewrites are not "
                    "re-snapshotted. A superuser can install them: see docs/ARCHITECTURE.md, "
                    "'DDL in the stream'.", str(exc).splitlines()[0])
        return False
    return True


async def describe(conn: psycopg.AsyncConnection[Any], oid: int) -> dict[str, Any] | None:
    """The table *oid* as *conn*'s snapshot shows it, in the triggers' form; None if gone."""
    cur = await conn.execute(_DESCRIBE.format(oid="%s::oid"), (oid,))
    row = await cur.fetchone()
    return None if row is None else dict(row[0])


def with_previous_names(desc: Mapping[str, Any],
                        before: Mapping[str, Any] | None) -> dict[str, Any]:
    """*desc* with each column's `previous_names` (oldest first): the names it had in
    *before*, the same table's previous description (a column keeps its attnum through a
    rename). Rows archived before a rename carry the old name; replay reads them by it."""
    old = {int(c["attnum"]): c for c in (before or {}).get("columns", ()) if "attnum" in c}
    columns = []
    for c in desc["columns"]:
        prior = old.get(int(c.get("attnum", -1)))
        names = list(prior.get("previous_names") or ()) if prior else []
        if prior is not None and prior["name"] != c["name"]:
            names = [n for n in names if n != prior["name"]] + [prior["name"]]
        columns.append({**c, "previous_names": names} if names else dict(c))
    return {**desc, "columns": columns}


def document(desc: Mapping[str, Any], lsn: Lsn, source: str, **flags: Any) -> dict[str, Any]:
    """The archived schema document of a table description (`schemas/<table>/<lsn>.json`)."""
    columns = [{"name": c["name"], "type": c["type"], "type_oid": int(c["type_oid"]),
                "type_modifier": int(c.get("type_modifier", -1)),
                "not_null": bool(c.get("not_null")), "default": c.get("default"),
                **({"missing": c["missing"]} if c.get("missing") is not None else {}),
                **({"previous_names": c["previous_names"]} if c.get("previous_names") else {})}
               for c in desc["columns"] if not c.get("generated")]
    doc = {"table": join_qualified(desc["schema"], desc["name"]), "lsn": int(lsn),
           "columns": columns, "primary_key": list(desc.get("primary_key") or ()),
           "source": source}
    doc.update({k: v for k, v in flags.items() if v})
    return doc


def signature(desc: Mapping[str, Any]) -> tuple[tuple[str, int, int], ...]:
    """What a Relation message would say of a described table (to tell whether it changed)."""
    return tuple((c["name"], int(c["type_oid"]), int(c.get("type_modifier", -1)))
                 for c in desc["columns"] if not c.get("generated"))


def relation_signature(rel: pg.Relation) -> tuple[tuple[str, int, int], ...]:
    return tuple((c.name, c.type_oid, c.type_modifier) for c in rel.columns)


@dataclass
class DdlOutcome:
    """What one committed transaction's DDL means for the archive."""

    documents: list[dict[str, Any]] = field(default_factory=list)  # in order, to publish
    resnapshot: list[str] = field(default_factory=list)  # tables to snapshot again
    dropped: list[str] = field(default_factory=list)


@dataclass
class SchemaHistory:
    """The capture's view of each table's schema, by OID and by name, as of the stream's
    position: what was last archived, so a Relation message that changes nothing is not
    archived again, and a DDL is told apart as a rename, a drop or a change."""

    dsn: str
    captured: Any  # (qualified name) -> bool: is this table captured?
    names: dict[int, str] = field(default_factory=dict)  # OID -> qualified name
    described: dict[int, dict[str, Any]] = field(default_factory=dict)  # OID -> description
    signatures: dict[str, tuple[tuple[str, int, int], ...]] = field(default_factory=dict)
    triggers: bool = False  # the event triggers are installed

    def recorded(self, desc: Mapping[str, Any], *, streamed: bool = True) -> None:
        """A description archived at the stream's position (a DDL's), or (not *streamed*)
        at a snapshot's, which may be ahead of the stream: its name is not taken as the
        table's name at the stream's position (a rename the stream has yet to reach would
        read backwards)."""
        qualified = join_qualified(desc["schema"], desc["name"])
        if streamed:
            self.names[int(desc["oid"])] = qualified
        self.described[int(desc["oid"])] = dict(desc)
        self.signatures[qualified] = signature(desc)

    def ddl(self, messages: Sequence[bytes], lsn: Lsn) -> DdlOutcome:
        """The archive's side of one committed transaction's DDL messages, at its commit
        *lsn*: documents in the order they apply, tables to re-snapshot, tables dropped."""
        out = DdlOutcome()
        rewritten: dict[int, str] = {}
        final: dict[int, dict[str, Any]] = {}  # OID -> the last description in the tx
        commands: dict[int, list[str]] = {}
        dropped: dict[int, dict[str, Any]] = {}
        for raw in messages:
            try:
                message = json.loads(raw)
            except ValueError:
                log.warning("ignoring a %s message that is not JSON at %s", DDL_PREFIX, lsn)
                continue
            event = message.get("event")
            if event == "rewrite":
                rewritten[int(message["oid"])] = str(message.get("command") or "a rewrite")
            elif event == "ddl":
                for desc in message.get("tables") or ():
                    oid = int(desc["oid"])
                    final[oid] = desc
                    commands.setdefault(oid, []).append(str(desc.get("command") or ""))
            elif event == "drop":
                for gone in message.get("tables") or ():
                    dropped[int(gone["oid"])] = gone
                    final.pop(int(gone["oid"]), None)
        for oid, gone in dropped.items():
            qualified = self.names.pop(oid, None) or join_qualified(gone["schema"],
                                                                    gone["name"])
            self.described.pop(oid, None)
            if self.captured(qualified) or qualified in self.signatures:
                self.signatures.pop(qualified, None)
                out.documents.append({"table": qualified, "lsn": int(lsn), "columns": [],
                                      "primary_key": [], "source": "ddl", "dropped": True,
                                      "command": "DROP TABLE"})
                out.dropped.append(qualified)
        for oid, latest in final.items():
            desc = with_previous_names(latest, self.described.get(oid))
            qualified = join_qualified(desc["schema"], desc["name"])
            before = self.names.get(oid)
            if not (self.captured(qualified) or (before is not None and self.captured(before))):
                continue
            tags = commands.get(oid, [])
            command = tags[-1] if tags else "ALTER TABLE"
            created = before is None and any(t.startswith(("CREATE TABLE", "SELECT INTO"))
                                             for t in tags)
            renamed_from = before if before is not None and before != qualified else None
            resnapshot = bool(created or renamed_from or oid in rewritten
                              or _RESNAPSHOT_COMMANDS.intersection(tags))
            if renamed_from is not None:
                self.signatures.pop(renamed_from, None)
                out.documents.append({"table": renamed_from, "lsn": int(lsn), "columns": [],
                                      "primary_key": [], "source": "ddl", "dropped": True,
                                      "renamed_to": qualified, "command": command})
                out.dropped.append(renamed_from)
            out.documents.append(document(desc, lsn, "ddl", command=command,
                                          created=created, renamed_from=renamed_from,
                                          resnapshot=resnapshot))
            self.recorded(desc)
            if resnapshot:
                out.resnapshot.append(qualified)
        for oid, command in rewritten.items():
            if oid in final or oid in dropped:
                continue
            name = self.names.get(oid)  # rewritten without a DDL description (rare)
            known = self.described.get(oid)
            if name is not None and known is not None and self.captured(name):
                out.documents.append(document(known, lsn, "ddl", command=command,
                                              resnapshot=True))
                out.resnapshot.append(name)
        return out

    async def relation(self, rel: pg.Relation, lsn: Lsn) -> dict[str, Any] | None:
        """The document to archive for a Relation message at *lsn*, or None when it says
        nothing new. Names, types and keys come from the message; NOT NULL, defaults and
        missing values from the last description of the table when its columns are the
        same, else from the catalog by OID (as it is now)."""
        qualified = join_qualified(rel.namespace, rel.name)
        sig = relation_signature(rel)
        before = self.names.get(rel.oid)
        self.names[rel.oid] = qualified
        if self.signatures.get(qualified) == sig and before in (None, qualified):
            return None
        self.signatures[qualified] = sig
        known = self.described.get(rel.oid)
        if known is None or signature(known) != sig:
            known = await self._catalog(rel)
        by_name = {c["name"]: c for c in (known or {}).get("columns", ())
                   if (c["name"], int(c["type_oid"]), int(c.get("type_modifier", -1)))
                   in set(sig)}
        types = await self._type_names([(c.type_oid, c.type_modifier) for c in rel.columns])
        columns = []
        for c, type_name in zip(rel.columns, types, strict=True):
            extra = by_name.get(c.name, {})
            columns.append({"name": c.name, "type": type_name, "type_oid": c.type_oid,
                            "type_modifier": c.type_modifier,
                            "not_null": bool(extra.get("not_null")),
                            "default": extra.get("default"),
                            **({"missing": extra["missing"]}
                               if extra.get("missing") is not None else {}),
                            **({"previous_names": extra["previous_names"]}
                               if extra.get("previous_names") else {})})
        # The primary key stays the row's identity (as in the capture's events); the key
        # flags stand in only when the table has none.
        primary = list((known or {}).get("primary_key") or ())
        names = {c.name for c in rel.columns}
        key = primary if primary and set(primary) <= names else [
            c.name for c in rel.columns if c.flags_key]
        return {"table": qualified, "lsn": int(lsn), "columns": columns,
                "primary_key": key, "source": "relation"}

    async def _catalog(self, rel: pg.Relation) -> dict[str, Any] | None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            return await describe(conn, rel.oid)

    async def _type_names(self, types: Iterable[tuple[int, int]]) -> list[str]:
        pairs = list(types)
        if not pairs:
            return []
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT coalesce(pg_catalog.format_type(t, m), t::text) "
                "FROM unnest(%s::oid[], %s::int[]) WITH ORDINALITY AS u(t, m, i) ORDER BY i",
                ([t for t, _ in pairs], [m for _, m in pairs]))
            return [str(r[0]) for r in await cur.fetchall()]
