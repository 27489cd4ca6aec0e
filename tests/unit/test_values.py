"""Text-form conversion. Inputs are what Postgres 15 prints with the walsender defaults."""

import math
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.source.pgoutput import UNCHANGED, Binary, Column, Relation, Type
from replicator.source.values import (
    ARRAY_ELEMENTS,
    Infinity,
    Interval,
    RowDecoder,
    TypeRegistry,
    UnknownTypeError,
    ValueConversionError,
    decode_row,
    parse_array,
)

BOOL, BYTEA, INT8, INT2, INT4, TEXT, OID = 16, 17, 20, 21, 23, 25, 26
JSON, FLOAT4, FLOAT8, BPCHAR, VARCHAR, NAME = 114, 700, 701, 1042, 1043, 19
DATE, TIME, TIMESTAMP, TIMESTAMPTZ, INTERVAL, TIMETZ = 1082, 1083, 1114, 1184, 1186, 1266
NUMERIC, UUID_OID, JSONB = 1700, 2950, 3802


def convert(oid: int, text: bytes, registry: TypeRegistry | None = None) -> object:
    return (registry or TypeRegistry()).converter(oid)(text)


def tz(hours: int, minutes: int = 0) -> timezone:
    return timezone(timedelta(hours=hours, minutes=minutes))


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (INT2, b"-32768", -32768),
        (INT4, b"2147483647", 2147483647),
        (INT8, b"-9223372036854775808", -9223372036854775808),
        (OID, b"4294967295", 4294967295),
        (FLOAT8, b"1.5", 1.5),
        (FLOAT8, b"-Infinity", -math.inf),
        (FLOAT8, b"Infinity", math.inf),
        (FLOAT8, b"1e+308", 1e308),
        (FLOAT4, b"1.1", 1.1),
        (NUMERIC, b"0.000000000000000000000000000001", Decimal("1E-30")),
        (
            NUMERIC,
            b"12345678901234567890.123456789012345678901",
            Decimal("12345678901234567890.123456789012345678901"),
        ),
        (NUMERIC, b"Infinity", Decimal("Infinity")),
        (NUMERIC, b"-Infinity", Decimal("-Infinity")),
        (TEXT, "Zoë & Maëlle 💍".encode(), "Zoë & Maëlle 💍"),
        (VARCHAR, b"", ""),
        (BPCHAR, b"ab ", "ab "),
        (NAME, b"weddings", "weddings"),
        (BOOL, b"t", True),
        (BOOL, b"f", False),
        (
            UUID_OID,
            b"2cf9f1b6-5e8b-461a-b4c3-559ba27c7d10",
            UUID("2cf9f1b65e8b461ab4c3559ba27c7d10"),
        ),
        (BYTEA, b"\\x0aff00", b"\n\xff\x00"),
        (BYTEA, b"\\x", b""),
        (JSON, b'{"b": 1.0, "a": 2, "a": 3}', '{"b": 1.0, "a": 2, "a": 3}'),
        (JSONB, b'{"a": 1.10}', '{"a": 1.10}'),
        (DATE, b"2024-05-01", date(2024, 5, 1)),
        (DATE, b"0001-01-01", date(1, 1, 1)),
        (DATE, b"infinity", Infinity.POSITIVE),
        (DATE, b"-infinity", Infinity.NEGATIVE),
        (TIME, b"12:00:01.5", time(12, 0, 1, 500000)),
        (TIME, b"00:00:00", time(0, 0)),
        (TIMETZ, b"12:00:00+05:30", time(12, 0, tzinfo=tz(5, 30))),
        (TIMETZ, b"23:59:59.999999-08", time(23, 59, 59, 999999, tzinfo=tz(-8))),
        (TIMESTAMP, b"2024-05-01 12:00:00", datetime(2024, 5, 1, 12)),
        (TIMESTAMP, b"2024-05-01 12:00:00.000123", datetime(2024, 5, 1, 12, 0, 0, 123)),
        (TIMESTAMP, b"infinity", Infinity.POSITIVE),
        (
            TIMESTAMPTZ,
            b"2024-05-01 12:00:00.123456+02",
            datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=tz(0)),
        ),
        (TIMESTAMPTZ, b"2024-05-01 15:30:00+05:30", datetime(2024, 5, 1, 10, tzinfo=tz(0))),
        (TIMESTAMPTZ, b"2024-05-01 10:00:00+00", datetime(2024, 5, 1, 10, tzinfo=tz(0))),
        (TIMESTAMPTZ, b"-infinity", Infinity.NEGATIVE),
    ],
)
def test_scalar_types(oid: int, text: bytes, expected: object) -> None:
    value = convert(oid, text)
    assert value == expected
    assert type(value) is type(expected)


def test_nan_stays_nan() -> None:
    assert math.isnan(convert(FLOAT8, b"NaN"))  # type: ignore[arg-type]
    assert math.isnan(convert(FLOAT4, b"NaN"))  # type: ignore[arg-type]
    assert convert(NUMERIC, b"NaN").is_nan()  # type: ignore[attr-defined]


def test_numeric_is_exact_at_any_precision() -> None:
    value = convert(NUMERIC, b"0.000000000000000000000000000001")
    assert value == Decimal(1).scaleb(-30)
    assert value * 10**30 == 1  # type: ignore[operator]


def test_timestamptz_keeps_the_offset_the_server_printed() -> None:
    value = convert(TIMESTAMPTZ, b"2024-05-01 12:00:00.123456+05:30")
    assert isinstance(value, datetime)
    assert value.utcoffset() == timedelta(hours=5, minutes=30)
    assert value == datetime(2024, 5, 1, 6, 30, 0, 123456, tzinfo=tz(0))
    historical = convert(TIMESTAMPTZ, b"1900-01-01 00:00:00+00:19:32")
    assert isinstance(historical, datetime)
    assert historical.utcoffset() == timedelta(minutes=19, seconds=32)


def test_timestamp_is_naive() -> None:
    value = convert(TIMESTAMP, b"2024-05-01 12:00:00")
    assert isinstance(value, datetime)
    assert value.tzinfo is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"00:00:00", Interval(0, 0, 0)),
        (b"-00:00:01", Interval(0, 0, -1_000_000)),
        (b"-00:00:00.000001", Interval(0, 0, -1)),
        (b"1 year 2 mons 3 days 04:05:06.789", Interval(14, 3, 14_706_789_000)),
        (b"-1 years -2 mons +3 days -04:05:06", Interval(-14, 3, -14_706_000_000)),
        (b"-1 years -2 mons +1 day", Interval(-14, 1, 0)),
        (b"1 day -00:00:01", Interval(0, 1, -1_000_000)),
        (b"-3 days", Interval(0, -3, 0)),
        (b"1 mon", Interval(1, 0, 0)),
        (b"2 years", Interval(24, 0, 0)),
        (b"-3 days +02:00:00", Interval(0, -3, 7_200_000_000)),
        (b"1000000:00:00", Interval(0, 0, 3_600_000_000_000_000)),
        (b"infinity", Infinity.POSITIVE),
        (b"-infinity", Infinity.NEGATIVE),
    ],
)
def test_interval_in_postgres_style(text: bytes, expected: object) -> None:
    assert convert(INTERVAL, text) == expected


@pytest.mark.parametrize(
    ("oid", "text", "problem"),
    [
        (DATE, b"0044-03-15 BC", "BC date"),
        (DATE, b"10000-01-01", "years 1-9999"),
        (TIMESTAMPTZ, b"0044-03-15 12:00:00+00 BC", "BC timestamp"),
        (TIME, b"24:00:00", "24:00:00"),
        (INTERVAL, b"P1Y2M", "IntervalStyle"),
        (INTERVAL, b"", "IntervalStyle"),
        (BYTEA, b"\\001abc", "hex format"),
        (BOOL, b"true", "'t' or 'f'"),
    ],
)
def test_values_python_cannot_hold_raise_a_clear_error(oid: int, text: bytes, problem: str) -> None:
    columns = [Column(False, "when", oid, -1)]
    with pytest.raises(ValueConversionError, match=r"public\.weddings\.when") as info:
        decode_row(columns, (text,), TypeRegistry(), table="public.weddings")
    assert problem in str(info.value)
    assert info.value.type_oid == oid


def test_error_messages_never_contain_the_value() -> None:
    secret = b"not-a-number-but-personal-data"
    columns = [Column(False, "guests", INT4, -1)]
    with pytest.raises(ValueConversionError) as info:
        decode_row(columns, (secret,), TypeRegistry(), table="public.weddings")
    message = str(info.value)
    assert "personal" not in message
    assert "public.weddings.guests" in message
    assert f"{len(secret)} bytes" in message


@pytest.mark.parametrize(
    ("oid", "text", "expected"),
    [
        (
            1009,
            b'{"a\\"b","c\\\\d",NULL,"NULL","","x y","{}","a,b","\xc3\xa9 \xc3\xbc"}',
            ['a"b', "c\\d", None, "NULL", "", "x y", "{}", "a,b", "é ü"],
        ),
        (1007, b"{{1,2},{3,NULL}}", [[1, 2], [3, None]]),
        (1016, b"{{{1}},{{2}}}", [[[1]], [[2]]]),
        (1007, b"{}", []),
        (1005, b"{-1,32767}", [-1, 32767]),
        (1022, b"{1.5,-Infinity}", [1.5, -math.inf]),
        (1000, b"{t,f,NULL}", [True, False, None]),
        (1015, b'{"a\\\\b","q\\""}', ["a\\b", 'q"']),
        (1014, b'{"ab "}', ["ab "]),
        (
            2951,
            b"{2cf9f1b6-5e8b-461a-b4c3-559ba27c7d10}",
            [UUID(int=0x2CF9F1B65E8B461AB4C3559BA27C7D10)],
        ),
        (1182, b"{infinity,2024-01-01}", [Infinity.POSITIVE, date(2024, 1, 1)]),
        (
            1185,
            b'{"2024-05-01 06:30:00+00","2024-05-01 12:00:00+05:30"}',
            [datetime(2024, 5, 1, 6, 30, tzinfo=tz(0))] * 2,
        ),
        (3807, b'{"{\\"a\\": 1}",NULL}', ['{"a": 1}', None]),
        (1001, b'{"\\\\x0aff","\\\\x"}', [b"\n\xff", b""]),
        (1187, b'{"1 day",NULL}', [Interval(0, 1, 0), None]),
    ],
)
def test_arrays(oid: int, text: bytes, expected: object) -> None:
    assert convert(oid, text) == expected


def test_numeric_arrays_stay_exact() -> None:
    value = convert(1231, b"{1.5,NaN,0.000000000000000000000000000001,-Infinity}")
    assert isinstance(value, list)
    assert all(type(item) is Decimal for item in value)
    assert [str(item) for item in value] == ["1.5", "NaN", "1E-30", "-Infinity"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b"[0:1]={1,2}", "lower bounds"),
        (b"1,2", "start with '{'"),
        (b"{1,2", "expected ',' or '}'"),
        (b"{1,2}}", "after the array's closing brace"),
        (b'{"abc}', "unterminated"),
        (b"{1,,2}", "malformed array element"),
    ],
)
def test_malformed_arrays(text: bytes, problem: str) -> None:
    columns = [Column(False, "seats", 1007, -1)]
    with pytest.raises(ValueConversionError, match=r"public\.tables\.seats") as info:
        decode_row(columns, (text,), TypeRegistry(), table="public.tables")
    assert problem in str(info.value)


def test_every_builtin_array_maps_to_a_convertible_element() -> None:
    registry = TypeRegistry()
    for array_oid, element_oid in ARRAY_ELEMENTS.items():
        registry.converter(element_oid)  # raises if the element type has no converter
        assert registry.converter(array_oid)(b"{}") == []


def format_array(value: object) -> str:
    """A small array_out: quotes every string element, escaping backslash and quote."""
    if isinstance(value, list):
        return "{" + ",".join(format_array(item) for item in value) + "}"
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    assert isinstance(value, str)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rectangular(elements: st.SearchStrategy[object]) -> st.SearchStrategy[list[object]]:
    """Postgres arrays are rectangular: every sub-array of one level has the same length."""

    def build(shape: list[int]) -> st.SearchStrategy[list[object]]:
        if len(shape) == 1:
            return st.lists(elements, min_size=shape[0], max_size=shape[0])
        inner = build(shape[1:])
        return st.lists(inner, min_size=shape[0], max_size=shape[0])

    return st.lists(st.integers(1, 4), min_size=1, max_size=3).flatmap(build)


postgres_text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))


@given(rectangular(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))))
def test_int_arrays_round_trip(value: list[object]) -> None:
    assert convert(1016, format_array(value).encode()) == value


@given(rectangular(st.one_of(st.none(), postgres_text)))
def test_text_arrays_round_trip(value: list[object]) -> None:
    assert convert(1009, format_array(value).encode()) == value


@given(st.lists(st.one_of(st.none(), postgres_text), max_size=8))
def test_bare_elements_as_array_out_writes_them(value: list[str | None]) -> None:
    # array_out leaves elements unquoted unless they need it; the parser must read both forms.
    def element(item: str | None) -> str:
        if item is None:
            return "NULL"
        needs_quotes = (
            item == ""
            or item.upper() == "NULL"
            or any(c in item for c in '{},"\\')
            or any(c in " \t\n\r\v\f" for c in item)  # array_isspace: ASCII only
        )
        return format_array(item) if needs_quotes else item

    text = "{" + ",".join(element(item) for item in value) + "}"
    assert parse_array(text.encode(), bytes.decode) == value


def test_registry_enums_domains_arrays_and_text_types() -> None:
    registry = TypeRegistry()
    registry.register_enum(16500, "public.vibe")
    registry.register_domain(16510, NUMERIC, "public.money_eur")
    registry.register_domain(16511, 16510, "public.positive_eur")
    registry.register_array(16520, 16500, "public._vibe")
    registry.register_text(16530, "public.citext")
    assert registry.converter(16500)(b"rustic") == "rustic"
    assert registry.converter(16511)(b"12.30") == Decimal("12.30")
    assert registry.converter(16520)(b'{rustic,"boho chic"}') == ["rustic", "boho chic"]
    assert registry.converter(16530)(b"Ana") == "Ana"


def test_registry_from_catalog_rows() -> None:
    registry = TypeRegistry()
    assert registry.register_catalog_type(16600, "vibe", "e", "E", 0, 0)
    assert registry.register_catalog_type(16601, "_vibe", "b", "A", 0, 16600)
    assert registry.register_catalog_type(16602, "guest_count", "d", "N", INT4, 0)
    assert registry.register_catalog_type(16603, "citext", "b", "S", 0, 0)
    assert not registry.register_catalog_type(16604, "daterange", "r", "R", 0, 0)
    assert registry.converter(16601)(b"{a,NULL}") == ["a", None]
    assert registry.converter(16602)(b"120") == 120
    with pytest.raises(UnknownTypeError):
        registry.converter(16604)


def test_builtin_types_cannot_be_re_registered() -> None:
    with pytest.raises(ValueError, match="built into Postgres"):
        TypeRegistry().register_text(INT4)


def test_unknown_type_names_oid_table_and_column() -> None:
    registry = TypeRegistry()
    registry.observe(Type(16700, "public", "mood"))
    with pytest.raises(UnknownTypeError) as info:
        registry.converter(16700, table="public.weddings", column="vibe")
    message = str(info.value)
    assert "16700" in message
    assert "public.mood" in message
    assert "public.weddings.vibe" in message
    assert (info.value.type_oid, info.value.table, info.value.column) == (
        16700,
        "public.weddings",
        "vibe",
    )


def test_domain_cycles_are_unknown_not_infinite() -> None:
    registry = TypeRegistry()
    registry.register_domain(16800, 16801)
    registry.register_domain(16801, 16800)
    with pytest.raises(UnknownTypeError, match="16800"):
        registry.converter(16800)


RELATION = Relation(
    16384,
    "public",
    "guests",
    "d",
    (
        Column(True, "id", INT8, -1),
        Column(False, "name", TEXT, -1),
        Column(False, "rsvp", BOOL, -1),
        Column(False, "notes", TEXT, -1),
        Column(False, "vibe", 16500, -1),
    ),
)


def test_row_decoder_keeps_null_and_unchanged_as_they_are() -> None:
    registry = TypeRegistry()
    registry.register_enum(16500)
    decoder = RowDecoder.from_relation(RELATION, registry)
    assert decoder.table == "public.guests"
    assert decoder.names == ("id", "name", "rsvp", "notes", "vibe")
    row = decoder.decode((b"7", b"Ana", None, UNCHANGED, b"boho"))
    assert row == (7, "Ana", None, UNCHANGED, "boho")
    assert row[3] is UNCHANGED


def test_row_decoder_refuses_unknown_types_when_built() -> None:
    with pytest.raises(UnknownTypeError, match=r"public\.guests\.vibe"):
        RowDecoder.from_relation(RELATION, TypeRegistry())


def test_row_decoder_refuses_rows_of_the_wrong_width() -> None:
    registry = TypeRegistry()
    registry.register_enum(16500)
    with pytest.raises(ValueConversionError, match="row has 2 values"):
        RowDecoder.from_relation(RELATION, registry).decode((b"1", b"Ana"))


def test_row_decoder_refuses_binary_values() -> None:
    columns = [Column(False, "id", INT4, -1)]
    with pytest.raises(ValueConversionError, match="binary-format"):
        decode_row(columns, (Binary(b"\x00\x00\x00\x01"),), TypeRegistry(), table="t")
