"""Every column type the capture supports survives capture -> archive -> restore exactly.

Each hypothesis example inserts a few rows (the edge cases of `test_decoder_vs_postgres`:
NaN and infinities, huge and very precise numerics, negative and mixed-sign intervals, odd
time zone offsets, text that needs quoting and escaping, NULLs in and out of arrays...) into
a table with one column of each type, then follows the path of a real capture and restore:

1. `COPY (SELECT ...) TO STDOUT` read with the snapshot's parser (`parse_copy_line`) in a
   session pinned to the walsender defaults, as the capture reads Postgres's text output;
2. the capture's converters (`TypeRegistry`, with the database's enum and domains registered
   from the catalog) turn it into Python values;
3. `archived_values(row, column_types)` gives the archived datums, and a real fastavro round
   trip through `EventCodec` must give the very same datums;
4. `render.copy_line` of those datums is COPYed into a fresh table of the same column types,
   in a session whose TimeZone, DateStyle and IntervalStyle differ from the source's (the
   restore target connects with whatever defaults its server has);
5. `SELECT t::text` of every restored row must equal that of the original row, exactly;
6. the restored table read back the same way must give the same `row_digest` per row and the
   same `TableHash` as the archived datums (verify's live hash and restore hash agree).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from replicator.archive.render import TableHash, copy_line, row_digest
from replicator.events import ChangeEvent, Op
from replicator.position import ChangePosition, Lsn
from replicator.source.assembler import column_types
from replicator.source.catalog import _TYPES as CATALOG_TYPES_SQL
from replicator.source.snapshot import parse_copy_line
from replicator.source.values import Converter, TypeRegistry
from replicator.transport.avro import EventCodec, archived_values
from tests.integration.test_decoder_vs_postgres import (
    COLUMNS as DECODER_COLUMNS,
)
from tests.integration.test_decoder_vs_postgres import (
    EDGES,
    ENUM_LABELS,
    INT32,
    INT64,
    SPECIAL,
    TIME_ZONES,
    array_literal,
    bytea_values,
    dates,
    int4s,
    intervals,
    json_texts,
    nullable,
    pin_walsender_settings,
    texts,
    times,
    timestamps,
    timetzs,
)

pytestmark = pytest.mark.integration

# On PG < 17 an interval with all three fields at their maximum is finite, but the archive
# encodes exactly that as 'infinity' (PG 17's encoding), which PG < 17 cannot read back.
MAX_INTERVAL = f"{INT32} mons {INT32} days 2562047788:00:54.775807"
assert INT64 == 2562047788 * 3_600_000_000 + 54_775_807


def float_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def infinite_intervals_to_null(value: Any) -> Any:
    """PG < 17 has no infinite intervals: drop them (in arrays too)."""
    if isinstance(value, list):
        return [infinite_intervals_to_null(v) for v in value]
    return None if value in (*SPECIAL, MAX_INTERVAL) else value


def identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Col:
    name: str
    sql_type: str
    values: st.SearchStrategy[Any]
    # The parameter sent for a generated value (arrays are generated as lists of literals).
    param: Callable[[Any], Any] = identity
    # Applied before `param` on Postgres < 17.
    before_17: Callable[[Any], Any] = identity


def list_col(name: str, sql_type: str, elements: st.SearchStrategy[Any], max_size: int = 4,
             before_17: Callable[[Any], Any] = identity) -> Col:
    return Col(name, sql_type, st.lists(nullable(elements), max_size=max_size), array_literal,
               before_17)


def matrix_col(name: str, sql_type: str, elements: st.SearchStrategy[Any]) -> Col:
    """2-D (or 3-D) arrays: every sub-array of one level the same length, as Postgres wants."""
    def shaped(dims: list[int]) -> st.SearchStrategy[Any]:
        strategy: st.SearchStrategy[Any] = nullable(elements)
        for size in reversed(dims):
            strategy = st.lists(strategy, min_size=size, max_size=size)
        return strategy

    shapes = st.lists(st.integers(1, 3), min_size=2, max_size=3)
    return Col(name, sql_type, shapes.flatmap(shaped), array_literal)


# The decoder test's columns (every scalar type, and arrays of int4, text, numeric,
# timestamptz, jsonb, an int4 matrix, an enum and a numeric domain), then more arrays, text
# matrices, domains over date and jsonb and every text-like built-in type.
COLUMNS: tuple[Col, ...] = (
    *(Col(c.name, c.sql_type, c.values,
          before_17=infinite_intervals_to_null if c.sql_type == "interval" else identity)
      for c in DECODER_COLUMNS),
    matrix_col("c_text_matrix", "text[]", texts(8)),
    list_col("c_bytea_array", "bytea[]", bytea_values.map(lambda b: "\\x" + b.hex()), 3),
    list_col("c_bool_array", "bool[]", st.booleans()),
    list_col("c_float8_array", "float8[]", st.floats().map(float_text)),
    list_col("c_float4_array", "float4[]", st.floats(width=32).map(float_text)),
    list_col("c_int8_array", "int8[]", st.integers(-INT64 - 1, INT64)),
    list_col("c_date_array", "date[]", st.one_of(st.sampled_from(SPECIAL), dates)),
    list_col("c_timestamp_array", "timestamp[]", st.one_of(st.sampled_from(SPECIAL), timestamps)),
    list_col("c_time_array", "time[]", times),
    list_col("c_timetz_array", "timetz[]", timetzs),
    list_col("c_interval_array", "interval[]", intervals(),
             before_17=infinite_intervals_to_null),
    list_col("c_uuid_array", "uuid[]", st.uuids()),
    list_col("c_json_array", "json[]", json_texts(), 3),
    list_col("c_mood_array", "mood[]", st.sampled_from(ENUM_LABELS)),
    list_col("c_price_array", "price[]", st.decimals(0, 10**6, places=2).map(str)),
    matrix_col("c_int4_cube", "int4[]", int4s),
    # A domain over date: its infinity needs the base type's hint (`column_types`).
    Col("c_wedding_day", "wedding_day", st.one_of(st.sampled_from(SPECIAL), dates)),
    # A domain over jsonb: archived as json, not as text.
    Col("c_doc", "doc", json_texts()),
    Col("c_char", '"char"', st.sampled_from(["a", "\\", '"', ",", "{", " ", "N"])),
    Col("c_name", "name", texts(20).filter(lambda s: len(s.encode()) < 64)),
    Col("c_oid", "oid", st.integers(0, 2**32 - 1)),
    Col("c_inet", "inet", st.sampled_from(
        ["192.168.0.1", "10.0.0.0/8", "::1", "2001:db8::ff00:42:8329/64", "0.0.0.0/0"])),
    Col("c_cidr", "cidr", st.sampled_from(["10.0.0.0/8", "2001:db8::/32", "192.168.1.0/24"])),
    Col("c_macaddr", "macaddr", st.sampled_from(["08:00:2b:01:02:03", "00:00:00:00:00:00"])),
    Col("c_macaddr8", "macaddr8", st.sampled_from(["08:00:2b:01:02:03:04:05"])),
    Col("c_money", "money", st.sampled_from(["12.50", "-0.01", "92233720368547758.07"])),
    Col("c_bit", "bit(4)", st.sampled_from(["0000", "1010", "1111"])),
    Col("c_varbit", "varbit", st.text("01", max_size=20)),
    Col("c_tsvector", "tsvector", st.sampled_from(
        ["a:1 b:2", "'with space':1A 'quo''te':2", "\\\\back"])),
    Col("c_tsquery", "tsquery", st.sampled_from(["a & b", "!x | (y <-> z)"])),
    Col("c_jsonpath", "jsonpath", st.sampled_from(['$.a[*] ? (@ > 1)', '$."key with \\"q\\""'])),
)
NAMES = tuple(c.name for c in COLUMNS)
INSERT_SQL = "INSERT INTO src (id, {}) VALUES (%s, {})".format(
    ", ".join(NAMES), ", ".join(f"%s::{c.sql_type}" for c in COLUMNS))

# Restore sessions: the rendered text must mean the same under any of these.
RESTORE_SESSIONS = (
    ("UTC", "ISO, MDY", "postgres"),
    ("Pacific/Chatham", "SQL, DMY", "sql_standard"),
    ("America/St_Johns", "German", "iso_8601"),
    ("Asia/Kathmandu", "Postgres, YMD", "postgres_verbose"),
)


@dataclass
class Tables:
    source: psycopg.Connection[Any]
    restore: psycopg.Connection[Any]
    server_version: int
    registry: TypeRegistry
    kinds: dict[str, str]
    converters: tuple[Converter, ...]
    codec: EventCodec


@pytest.fixture
def tables(pg_dsn: str) -> Iterator[Tables]:
    labels = ", ".join("'" + label.replace("'", "''") + "'" for label in ENUM_LABELS)
    columns = ", ".join(f"{c.name} {c.sql_type}" for c in COLUMNS)
    with psycopg.connect(pg_dsn, autocommit=True) as source, \
            psycopg.connect(pg_dsn, autocommit=True) as restore:
        pin_walsender_settings(source)
        source.execute(f"CREATE TYPE mood AS ENUM ({labels})")
        source.execute("CREATE DOMAIN price AS numeric(12,2) CHECK (VALUE >= 0)")
        source.execute("CREATE DOMAIN wedding_day AS date")
        source.execute("CREATE DOMAIN doc AS jsonb")
        source.execute(f"CREATE TABLE src (id int PRIMARY KEY, {columns})")
        source.execute("CREATE TABLE dst (LIKE src)")
        # The capture's own catalog query and registration (`catalog.load_types`).
        registry = TypeRegistry()
        rows = source.execute(CATALOG_TYPES_SQL).fetchall()
        for oid, name, typtype, category, base, elem in sorted(rows, key=lambda r: r[3] == "A"):
            registry.register_catalog_type(oid, name, typtype, category, base, elem)
        attributes = source.execute(
            "SELECT attname::text, atttypid::int FROM pg_attribute WHERE attrelid = 'src'::regclass"
            " AND attnum > 0 AND NOT attisdropped ORDER BY attnum").fetchall()
        assert [name for name, _ in attributes] == ["id", *NAMES]
        kinds = column_types(attributes, registry)
        # The hints the encoder needs really are the base types.
        assert (kinds["c_wedding_day"], kinds["c_doc"]) == ("date", "jsonb")
        assert (kinds["c_interval_array"], kinds["c_jsonb_array"]) == ("_interval", "_jsonb")
        converters = tuple(registry.converter(oid, table="src", column=name)
                           for name, oid in attributes)
        yield Tables(source, restore, source.info.server_version, registry, kinds, converters,
                     EventCodec("t"))


def read_rows(t: Tables, table: str) -> list[dict[str, Any]]:
    """The table's rows by id as the capture reads them: COPY's text output, parsed like the
    snapshot does, through the converters."""
    names = ("id", *NAMES)
    query = f"COPY (SELECT * FROM {table} ORDER BY id) TO STDOUT"
    with t.source.cursor() as cur, cur.copy(query) as copy:
        data = b"".join(bytes(chunk) for chunk in copy)
    return [{n: None if v is None else f(v)
             for n, f, v in zip(names, t.converters, parse_copy_line(line), strict=True)}
            for line in data.split(b"\n")[:-1]]


def through_avro(t: Tables, row: dict[str, Any]) -> dict[str, Any]:
    """The row as a real archive holds it: encoded in the envelope and decoded by fastavro;
    it must be exactly what `archived_values` gives."""
    event = ChangeEvent(Op.READ, "public", "src", ChangePosition(Lsn(1), row["id"]), 0, 0,
                        {"id": row["id"]}, None, row)
    decoded = t.codec.decode_event(t.codec.encode_event(event, t.kinds))["after"]
    assert repr(decoded) == repr(archived_values(row, t.kinds))  # repr: NaN equals NaN
    return dict(decoded)


def round_trip(t: Tables, rows: list[dict[str, Any]], zone: str,
               restore_session: tuple[str, str, str]) -> None:
    source, restore = t.source, t.restore
    source.execute("TRUNCATE src, dst")
    source.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
    for row_id, row in enumerate(rows, 1):
        params = []
        for c in COLUMNS:
            value = row[c.name]
            if t.server_version < 170000:
                value = c.before_17(value)
            params.append(None if value is None else c.param(value))
        source.execute(INSERT_SQL, (row_id, *params))

    # Capture: Postgres's text -> Python values -> archived datums -> Avro and back.
    archived = [through_avro(t, row) for row in read_rows(t, "src")]
    assert [a["id"] for a in archived] == list(range(1, len(rows) + 1))

    # Restore: COPY the rendered lines, in a session with other settings.
    names = ("id", *NAMES)
    zone_r, datestyle, intervalstyle = restore_session
    restore.execute("SELECT set_config('TimeZone', %s, false), set_config('DateStyle', %s, false),"
                    " set_config('IntervalStyle', %s, false)", (zone_r, datestyle, intervalstyle))
    payload = "".join(copy_line([a[n] for n in names]) for a in archived).encode()
    with restore.cursor() as cur, cur.copy("COPY dst FROM STDIN") as copy:
        copy.write(payload)

    # Exactly the same rows, as Postgres itself prints them.
    original = source.execute("SELECT id, s::text FROM src s ORDER BY id").fetchall()
    restored = source.execute("SELECT id, d::text FROM dst d ORDER BY id").fetchall()
    assert len(restored) == len(original) == len(rows)
    for (row_id, want), (_, got) in zip(original, restored, strict=True):
        assert got == want, f"row {row_id} differs after restore"

    # Verify: the restored table read back like the live one hashes like the archive.
    back = [archived_values(row, t.kinds) for row in read_rows(t, "dst")]
    assert len(back) == len(archived)
    live, restored_hash = TableHash(), TableHash()
    for before, after in zip(archived, back, strict=True):
        assert row_digest([before[n] for n in names]) == row_digest([after[n] for n in names])
        live.add([before[n] for n in names])
    for after in reversed(back):
        restored_hash.add([after[n] for n in names])
    assert (live.rows, live.hexdigest()) == (restored_hash.rows, restored_hash.hexdigest())


EDGE_ROW: dict[str, Any] = {
    **EDGES,
    "c_interval": "-1 mons +04:05:06",  # read as -1 mons -04:05:06 if sent unsigned
    "c_text_matrix": [['a"b', None, "{,}"], ["\\", "NULL", ""]],
    "c_bytea_array": ["\\x", None, "\\x" + bytes(range(256)).hex()],
    "c_bool_array": [True, None, False],
    "c_float8_array": ["NaN", "Infinity", "-Infinity", "-0.0", "5e-324", None],
    "c_float4_array": ["NaN", "-Infinity", "3.4028235e+38", "1e-45", "-0"],
    "c_int8_array": [-INT64 - 1, None, INT64],
    "c_date_array": ["infinity", None, "0001-01-01", "9999-12-31", "-infinity"],
    "c_timestamp_array": ["-infinity", "0001-01-01 00:00:00", "9999-12-31 23:59:59.999999"],
    "c_time_array": ["00:00:00", "23:59:59.999999", None],
    "c_timetz_array": ["00:00:00-15:59:59", "12:00:00+05:45", "23:59:59.999999+15:59:59"],
    "c_interval_array": ["infinity", "-1 mons +04:05:06", None, "-infinity", "0 days",
                         "-178956970 years -8 mons -2147483647 days -2562047788:00:54.775807"],
    "c_uuid_array": ["00000000-0000-0000-0000-000000000000", None],
    "c_json_array": [' {"a" : [1.50, "x\\"y"]}\n', None, '"NULL"', "null"],
    "c_mood_array": list(ENUM_LABELS),
    "c_price_array": ["0.00", None, "9999999999.99"],
    "c_int4_cube": [[[1, None], [None, -INT32 - 1]], [[0, 0], [INT32, None]]],
    "c_wedding_day": "infinity",
    "c_doc": '{"b": 1, "a": [1.50, {"\\u00e9": null}]}',
    "c_char": "\\",
    "c_name": 'tab\tnew\nline "q" \\ 💍',
    "c_oid": 2**32 - 1,
    "c_inet": "2001:db8::ff00:42:8329/64",
    "c_cidr": "10.0.0.0/8",
    "c_macaddr": "08:00:2b:01:02:03",
    "c_macaddr8": "08:00:2b:01:02:03:04:05",
    "c_money": "-0.01",
    "c_bit": "1010",
    "c_varbit": "",
    "c_tsvector": "'with space':1A 'quo''te':2",
    "c_tsquery": "!x | (y <-> z)",
    "c_jsonpath": '$."key with \\"q\\""',
}
ALL_NULL: dict[str, Any] = dict.fromkeys(NAMES)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(
    rows=st.lists(st.fixed_dictionaries({c.name: nullable(c.values) for c in COLUMNS}),
                  min_size=1, max_size=3),
    zone=st.sampled_from(TIME_ZONES),
    restore_session=st.sampled_from(RESTORE_SESSIONS),
)
@example(rows=[EDGE_ROW, ALL_NULL], zone="Africa/Monrovia", restore_session=RESTORE_SESSIONS[1])
@example(rows=[EDGE_ROW], zone="Pacific/Chatham", restore_session=RESTORE_SESSIONS[2])
def test_archived_values_restore_exactly(
    tables: Tables, rows: list[dict[str, Any]], zone: str, restore_session: tuple[str, str, str]
) -> None:
    round_trip(tables, rows, zone, restore_session)


@pytest.mark.parametrize(
    ("zone", "value"),
    [
        # Local times Python holds whose UTC instant is in year 10000 or 1 BC: the capture
        # reads them in these zones, the archive holds the UTC instant.
        ("America/Los_Angeles", "9999-12-31 20:00:00-05"),
        ("Asia/Kolkata", "0001-01-01 03:00:00+05:53:28"),
        ("Pacific/Pago_Pago", "9999-12-31 23:59:59.999999-10"),
    ],
)
def test_timestamptz_beyond_python_years_in_utc_restores(tables: Tables, zone: str,
                                                         value: str) -> None:
    row = {**ALL_NULL, "c_timestamptz": value, "c_timestamptz_array": [value, None]}
    round_trip(tables, [row], zone, RESTORE_SESSIONS[0])
    utc = tables.source.execute(
        "SELECT to_char(c_timestamptz AT TIME ZONE 'UTC', 'YYYY AD') FROM dst").fetchone()
    assert utc is not None and utc[0] in ("10000 AD", "0001 BC")


def test_date_years_below_100_keep_their_century(tables: Tables) -> None:
    """Four-digit years below 100 are not read as two-digit years in any DateStyle."""
    days = ["0001-01-01", "0009-09-09", "0099-12-31", "0100-02-28"]
    row = {**ALL_NULL, "c_date": days[1], "c_date_array": days,
           "c_timestamp": "0050-06-15 12:00:00"}
    for session in RESTORE_SESSIONS:
        round_trip(tables, [row], "UTC", session)
    got = tables.source.execute("SELECT c_date_array::text FROM dst").fetchone()
    assert got is not None and got[0] == "{" + ",".join(days) + "}"
