"""The schema history a restore reads from the archived schema documents: old and new
document forms, missing values filled in for rows written before a column existed, and the
plan's answers for dropped and rewritten tables."""

from __future__ import annotations

from typing import Any

import pytest

from replicator.archive.layout import part_key, segment_key
from replicator.archive.render import PgText, copy_line
from replicator.position import Lsn
from replicator.replay.plan import ReplayRefused, SchemaMark, plan
from replicator.replay.run import schema_at, schema_history
from replicator.replay.table import (
    Column,
    Output,
    TableJob,
    TableSchema,
    TableStats,
    job_objects,
    row_values,
)

GUESTS, VENDORS = "public.guests", "public.vendors"

OLD_DOC = {"table": GUESTS, "lsn": 0x100, "primary_key": ["id"],
           "columns": [{"name": "id", "type": "bigint", "type_oid": 20, "not_null": True},
                       {"name": "name", "type": "text", "type_oid": 25, "not_null": False}]}
NEW_DOC = {"table": GUESTS, "lsn": 0x200, "primary_key": ["id"], "source": "ddl",
           "command": "ALTER TABLE",
           "columns": [{"name": "id", "type": "bigint", "type_oid": 20, "not_null": True,
                        "default": "nextval('guests_id_seq'::regclass)", "type_modifier": -1},
                       {"name": "name", "type": "text", "type_oid": 25, "not_null": False,
                        "default": None, "type_modifier": -1},
                       {"name": "note", "type": "text", "type_oid": 25, "not_null": False,
                        "default": "'x'::text", "missing": "x", "type_modifier": -1},
                       {"name": "seat", "type": "integer", "type_oid": 23, "not_null": False,
                        "default": None, "missing": None, "type_modifier": -1}]}


def test_an_old_document_reads_as_before() -> None:
    schema = TableSchema.from_json(OLD_DOC)
    assert schema.names == ("id", "name")
    assert schema.columns[0] == Column("id", "bigint", True)
    assert schema.primary_key == ("id",) and schema.lsn == Lsn(0x100)
    assert dict(schema.missing) == {} and dict(schema.defaults) == {}
    assert not schema.defaults_known and not schema.dropped and not schema.resnapshot
    assert schema.renamed_to is None and schema.command is None
    assert schema.absent == (None, None)
    assert schema.fill({"id": 1}) == [1, None]


def test_a_ddl_document_carries_defaults_missing_values_and_flags() -> None:
    schema = TableSchema.from_json(NEW_DOC)
    assert schema.names == ("id", "name", "note", "seat")
    assert dict(schema.missing) == {"note": "x"}
    assert dict(schema.defaults) == {"id": "nextval('guests_id_seq'::regclass)",
                                     "note": "'x'::text"}
    assert schema.defaults_known and schema.command == "ALTER TABLE"
    assert schema.columns[2].default == "'x'::text"
    assert schema.absent == (None, None, PgText("x"), None)
    dropped = TableSchema.from_json({"table": GUESTS, "lsn": 0x300, "columns": [],
                                     "primary_key": [], "dropped": True,
                                     "renamed_to": "public.people"})
    assert dropped.dropped and dropped.renamed_to == "public.people" and dropped.names == ()
    assert TableSchema.from_json({**NEW_DOC, "resnapshot": True}).resnapshot


def test_a_column_absent_from_an_image_reads_as_its_missing_value() -> None:
    schema = TableSchema.from_json(NEW_DOC)
    # Written before `note` and `seat` existed: both absent. A NULL present stays NULL.
    assert schema.fill({"id": 1, "name": "a"}) == [1, "a", PgText("x"), None]
    assert schema.fill({"id": 1, "name": "a", "note": None, "seat": 3}) == [1, "a", None, 3]
    filled = schema.fill({"id": 1, "name": None})
    assert type(filled[2]) is PgText
    # A part's row of fewer columns (-1 where the part lacks one).
    where = [0, 1, -1, -1]
    assert row_values("1\tbob", where, schema.absent) == [PgText("1"), PgText("bob"),
                                                           PgText("x"), None]
    assert row_values("1\t\\N", where) == [PgText("1"), None, None, None]


def _job(schema: TableSchema) -> TableJob:
    return TableJob(GUESTS, schema, (), Lsn(0x100), Lsn(0x300))


async def test_output_fills_missing_values_in_records_states_and_lines() -> None:
    schema = TableSchema.from_json(NEW_DOC)
    got: list[list[Any]] = []
    lines: list[str] = []

    async def emit(rows: list[list[Any]]) -> None:
        got.extend(rows)

    async def emit_lines(rows: list[str], keys: list[str], weddings: list[str]) -> None:
        lines.extend(rows)

    out = Output(_job(schema), TableStats(GUESTS), emit, None, None, None)
    await out.record({"after": {"id": 1, "name": "a"}, "key": {"id": 1}, "wedding_id": None,
                      "source": {"lsn": 0x100}})
    await out.state({"id": 2, "name": "b", "note": None}, None, "2", 0x100)
    await out.flush()
    await out.lines(["3\tc"], ("id", "name"), [], [], 0x100)
    assert got == [[1, "a", PgText("x"), None], [2, "b", None, None],
                   [PgText("3"), PgText("c"), PgText("x"), None]]
    # Compaction writes what it restores: the snapshot holds the filled value.
    compacting = Output(_job(schema), TableStats(GUESTS), emit, None, emit_lines, None)
    await compacting.lines(["4\td"], ("id", "name"), ["4"], ["\\N"], 0x100)
    await compacting.state({"id": 5, "name": "e"}, None, "5", 0x100)
    await compacting.flush(base=False)
    assert lines == ["4\td\tx\t\\N", copy_line([5, "e", PgText("x"), None])[:-1]]


def test_schema_at_and_history_from_documents() -> None:
    docs = {GUESTS: [(Lsn(0x100), OLD_DOC), (Lsn(0x200), NEW_DOC),
                     (Lsn(0x300), {"table": GUESTS, "lsn": 0x300, "columns": [],
                                   "primary_key": [], "dropped": True,
                                   "command": "DROP TABLE"})]}
    assert schema_at(docs, GUESTS, Lsn(0x1ff)).names == ("id", "name")
    assert schema_at(docs, GUESTS, Lsn(0x200)).missing == {"note": "x"}
    assert schema_at(docs, GUESTS, Lsn(0x50)).lsn == Lsn(0x100)  # the oldest, as before
    assert schema_history(docs) == {GUESTS: [SchemaMark(Lsn(0x300), True, False, None,
                                                        "DROP TABLE")]}


# --- the plan ---------------------------------------------------------------------------------


def seg(table: str, first: int, last: int) -> str:
    return segment_key(table, Lsn(first), Lsn(last), "")


LISTING = [seg(GUESTS, 0x10, 0x10), seg(GUESTS, 0x20, 0x500), seg(VENDORS, 0x10, 0x10),
           seg(VENDORS, 0x20, 0x500)]
SNAPSHOTS = {GUESTS: [0x10], VENDORS: [0x10]}
CHECKPOINT = Lsn(0x1000)


def _plan(at: int, history: dict[str, list[SchemaMark]], tables: list[str] | None = None,
          snapshots: dict[str, list[int]] | None = None) -> Any:
    return plan(LISTING, at=Lsn(at), checkpoint=CHECKPOINT, tables=tables,
                snapshots=snapshots or SNAPSHOTS, history=history)


def test_a_dropped_table_is_left_out_of_a_whole_restore_and_refused_by_name() -> None:
    history = {VENDORS: [SchemaMark(Lsn(0x300), dropped=True, command="DROP TABLE")]}
    before = _plan(0x2ff, history)
    assert [t.table for t in before.tables] == [GUESTS, VENDORS] and not before.left_out
    after = _plan(0x300, history)
    assert [t.table for t in after.tables] == [GUESTS]
    assert after.left_out == ((VENDORS, "table public.vendors was dropped at 0/300"),)
    assert after.to_dict()["left_out"] == {VENDORS: "table public.vendors was dropped at 0/300"}
    assert "left_out" not in before.to_dict()
    with pytest.raises(ReplayRefused, match=r"public.vendors was dropped at 0/300") as refused:
        _plan(0x400, history, tables=["vendors"])
    assert refused.value.tables == (VENDORS,) and refused.value.nearest == Lsn(0x2ff)
    renamed = {VENDORS: [SchemaMark(Lsn(0x300), dropped=True, renamed_to="public.suppliers")]}
    with pytest.raises(ReplayRefused, match=r"renamed to public.suppliers at 0/300"):
        _plan(0x400, renamed, tables=[VENDORS])
    everything = {**history, GUESTS: [SchemaMark(Lsn(0x250), dropped=True)]}
    with pytest.raises(ReplayRefused, match="every table"):
        _plan(0x400, everything)


def test_a_table_dropped_and_created_again_starts_empty_at_the_drop() -> None:
    history = {VENDORS: [SchemaMark(Lsn(0x300), dropped=True)]}  # created again after
    planned = _plan(0x400, {VENDORS: [*history[VENDORS],
                                      SchemaMark(Lsn(0x310), resnapshot=True)]},
                    snapshots={GUESTS: [0x10], VENDORS: [0x10, 0x320]})
    table = planned.table(VENDORS)
    assert table.base_kind == "recreated" and table.base == Lsn(0x300)
    assert table.apply_after == Lsn(0x300)
    assert table.segments == (seg(VENDORS, 0x20, 0x500),)  # the one before the drop left out
    assert planned.table(GUESTS).base_kind == "archive-start"
    # The job starts after the drop: nothing at or below it is applied, no part there is base.
    schema = TableSchema(VENDORS, (Column("id", "bigint", True),), ("id",), Lsn(0x310))
    job = TableJob(VENDORS, schema, (part_key(VENDORS, Lsn(0x300), 0, 1, "ab"),
                                     part_key(VENDORS, Lsn(0x320), 0, 1, "cd")),
                   Lsn(0x300), Lsn(0x400), cleared=True)
    assert job.first_change == 0x301
    assert [(o.kind.name, o.first) for o in job_objects(job)] == [("PART", Lsn(0x320))]


def test_a_rewrite_is_refused_until_the_tables_re_snapshot() -> None:
    mark = SchemaMark(Lsn(0x300), resnapshot=True, command="ALTER TABLE")
    with_boundary = {GUESTS: [0x10, 0x380], VENDORS: [0x10]}
    assert _plan(0x2ff, {GUESTS: [mark]}, snapshots=with_boundary).target == Lsn(0x2ff)
    for at in (0x300, 0x37f):
        with pytest.raises(ReplayRefused, match=(
                r"public.guests was rewritten by ALTER TABLE at 0/300; its rows are "
                r"restorable again from 0/380 \(its re-snapshot\)")) as refused:
            _plan(at, {GUESTS: [mark]}, snapshots=with_boundary)
        assert refused.value.tables == (GUESTS,) and refused.value.nearest == Lsn(0x2ff)
    accepted = _plan(0x380, {GUESTS: [mark]}, snapshots=with_boundary)
    assert accepted.table(GUESTS).base_kind == "archive-start"  # its r rows upsert at 0/380
    with pytest.raises(ReplayRefused, match="once its re-snapshot is archived") as refused:
        _plan(0x900, {GUESTS: [mark]})
    assert refused.value.nearest == Lsn(0x2ff)
    # The nearest point suggested for another refusal steps out of the window too.
    with pytest.raises(ReplayRefused, match="past the destination") as refused:
        plan(LISTING, at=Lsn(0x2000), checkpoint=Lsn(0x350), snapshots=SNAPSHOTS,
             history={GUESTS: [mark]})
    assert refused.value.nearest == Lsn(0x2ff)


def test_without_a_history_nothing_changes() -> None:
    assert _plan(0x400, {}).to_dict() == plan(LISTING, at=Lsn(0x400), checkpoint=CHECKPOINT,
                                               snapshots=SNAPSHOTS).to_dict()


# --- verify's column comparison ----------------------------------------------------------------


def test_compare_columns_names_each_difference_and_both_sides() -> None:
    from replicator.replay.verify import LiveColumn, compare_columns

    schema = TableSchema.from_json(NEW_DOC)
    same = [LiveColumn(c.name, c.type, c.not_null, c.default) for c in schema.columns]
    assert compare_columns(schema, same, "the live database") == ([], [])
    live = [LiveColumn("id", "bigint", False, None), LiveColumn("name", "text", False, None),
            LiveColumn("note", "character varying(5)", False, "'x'::text"),
            LiveColumn("extra", "text", False, None)]
    problems, notes = compare_columns(schema, live, "the live database")
    assert problems == [
        "column extra (text) is in the live database and not in the archive's schema "
        "(at 0/200)",
        "column id: nullable in the live database, NOT NULL in the archive's schema (at 0/200)",
        "column id: default none in the live database, nextval('guests_id_seq'::regclass) in "
        "the archive's schema (at 0/200)",
        "column note: type character varying(5) in the live database, text in the archive's "
        "schema (at 0/200)",
        "column seat (integer) is in the archive's schema (at 0/200) and not in the live "
        "database",
    ] and notes == []
    # A default the restore could not create is a note; an old document's are not compared.
    problems, notes = compare_columns(schema, [*same[:0], LiveColumn("id", "bigint", True, None),
                                               *same[1:]], "the scratch database",
                                      {"id": "nextval('guests_id_seq'::regclass)"})
    assert problems == [] and len(notes) == 1 and "column id" in notes[0]
    old = TableSchema.from_json(OLD_DOC)
    assert compare_columns(old, [LiveColumn("id", "bigint", True, "1"),
                                 LiveColumn("name", "text", False, "'n'::text")], "x") == ([], [])
    assert compare_columns(old, None, "the live database") == (
        ["the live database has no table public.guests"], [])


def test_a_table_created_later_is_refused_for_its_window_not_its_oldest_point() -> None:
    extras = "public.extras"
    listing = [*LISTING, part_key(extras, Lsn(0x380), 0, 1, "ab")]
    snapshots = {**SNAPSHOTS, extras: [0x380]}
    created = {extras: [SchemaMark(Lsn(0x300), resnapshot=True, command="CREATE TABLE")]}
    with pytest.raises(ReplayRefused, match=r"re-snapshot\)") as refused:
        plan(listing, at=Lsn(0x340), checkpoint=CHECKPOINT, snapshots=snapshots,
             history=created)
    assert refused.value.tables == (extras,)
    assert plan(listing, at=Lsn(0x380), checkpoint=CHECKPOINT, snapshots=snapshots,
                history=created).table(extras).segments == (listing[-1],)


def _doc(lsn: int, *columns: str, previous: dict[str, list[str]] | None = None,
         missing: dict[str, str] | None = None) -> tuple[Lsn, dict[str, object]]:
    return Lsn(lsn), {"table": GUESTS, "lsn": lsn, "primary_key": ["id"], "columns": [
        {"name": c, "type": "text", "not_null": c == "id", "default": None,
         **({"previous_names": (previous or {})[c]} if c in (previous or {}) else {}),
         **({"missing": (missing or {})[c]} if c in (missing or {}) else {})}
        for c in columns]}


def test_a_column_dropped_and_added_again_is_reborn_where_it_came_back() -> None:
    docs = {GUESTS: [_doc(0x100, "id", "note"), _doc(0x200, "id"),
                     _doc(0x300, "id", "note", missing={"note": "fresh"}),
                     _doc(0x400, "id", "note")]}
    assert schema_at(docs, GUESTS, Lsn(0x450)).reborn == {"note": Lsn(0x300)}
    assert schema_at(docs, GUESTS, Lsn(0x150)).reborn == {}  # the first incarnation
    assert schema_at(docs, GUESTS, Lsn(0x250)).reborn == {}
    # An ordinary ADD COLUMN is not a rebirth: rows before it lack the column anyway.
    plain = {GUESTS: [_doc(0x100, "id"), _doc(0x200, "id", "note")]}
    assert schema_at(plain, GUESTS, Lsn(0x300)).reborn == {}
    # A rename keeps the column's life: note -> memo, then a new note.
    renamed = {GUESTS: [_doc(0x100, "id", "note"), _doc(0x200, "id", "memo",
                                                          previous={"memo": ["note"]}),
                        _doc(0x300, "id", "memo", "note", previous={"memo": ["note"]})]}
    assert schema_at(renamed, GUESTS, Lsn(0x300)).reborn == {"note": Lsn(0x300)}
    # A table dropped and created again: the old table's column is not an incarnation.
    recreated = {GUESTS: [_doc(0x100, "id", "note"),
                          (Lsn(0x200), {"table": GUESTS, "lsn": 0x200, "columns": [],
                                        "primary_key": [], "dropped": True}),
                          _doc(0x300, "id"), _doc(0x400, "id", "note")]}
    assert schema_at(recreated, GUESTS, Lsn(0x400)).reborn == {}


async def test_output_voids_a_reborn_columns_old_values() -> None:
    """Row images older than the re-added column read its missing value, whatever value the
    dropped column had under the name; newer ones keep theirs."""
    docs = {GUESTS: [_doc(0x100, "id", "note"), _doc(0x200, "id"),
                     _doc(0x300, "id", "note", missing={"note": "fresh"})]}
    schema = schema_at(docs, GUESTS, Lsn(0x300))
    got: list[list[object]] = []

    async def emit(rows: list[list[object]]) -> None:
        got.extend(rows)

    out = Output(_job(schema), TableStats(GUESTS), emit, None, None, None)
    await out.record({"after": {"id": 1, "note": "old"}, "key": {"id": 1}, "wedding_id": None,
                      "source": {"lsn": 0x100}})
    await out.state({"id": 2, "note": "old"}, None, "2", 0x150)
    await out.state({"id": 3, "note": "new"}, None, "3", 0x350)
    await out.flush()
    await out.lines(["4\told"], ("id", "note"), [], [], 0x100)
    await out.lines(["5\tnew"], ("id", "note"), [], [], 0x300)
    assert got == [[1, PgText("fresh")], [2, PgText("fresh")], [3, "new"],
                   [PgText("4"), PgText("fresh")], [PgText("5"), PgText("new")]]
    assert not out.plain(("id", "note"), 0x100) and out.plain(("id", "note"), 0x300)
