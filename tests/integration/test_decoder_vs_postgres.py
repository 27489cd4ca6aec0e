"""The decoder's value for every supported type equals what Postgres itself returns for the row.

Each hypothesis example inserts one row (edge cases included: NaN, infinities, huge and very
precise numerics, negative intervals, odd time zone offsets, text that needs quoting, NULLs in
and out of arrays...) into a table with a column of each type, reads the change back through a
pgoutput slot with `pg_logical_slot_get_binary_changes`, decodes it with `Decoder` and
`RowDecoder`, and compares every column with a reference selected from the same row.

The reference is chosen per type so that its Python meaning is not in doubt: psycopg's own
binary-format value where psycopg's type is the one values.py promises (so it never goes through
the text form the decoder parses), and otherwise exact numbers that Postgres extracts itself
(interval fields, epoch and offset of timestamptz, ...) or the column's `::text` where the
decoder's value is meant to be that text (json, jsonb, enum labels). Each column says why.

The SQL session stands in for a walsender: the slot's output functions run with its settings,
so it is pinned to the walsender defaults values.py expects (DateStyle ISO, IntervalStyle
postgres, bytea_output hex), and its TimeZone varies per example to exercise the offsets.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import string
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from replicator.source.pgoutput import (
    UNCHANGED,
    Decoder,
    Insert,
    PgOutputMessage,
    Relation,
    Type,
    Update,
)
from replicator.source.values import Infinity, Interval, RowDecoder, TypeRegistry

pytestmark = pytest.mark.integration

INT16, INT32, INT64 = 2**15 - 1, 2**31 - 1, 2**63 - 1
SPECIAL = ("infinity", "-infinity")
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
MAX_TZ_OFFSET = 15 * 3600 + 59 * 60 + 59  # Postgres accepts offsets up to +-15:59:59

# Session time zones for timestamptz output: half-hour and 45-minute offsets, +14, -11, and
# zones whose offset was not whole minutes until the 20th century (Monrovia -00:44:30 before
# 1972, Amsterdam +00:19:32 before 1937 in the tzdata Postgres 15 was built with).
TIME_ZONES = (
    "UTC",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/St_Johns",
    "Pacific/Chatham",
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
    "America/Los_Angeles",
    "Europe/Amsterdam",
    "Africa/Monrovia",
)

# --- strategies: each yields the parameter psycopg sends, cast in SQL to the column's type ---


def nullable(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """About one value in five is NULL (plain `st.none() | values` would make it half)."""
    return st.tuples(st.integers(0, 4), values).map(lambda t: None if t[0] == 0 else t[1])


def quote_element(value: object) -> str:
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def array_literal(items: Sequence[object]) -> str:
    """Postgres array input text; every non-NULL element quoted, nested lists as dimensions."""
    parts = []
    for item in items:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list):
            parts.append(array_literal(item))
        else:
            parts.append(quote_element(item))
    return "{" + ",".join(parts) + "}"


def offset_text(seconds: int) -> str:
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{sign}{hours:02d}:{minutes:02d}:{secs:02d}"


# Characters that need quoting or escaping somewhere (array elements, json, SQL), plus
# non-ASCII letters, an emoji and a no-break space (not whitespace to array_out).
TRICKY_CHARS = '"\\\',{}() \t\n\r\x0b\x0c;:NUL=é€ü💍\u00a0\u2028'
chars = st.one_of(
    st.sampled_from(TRICKY_CHARS), st.characters(codec="utf-8", exclude_characters="\x00")
)
TRICKY_TEXTS = ("", " ", "NULL", "null", "{}", '"', "\\", "a,b", "{a,b}", "  padded  ", "💍")


def texts(max_size: int) -> st.SearchStrategy[str]:
    tricky = st.sampled_from([t for t in TRICKY_TEXTS if len(t) <= max_size])
    return st.one_of(tricky, st.text(chars, max_size=max_size))


def numerics(max_exponent: int = 131_000) -> st.SearchStrategy[Decimal]:
    """Finite numerics within Postgres's limits (131072 digits before the point, 16383 after),
    plus NaN, +-Infinity and values with 30 fractional digits."""
    exponents = st.one_of(
        st.integers(-40, 40), st.just(-30), st.integers(-16_383, max_exponent)
    )
    finite = st.builds(
        lambda sign, digits, exponent: Decimal((sign, tuple(digits), exponent)),
        st.integers(0, 1),
        st.lists(st.integers(0, 9), min_size=1, max_size=40),
        exponents,
    ).filter(lambda d: d.adjusted() < 131_072)
    special = st.sampled_from(
        [
            Decimal("NaN"),
            Decimal("Infinity"),
            Decimal("-Infinity"),
            Decimal("0.000000000000000000000000000001"),
            Decimal("-123456789.123456789012345678901234567890"),
            Decimal("1E+131071"),
            Decimal("-1E-16383"),
        ]
    )
    return st.one_of(special, finite)


def numeric_text(max_exponent: int = 131_000) -> st.SearchStrategy[str]:
    return numerics(max_exponent).map(str)


def json_texts() -> st.SearchStrategy[str]:
    """JSON text with odd whitespace, duplicate keys, big and precise numbers, escapes."""
    ws = st.sampled_from(["", " ", "  ", "\n", "\t", " \r\n "])
    numbers = st.builds(
        lambda sign, whole, frac, exp: f"{sign}{whole}{frac}{exp}",
        st.sampled_from(["", "-"]),
        st.one_of(st.just("0"), st.integers(1, 10**30).map(str)),
        st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=30).map(".{}".format)),
        st.one_of(st.just(""), st.integers(-300, 300).map(lambda e: f"e{e:+d}")),
    )
    strings = st.one_of(
        texts(20).map(json.dumps), texts(20).map(lambda s: json.dumps(s, ensure_ascii=False))
    )
    scalars = st.one_of(st.sampled_from(["null", "true", "false"]), numbers, strings)
    keys = st.one_of(st.sampled_from(['"a"', '"b"', '""', '"ключ"']), strings)

    def containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        def join(open_: str, close: str, items: list[tuple[str, str, str]]) -> str:
            return open_ + ",".join(f"{a}{item}{b}" for a, item, b in items) + close

        arrays = st.lists(st.tuples(ws, children, ws), max_size=4).map(
            lambda items: join("[", "]", items)
        )
        members = st.tuples(keys, ws, ws, children).map(lambda m: f"{m[0]}{m[1]}:{m[2]}{m[3]}")
        objects = st.lists(st.tuples(ws, members, ws), max_size=4).map(
            lambda items: join("{", "}", items)
        )
        return arrays | objects

    value = st.recursive(scalars, containers, max_leaves=12)
    return st.tuples(ws, value, ws).map("".join)


def intervals() -> st.SearchStrategy[str]:
    """Interval input text with independent, often mixed-sign months, days and time parts.

    Field values reach the type's limits; on PG 17+ all three at their maximum is 'infinity'.
    """

    def literal(months: int, days: int, micros: int) -> str:
        sign = "-" if micros < 0 else ""
        hours, rest = divmod(abs(micros), 3_600_000_000)
        minutes, rest = divmod(rest, 60_000_000)
        seconds, fraction = divmod(rest, 1_000_000)
        return f"{months} mons {days} days {sign}{hours}:{minutes:02d}:{seconds:02d}.{fraction:06d}"

    def field(limit: int, small: int) -> st.SearchStrategy[int]:
        return st.one_of(st.just(0), st.integers(-small, small), st.integers(-limit, limit))

    finite = st.builds(
        literal, field(INT32, 30), field(INT32, 400), field(INT64, 100_000_000_000)
    )
    return st.one_of(st.sampled_from(SPECIAL), finite)


dates = st.dates().map(date.isoformat)
times = st.times().map(time.isoformat)
offsets = st.one_of(
    st.sampled_from([0, 19800, -12600, 20700, -34200, 50400, -43200, 1172, -2670]),
    st.integers(-MAX_TZ_OFFSET, MAX_TZ_OFFSET),
)
timetzs = st.builds(lambda t, off: t.isoformat() + offset_text(off), st.times(), offsets)
timestamps = st.datetimes().map(lambda d: d.isoformat(sep=" "))
# Years 2-9998 only: printed in a session zone up to 15:59:59 away, the year stays within
# Python's 1-9999 (values.py refuses the rest on purpose; that is tested in the unit tests).
timestamptzs = st.builds(
    lambda d, off: d.isoformat(sep=" ") + offset_text(off),
    st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31, 23, 59, 59)),
    offsets,
)
int4s = st.integers(-INT32 - 1, INT32)
bytea_values = st.one_of(
    st.just(bytes(range(256))),
    st.permutations(range(256)).map(bytes),
    st.binary(max_size=300),
)
ENUM_LABELS = ("sad", "ok", "happy", 'with "quotes", commas', "back\\slash", "ünïcødé 💍", "NULL")


# --- comparisons: (decoded value, reference values) -> assertion ---------------------------


def check_int(decoded: object, ref: int) -> None:
    assert type(decoded) is int
    assert decoded == ref


def check_decimal(decoded: object, ref: Decimal) -> None:
    # str() of a Decimal keeps its exact digits and exponent, so '1.50' != '1.5' and NaN equals
    # NaN; Postgres's numeric has a display scale that an exact decoder must keep.
    assert isinstance(decoded, Decimal)
    assert decoded.is_nan() == ref.is_nan()
    assert str(decoded) == str(ref)


def check_float8(decoded: object, ref: float) -> None:
    assert type(decoded) is float
    if math.isnan(ref):
        assert math.isnan(decoded)
    else:
        assert decoded == ref
        assert math.copysign(1, decoded) == math.copysign(1, ref)  # -0 stays -0


def check_float4(decoded: object, ref: float) -> None:
    # The decoder parses float4's shortest text ('1.1') as a Python float, the double nearest to
    # that decimal; psycopg's binary value is the float4 widened exactly (1.100000023841858).
    # Both stand for the same float4, so they are compared as float4.
    assert type(decoded) is float
    if math.isnan(ref):
        assert math.isnan(decoded)
    else:
        assert struct.pack(">f", decoded) == struct.pack(">f", ref)


def check_exact(kind: type) -> Callable[[object, object], None]:
    def check(decoded: object, ref: object) -> None:
        assert type(decoded) is kind
        assert decoded == ref

    return check


def check_infinite_or(kind: type) -> Callable[[object, object, str], None]:
    """date/timestamp: psycopg cannot load 'infinity', so the finite value is selected with
    `CASE WHEN isfinite(...)` and the infinite ones are recognised by their text."""

    def check(decoded: object, finite: object, text: str) -> None:
        if text in SPECIAL:
            assert finite is None
            assert decoded is Infinity(text)
        else:
            assert type(decoded) is kind
            assert decoded == finite
            if isinstance(decoded, datetime):
                assert decoded.tzinfo is None  # timestamp (without time zone) stays naive

    return check


def check_timestamptz(decoded: object, epoch: Decimal | None, offset: Decimal | None) -> None:
    """`extract(epoch)` is the exact instant (numeric, microseconds included) and
    `extract(timezone)` the offset, in seconds, that the session's zone has at that instant:
    the decoded value must be that instant, aware, with that very offset."""
    assert epoch is not None
    if epoch.is_infinite():
        assert decoded is (Infinity.POSITIVE if epoch > 0 else Infinity.NEGATIVE)
        return
    assert isinstance(decoded, datetime)
    assert decoded.tzinfo is not None
    assert (decoded - UNIX_EPOCH) // MICROSECOND == epoch * 1_000_000
    assert offset is not None
    assert decoded.utcoffset() == timedelta(seconds=int(offset))


def check_timetz(decoded: object, local: time, offset: Decimal) -> None:
    # Aware `time`s compare as instants in Python (12:00+01 == 11:00+00), but timetz keeps its
    # zone, so the local time (`::time`) and the offset (`extract(timezone)`) are compared.
    assert isinstance(decoded, time)
    assert decoded.tzinfo is not None
    assert decoded.replace(tzinfo=None) == local
    assert decoded.utcoffset() == timedelta(seconds=int(offset))


def check_interval(decoded: object, text: str, fields: list[Decimal] | None) -> None:
    # psycopg makes a timedelta, which has no months; instead Postgres extracts the three
    # fields it stores: months = year * 12 + month, days = day, and the time part as
    # hour * 3600e6 + minute * 60e6 + microsecond (microsecond includes the seconds).
    if text in SPECIAL:
        assert decoded is Infinity(text)
        return
    assert fields is not None
    assert type(decoded) is Interval
    assert decoded == Interval(*(int(f) for f in fields))


def check_text(decoded: object, ref: str) -> None:
    assert type(decoded) is str
    assert decoded == ref


def check_list(element: Callable[..., None]) -> Callable[[object, object], None]:
    """Same shape and NULLs at the same places; non-NULL elements compared by `element`."""

    def check(decoded: object, ref: object) -> None:
        assert isinstance(decoded, list)
        assert isinstance(ref, list)
        assert len(decoded) == len(ref)
        for got, want in zip(decoded, ref, strict=True):
            if want is None:
                assert got is None
            elif isinstance(want, list):
                check(got, want)
            else:
                element(got, want)

    return check


def check_timestamptz_array(
    decoded: object, epochs: list[Decimal | None], offsets: list[Decimal | None]
) -> None:
    """Element by element like the scalar column (a NULL element has a NULL epoch)."""
    assert isinstance(decoded, list)
    assert len(decoded) == len(epochs)
    for got, epoch, offset in zip(decoded, epochs, offsets, strict=True):
        if epoch is None:
            assert got is None
        else:
            check_timestamptz(got, epoch, offset)


# --- the table: one column per type -------------------------------------------------------


@dataclass(frozen=True)
class Col:
    name: str
    sql_type: str
    values: st.SearchStrategy[Any]
    check: Callable[..., None]
    refs: tuple[str, ...] = ("{c}",)  # reference expressions; {c} is the column


def col(
    name: str,
    sql_type: str,
    values: st.SearchStrategy[Any],
    check: Callable[..., None],
    *refs: str,
) -> Col:
    return Col(name, sql_type, values, check, refs or ("{c}",))


INTERVAL_FIELDS = (
    "CASE WHEN {c}::text IN ('infinity', '-infinity') THEN NULL ELSE ARRAY["
    "extract(year FROM {c}) * 12 + extract(month FROM {c}), extract(day FROM {c}), "
    "extract(hour FROM {c}) * 3600000000 + extract(minute FROM {c}) * 60000000 "
    "+ extract(microsecond FROM {c})] END"
)
TIMESTAMPTZ_ELEMENTS = (
    "CASE WHEN {{c}} IS NOT NULL THEN ARRAY(SELECT extract({part} FROM e) "
    "FROM unnest({{c}}) WITH ORDINALITY AS u(e, n) ORDER BY n) END"
)

COLUMNS: tuple[Col, ...] = (
    col("c_int2", "int2", st.integers(-INT16 - 1, INT16), check_int),
    col("c_int4", "int4", int4s, check_int),
    col("c_int8", "int8", st.integers(-INT64 - 1, INT64), check_int),
    # psycopg's binary numeric keeps the display scale, NaN and +-Infinity.
    col("c_numeric", "numeric", numeric_text(), check_decimal),
    # float4 values are exact as float4, so the float8 parameter casts without rounding.
    col("c_float4", "float4", st.floats(width=32), check_float4),
    col("c_float8", "float8", st.floats(), check_float8),
    col("c_text", "text", texts(200), check_text),
    col("c_varchar", "varchar(50)", texts(50), check_text),
    # bpchar is padded with spaces to its length, in the decoder and in psycopg alike.
    col("c_bpchar", "bpchar(5)", texts(5), check_text),
    col("c_uuid", "uuid", st.uuids(), check_exact(UUID)),
    col("c_bool", "bool", st.booleans(), check_exact(bool)),
    col(
        "c_date", "date", st.one_of(st.sampled_from(SPECIAL), dates), check_infinite_or(date),
        "CASE WHEN isfinite({c}) THEN {c} END", "{c}::text",
    ),
    # time has no zone and psycopg's binary time is exact to the microsecond.
    col("c_time", "time", times, check_exact(time)),
    col("c_timetz", "timetz", timetzs, check_timetz, "{c}::time", "extract(timezone FROM {c})"),
    col(
        "c_timestamp", "timestamp", st.one_of(st.sampled_from(SPECIAL), timestamps),
        check_infinite_or(datetime), "CASE WHEN isfinite({c}) THEN {c} END", "{c}::text",
    ),
    col(
        "c_timestamptz", "timestamptz", st.one_of(st.sampled_from(SPECIAL), timestamptzs),
        check_timestamptz, "extract(epoch FROM {c})", "extract(timezone FROM {c})",
    ),
    col("c_interval", "interval", intervals(), check_interval, "{c}::text", INTERVAL_FIELDS),
    # json and jsonb stay the text Postgres prints (values.py), so `::text` is the reference;
    # for json that is the input verbatim: whitespace and duplicate keys included.
    col("c_json", "json", json_texts(), check_text, "{c}::text"),
    col("c_jsonb", "jsonb", json_texts(), check_text, "{c}::text"),
    col("c_bytea", "bytea", bytea_values, check_exact(bytes)),
    col(
        "c_int4_array", "int4[]", st.lists(nullable(int4s), max_size=8).map(array_literal),
        check_list(check_int),
    ),
    col(
        "c_text_array", "text[]", st.lists(nullable(texts(20)), max_size=6).map(array_literal),
        check_list(check_text),
    ),
    col(
        "c_numeric_array", "numeric[]",
        st.lists(nullable(numeric_text(max_exponent=60)), max_size=6).map(array_literal),
        check_list(check_decimal),
    ),
    # The epochs and the offsets of the elements, extracted like for the scalar column.
    col(
        "c_timestamptz_array", "timestamptz[]",
        st.lists(
            nullable(st.one_of(st.sampled_from(SPECIAL), timestamptzs)), max_size=5
        ).map(array_literal),
        check_timestamptz_array,
        TIMESTAMPTZ_ELEMENTS.format(part="epoch"),
        TIMESTAMPTZ_ELEMENTS.format(part="timezone"),
    ),
    # Each element's text, like the scalar jsonb column.
    col(
        "c_jsonb_array", "jsonb[]",
        st.lists(nullable(json_texts()), max_size=4).map(array_literal),
        check_list(check_text), "{c}::text[]",
    ),
    col(
        "c_int4_matrix", "int4[][]",
        st.integers(1, 4).flatmap(
            lambda width: st.lists(
                st.lists(nullable(int4s), min_size=width, max_size=width), max_size=4
            )
        ).map(array_literal),
        check_list(check_int),
    ),
    # Labels come back as the label text (psycopg knows nothing of the enum, `::text` does).
    col("c_mood", "mood", st.sampled_from(ENUM_LABELS), check_text, "{c}::text"),
    # The domain decodes as its base type; `::numeric` makes psycopg load it as numeric too.
    col(
        "c_price", "price",
        st.one_of(
            st.just(Decimal("NaN")),
            st.decimals(min_value=0, max_value=Decimal("9999999999.99"), places=2),
        ).map(str),
        check_decimal, "{c}::numeric",
    ),
)

NAMES = tuple(c.name for c in COLUMNS)
INSERT_SQL = "INSERT INTO wide (id, {}) VALUES (%s, {})".format(
    ", ".join(NAMES), ", ".join(f"%s::{c.sql_type}" for c in COLUMNS)
)
# Per column: `IS NULL`, then its reference expressions.
REFERENCE_SQL = "SELECT {} FROM wide WHERE id = %s".format(
    ", ".join(
        expr.format(c=c.name)
        for c in COLUMNS
        for expr in ("{c} IS NULL", *c.refs)
    )
)


# --- replication through SQL ---------------------------------------------------------------


@dataclass
class Slot:
    """A pgoutput slot read with `pg_logical_slot_get_binary_changes` on one connection."""

    conn: psycopg.Connection[Any]
    name: str
    publication: str
    registry: TypeRegistry = field(default_factory=TypeRegistry)
    decoder: Decoder = field(default_factory=Decoder)
    relations: dict[int, Relation] = field(default_factory=dict)

    @classmethod
    def create(cls, conn: psycopg.Connection[Any], table: str) -> Slot:
        slot = cls(conn, f"{table}_slot", f"{table}_pub")
        conn.execute(f"CREATE PUBLICATION {slot.publication} FOR TABLE {table}")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot.name,))
        return slot

    def changes(self) -> list[PgOutputMessage]:
        rows = self.conn.execute(
            "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s)",
            (self.name, self.publication),
        ).fetchall()
        messages = [self.decoder.decode(data) for (data,) in rows]
        for message in messages:
            if isinstance(message, Relation):
                self.relations[message.oid] = message
            elif isinstance(message, Type):
                self.registry.observe(message)
        return messages

    def row_decoder(self, relation_oid: int) -> RowDecoder:
        return RowDecoder.from_relation(self.relations[relation_oid], self.registry)


def pin_walsender_settings(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET DateStyle = 'ISO, MDY'")
    conn.execute("SET IntervalStyle = 'postgres'")
    conn.execute("SET bytea_output = 'hex'")
    conn.execute("SET extra_float_digits = 1")


@dataclass
class Wide:
    slot: Slot
    server_version: int
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))


@pytest.fixture
def wide(pg_dsn: str) -> Iterator[Wide]:
    labels = ", ".join("'" + label.replace("'", "''") + "'" for label in ENUM_LABELS)
    columns = ", ".join(f"{c.name} {c.sql_type}" for c in COLUMNS)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pin_walsender_settings(conn)
        conn.execute(f"CREATE TYPE mood AS ENUM ({labels})")
        conn.execute("CREATE DOMAIN price AS numeric(12,2) CHECK (VALUE >= 0)")
        conn.execute(f"CREATE TABLE wide (id int PRIMARY KEY, {columns})")
        slot = Slot.create(conn, "wide")
        catalog = conn.execute(
            "SELECT oid::int, typname::text, typtype::text, typcategory::text, "
            "typbasetype::int, typelem::int FROM pg_type WHERE typname IN "
            "('mood', '_mood', 'price', '_price')"
        ).fetchall()
        assert len(catalog) == 4
        for row in catalog:
            assert slot.registry.register_catalog_type(*row)
        yield Wide(slot, conn.info.server_version)


ALL_NULL: dict[str, object] = dict.fromkeys(NAMES)
EDGES: dict[str, object] = {
    "c_int2": -32768,
    "c_int4": INT32,
    "c_int8": -INT64 - 1,
    "c_numeric": "-0.000000000000000000000000000001",
    "c_float4": float("nan"),
    "c_float8": -math.inf,
    "c_text": 'He said "{a,b}" \\ NULL \'ok\' 💍',
    "c_varchar": "",
    "c_bpchar": "ab",
    "c_uuid": UUID(int=0),
    "c_bool": False,
    "c_date": "-infinity",
    "c_time": "23:59:59.999999",
    "c_timetz": "00:00:00-15:59:59",
    "c_timestamp": "infinity",
    "c_timestamptz": "1900-01-01 00:00:00+00",
    "c_interval": "-1 years -2 mons +3 days -04:05:06.000789",
    "c_json": ' {"a" : 1, "a":[1.50, "x\\"y"],  "b" :{}}\n',
    "c_jsonb": '{"a": 1, "a": 2, "n": 1e+300, "s": "\\u00e9\\n"}',
    "c_bytea": bytes(range(256)),
    "c_int4_array": "{}",
    "c_text_array": '{"NULL",NULL,"","a\\"b","c\\\\d","{x,y}"," ","é"}',
    "c_numeric_array": "{NaN,Infinity,-Infinity,NULL,1.500,1e-30}",
    "c_timestamptz_array": '{infinity,NULL,"2024-02-29 23:59:59.999999+05:45",-infinity}',
    "c_jsonb_array": '{"{\\"a\\": [1, null]}",NULL,"\\"NULL\\""}',
    "c_int4_matrix": "{{1,NULL},{NULL,-2147483648}}",
    "c_mood": 'with "quotes", commas',
    "c_price": "0.00",
}


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
    row=st.fixed_dictionaries({c.name: nullable(c.values) for c in COLUMNS}),
    zone=st.sampled_from(TIME_ZONES),
)
@example(row=ALL_NULL, zone="UTC")
@example(row=EDGES, zone="Africa/Monrovia")  # 1900 prints as 23:16:52-00:43:08
@example(row=EDGES, zone="Pacific/Chatham")
def test_decoded_values_equal_what_postgres_returns(
    wide: Wide, row: dict[str, object], zone: str
) -> None:
    row = dict(row)
    if wide.server_version < 170000 and row["c_interval"] in SPECIAL:
        row["c_interval"] = None  # infinite intervals exist from Postgres 17 on
    conn, slot = wide.slot.conn, wide.slot
    conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
    row_id = next(wide.ids)
    conn.execute(INSERT_SQL, (row_id, *(row[name] for name in NAMES)))

    inserts = [m for m in slot.changes() if isinstance(m, Insert)]
    assert len(inserts) == 1
    relation = slot.relations[inserts[0].relation_oid]
    assert [c.name for c in relation.columns] == ["id", *NAMES]
    decoded = slot.row_decoder(relation.oid).decode(inserts[0].new)

    with conn.cursor(binary=True) as cur:
        reference = cur.execute(REFERENCE_SQL, (row_id,)).fetchone()
    assert reference is not None
    assert decoded[0] == row_id
    refs = iter(reference)
    for column, value in zip(COLUMNS, decoded[1:], strict=True):
        is_null = next(refs)
        wanted = [next(refs) for _ in column.refs]
        context = f"{column.name} ({column.sql_type}) inserted as {row[column.name]!r}"
        if is_null:
            assert value is None, context
            continue
        try:
            column.check(value, *wanted)
        except AssertionError as exc:
            raise AssertionError(f"{context}: decoded {value!r}, Postgres {wanted!r}") from exc


def test_unchanged_toasted_value_decodes_as_the_marker(pg_dsn: str) -> None:
    """An UPDATE that leaves an out-of-line TOASTed value alone does not send it: the decoded
    column is the UNCHANGED marker, never a value (not even an empty one)."""
    body = "".join(random.Random(20240629).choices(string.printable + "éü💍", k=100_000))
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pin_walsender_settings(conn)
        conn.execute("CREATE TABLE letter (id int PRIMARY KEY, version int NOT NULL, body text)")
        conn.execute("ALTER TABLE letter ALTER COLUMN body SET STORAGE EXTERNAL")
        slot = Slot.create(conn, "letter")
        conn.execute("INSERT INTO letter VALUES (1, 1, %s)", (body,))
        # The value really is out of line: its chunks are in the table's TOAST relation.
        toast = conn.execute(
            "SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'letter'::regclass"
        ).fetchone()
        assert toast is not None
        chunks = conn.execute(f"SELECT count(*) FROM {toast[0]}").fetchone()
        assert chunks is not None and chunks[0] > 0
        conn.execute("UPDATE letter SET version = 2 WHERE id = 1")
        conn.execute("UPDATE letter SET version = 3, body = body || '!' WHERE id = 1")

        messages = slot.changes()
    rows = [m for m in messages if isinstance(m, Insert | Update)]
    assert [type(m) for m in rows] == [Insert, Update, Update]
    decode = slot.row_decoder(rows[0].relation_oid).decode

    assert decode(rows[0].new) == (1, 1, body)
    untouched = decode(rows[1].new)
    assert untouched[:2] == (1, 2)
    assert untouched[2] is UNCHANGED
    assert not isinstance(untouched[2], str | bytes)
    assert decode(rows[2].new) == (1, 3, body + "!")
