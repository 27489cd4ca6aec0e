"""`replicator.archive.render`: archived Value datums as Postgres input text, COPY lines, JSON
values and order-independent table hashes.

Expected texts are written out literally, so a changed rendering fails here. Where Postgres's
own parsing is the real oracle the integration test (`test_replay_types.py`) COPYs into a real
server; here the capture's parsers (`replicator.source.values`, `snapshot.parse_copy_line`)
stand in for it in round-trip properties.
"""

from __future__ import annotations

import itertools
import json
import math
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.archive.render import (
    TableHash,
    copy_line,
    json_value,
    row_digest,
    text,
    utc_text,
)
from replicator.source.snapshot import parse_copy_line
from replicator.source.values import BUILTIN_CONVERTERS, Infinity, Interval, parse_array
from replicator.transport.avro import (
    ARRAY,
    DATE,
    INTERVAL,
    JSON,
    NUMERIC,
    TIME,
    TIMESTAMP,
    TIMESTAMPTZ,
    TIMETZ,
    UUID_,
    archived_values,
)

INT_MAX, INT_MIN = 2**31 - 1, -(2**31)
LONG_MAX, LONG_MIN = 2**63 - 1, -(2**63)
US = 1_000_000
HOUR_US = 3600 * US
DAY_US = 24 * HOUR_US


def arr(*items: Any) -> tuple[str, dict[str, Any]]:
    return (ARRAY, {"items": list(items)})


def ts(micros: int) -> tuple[str, dict[str, int]]:
    return (TIMESTAMP, {"micros": micros})


def tstz(micros: int) -> tuple[str, dict[str, int]]:
    return (TIMESTAMPTZ, {"micros": micros})


def day(days: int) -> tuple[str, dict[str, int]]:
    return (DATE, {"days": days})


def interval(months: int, days: int, micros: int) -> tuple[str, dict[str, int]]:
    return (INTERVAL, {"months": months, "days": days, "micros": micros})


def timetz(micros: int, offset_s: int) -> tuple[str, dict[str, int]]:
    return (TIMETZ, {"micros": micros, "offset_s": offset_s})


def clock(h: int, m: int = 0, s: int = 0, us: int = 0) -> int:
    return ((h * 60 + m) * 60 + s) * US + us


# --- copy_line -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ("plain", "plain"),
        ("", ""),
        ("back\\slash", "back\\\\slash"),
        ("tab\there", "tab\\there"),
        ("new\nline", "new\\nline"),
        ("carriage\rreturn", "carriage\\rreturn"),
        ("\r\n", "\\r\\n"),
        ("\\N", "\\\\N"),  # the text `\N` is not NULL
        ("\\.", "\\\\."),  # nor the end-of-data marker
        ("\\\t\\", "\\\\\\t\\\\"),
        ("vt\x0bff\x0cbs\x08", "vt\x0bff\x0cbs\x08"),  # COPY reads these raw
        ("NULL", "NULL"),
        ("ünïcødé 💍\u2028", "ünïcødé 💍\u2028"),
        (None, "\\N"),
    ],
)
def test_copy_line_escapes_one_text_field(value: str | None, field: str) -> None:
    assert copy_line([value]) == field + "\n"


def test_copy_line_separates_fields_with_tabs_and_renders_every_kind() -> None:
    values = [
        1, -2, None, True, False, 1.5, b"\x00\t\n\\", "a\tb",
        (NUMERIC, {"text": "1.50"}), day(0), interval(0, 0, 0),
        arr("x\ty", None, "back\\slash"), (JSON, {"text": '{"a":\n"b\\\\c"}'}),
    ]
    assert copy_line(values) == "\t".join([
        "1", "-2", "\\N", "t", "f", "1.5", "\\\\x00090a5c", "a\\tb",
        "1.50", "1970-01-01", "+0 mons +0 days +00:00:00.000000",
        # array quoting first (\ -> \\), then COPY's escaping (\ -> \\, tab -> \t)
        '{"x\\ty",NULL,"back\\\\\\\\slash"}', '{"a":\\n"b\\\\\\\\c"}',
    ]) + "\n"


def test_copy_line_of_an_empty_row_and_of_all_nulls() -> None:
    assert copy_line([]) == "\n"
    assert copy_line([None, None]) == "\\N\t\\N\n"


@given(st.lists(st.one_of(st.none(), st.text(st.characters(codec="utf-8",
                                                          exclude_characters="\x00")))))
def test_copy_line_reads_back_with_the_snapshot_copy_parser(values: list[str | None]) -> None:
    line = copy_line(values)
    assert line.endswith("\n")
    assert line.count("\n") == 1  # one row is one line, whatever the text holds
    fields = parse_copy_line(line[:-1].encode())
    if not values:
        assert fields == [b""]  # an empty line is one empty field
    else:
        assert fields == [None if v is None else v.encode() for v in values]


# --- text: scalars ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", ""),
        ("text\twith\\odd\nthings", "text\twith\\odd\nthings"),  # raw: escaping is COPY's job
        (0, "0"),
        (-(2**63), "-9223372036854775808"),
        (True, "t"),
        (False, "f"),
        (0.1, "0.1"),
        (-0.0, "-0.0"),
        (1e16, "1e+16"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (math.nan, "NaN"),
        (math.inf, "Infinity"),
        (-math.inf, "-Infinity"),
        (b"", "\\x"),
        (b"\x00\xff\\'\"", "\\x00ff5c2722"),
        ((NUMERIC, {"text": "-0.000000000000000000000000000001"}),
         "-0.000000000000000000000000000001"),
        ((NUMERIC, {"text": "1.50"}), "1.50"),
        ((NUMERIC, {"text": "NaN"}), "NaN"),
        ((NUMERIC, {"text": "-Infinity"}), "-Infinity"),
        ((UUID_, {"text": "00000000-0000-0000-0000-000000000000"}),
         "00000000-0000-0000-0000-000000000000"),
        ((JSON, {"text": ' {"a" : 1, "a":[1.50, "x\\"y"]}\n'}),
         ' {"a" : 1, "a":[1.50, "x\\"y"]}\n'),
    ],
)
def test_text_of_primitives_and_exact_text_records(value: Any, expected: str | None) -> None:
    assert text(value) == expected


@given(st.floats())
def test_float_text_reads_back_as_the_same_float(value: float) -> None:
    rendered = text(value)
    assert rendered is not None
    back = BUILTIN_CONVERTERS[701](rendered.encode())  # the capture's float8 parser
    assert isinstance(back, float)
    if math.isnan(value):
        assert math.isnan(back)
    else:
        assert back == value
        assert math.copysign(1, back) == math.copysign(1, value)


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (0, "1970-01-01"),
        (-1, "1969-12-31"),
        (19782, "2024-02-29"),
        (-719162, "0001-01-01"),
        (2932896, "9999-12-31"),
        # beyond Python's dates, as Postgres prints them
        (2932897, "10000-01-01"),
        (-719163, "0001-12-31 BC"),
        (-719163 - 366, "0002-12-31 BC"),
        (INT_MAX, "infinity"),
        (INT_MIN, "-infinity"),
    ],
)
def test_date_text(days: int, expected: str) -> None:
    assert text(day(days)) == expected


@pytest.mark.parametrize(
    ("micros", "expected"),
    [
        (0, "1970-01-01 00:00:00"),
        (1, "1970-01-01 00:00:00.000001"),
        (-1, "1969-12-31 23:59:59.999999"),
        (1_709_251_199_999_999, "2024-02-29 23:59:59.999999"),
        (-62_135_596_800 * US, "0001-01-01 00:00:00"),
        (253_402_300_799 * US + 999_999, "9999-12-31 23:59:59.999999"),
        (253_402_300_800 * US, "10000-01-01 00:00:00"),
        (-62_135_596_800 * US - 1, "0001-12-31 23:59:59.999999 BC"),
        (LONG_MAX, "infinity"),
        (LONG_MIN, "-infinity"),
    ],
)
def test_timestamp_text(micros: int, expected: str) -> None:
    assert text(ts(micros)) == expected
    zoned = expected if "infinity" in expected else (
        expected.replace(" BC", "+00 BC") if expected.endswith(" BC") else expected + "+00")
    assert text(tstz(micros)) == zoned


@pytest.mark.parametrize(
    ("captured", "expected"),
    [
        ("2024-06-01 12:00:00+05:30", "2024-06-01 06:30:00+00"),
        ("1900-01-01 00:00:00-00:43:08", "1900-01-01 00:43:08+00"),
        # a Python-representable local time whose UTC date is not: Postgres's UTC text
        ("9999-12-31 17:00:00-08", "10000-01-01 01:00:00+00"),
        ("0001-01-01 03:00:00+05:53:28", "0001-12-31 21:06:32+00 BC"),
        ("0001-01-01 00:00:00.000001+00:00:01", "0001-12-31 23:59:59.000001+00 BC"),
    ],
)
def test_timestamptz_text_is_the_utc_instant(captured: str, expected: str) -> None:
    datum = archived_values({"c": datetime.fromisoformat(captured)}, {"c": "timestamptz"})["c"]
    assert text(datum) == expected


# The capture's timestamptz values carry the fixed offset Postgres printed (never a zone
# with DST gaps), within Postgres's +-15:59:59.
fixed_offsets = st.integers(-(16 * 3600 - 1), 16 * 3600 - 1).map(
    lambda s: timezone(timedelta(seconds=s)))


@given(st.datetimes(), st.datetimes(timezones=fixed_offsets))
def test_timestamps_read_back_with_the_capture_parsers(naive: datetime, aware: datetime) -> None:
    datums = archived_values({"n": naive, "a": aware}, {"n": "timestamp", "a": "timestamptz"})
    back_naive = BUILTIN_CONVERTERS[1114](str(text(datums["n"])).encode())
    assert back_naive == naive
    assert isinstance(back_naive, datetime) and back_naive.tzinfo is None
    rendered = str(text(datums["a"]))
    assert rendered[-3:] == "+00" or rendered.endswith("+00 BC")
    if not rendered.endswith(" BC") and not rendered.startswith("10000"):
        back_aware = BUILTIN_CONVERTERS[1184](rendered.encode())
        assert back_aware == aware  # the same instant
        assert isinstance(back_aware, datetime) and back_aware.utcoffset() == timedelta(0)


@given(st.dates())
def test_dates_read_back_with_the_capture_parser(value: date) -> None:
    datum = archived_values({"d": value}, {"d": "date"})["d"]
    assert BUILTIN_CONVERTERS[1082](str(text(datum)).encode()) == value


@pytest.mark.parametrize(
    ("datum", "expected"),
    [
        ((TIME, {"micros": 0}), "00:00:00.000000"),
        ((TIME, {"micros": clock(23, 59, 59, 999_999)}), "23:59:59.999999"),
        ((TIME, {"micros": clock(9, 5, 7, 10)}), "09:05:07.000010"),
        (timetz(clock(12), 0), "12:00:00.000000+00:00:00"),
        (timetz(clock(12), 19800), "12:00:00.000000+05:30:00"),
        (timetz(clock(12), -12600), "12:00:00.000000-03:30:00"),
        (timetz(clock(12), -2670), "12:00:00.000000-00:44:30"),
        (timetz(clock(0), -(15 * 3600 + 59 * 60 + 59)), "00:00:00.000000-15:59:59"),
        (timetz(clock(23, 59, 59, 1), 15 * 3600 + 59 * 60 + 59),
         "23:59:59.000001+15:59:59"),
        (timetz(clock(1), 1172), "01:00:00.000000+00:19:32"),
        (timetz(clock(1), -1), "01:00:00.000000-00:00:01"),
    ],
)
def test_time_and_timetz_text(datum: Any, expected: str) -> None:
    assert text(datum) == expected


@given(st.times(), st.integers(-(16 * 3600 - 1), 16 * 3600 - 1))
def test_timetz_reads_back_with_the_same_offset(local: time, offset: int) -> None:
    value = local.replace(tzinfo=timezone(timedelta(seconds=offset)))
    datum = archived_values({"t": value}, {"t": "timetz"})["t"]
    back = BUILTIN_CONVERTERS[1266](str(text(datum)).encode())
    assert isinstance(back, time)
    assert back.replace(tzinfo=None) == local
    assert back.utcoffset() == timedelta(seconds=offset)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ((0, 0, 0), "+0 mons +0 days +00:00:00.000000"),
        ((14, 3, clock(4, 5, 6, 789)), "+14 mons +3 days +04:05:06.000789"),
        ((-14, -3, -clock(4, 5, 6, 789)), "-14 mons -3 days -04:05:06.000789"),
        # mixed signs: every field signed, or IntervalStyle sql_standard would read the
        # unsigned fields after `-1 mons` as negative
        ((-1, 0, clock(4, 5, 6)), "-1 mons +0 days +04:05:06.000000"),
        ((1, -2, -1), "+1 mons -2 days -00:00:00.000001"),
        ((0, 0, 100 * HOUR_US), "+0 mons +0 days +100:00:00.000000"),
        ((INT_MAX, -INT_MAX, LONG_MAX),
         "+2147483647 mons -2147483647 days +2562047788:00:54.775807"),
        ((INT_MIN, 0, -LONG_MAX), "-2147483648 mons +0 days -2562047788:00:54.775807"),
        ((INT_MAX, INT_MAX, LONG_MAX), "infinity"),
        ((INT_MIN, INT_MIN, LONG_MIN), "-infinity"),
        ((INT_MAX, INT_MAX, LONG_MAX - 1), "+2147483647 mons +2147483647 days "
                                           "+2562047788:00:54.775806"),
    ],
)
def test_interval_text(fields: tuple[int, int, int], expected: str) -> None:
    assert text(interval(*fields)) == expected


@given(st.integers(INT_MIN, INT_MAX), st.integers(INT_MIN, INT_MAX),
       st.integers(-LONG_MAX, LONG_MAX))
def test_interval_reads_back_with_the_capture_parser(months: int, days: int, micros: int) -> None:
    if (months, days, micros) == (INT_MAX, INT_MAX, LONG_MAX):
        return
    rendered = text(interval(months, days, micros))
    assert rendered is not None
    assert BUILTIN_CONVERTERS[1186](rendered.encode()) == Interval(months, days, micros)


def test_infinities_come_from_the_encoder_as_postgres_infinity() -> None:
    row = {k: inf for k, inf in zip("abcdefgh", [Infinity.POSITIVE, Infinity.NEGATIVE] * 4,
                                     strict=True)}
    kinds = dict(zip("abcdefgh", ["date", "date", "timestamp", "timestamp", "timestamptz",
                                  "timestamptz", "interval", "interval"], strict=True))
    datums = archived_values(row, kinds)
    assert [text(datums[k]) for k in "abcdefgh"] == ["infinity", "-infinity"] * 4


def test_unknown_values_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown archived value type"):
        text(("com.example.Point", {"x": 1}))
    for value in (Decimal("1"), [1, 2], {"a": 1}, object()):
        with pytest.raises(ValueError, match="unknown archived value"):
            text(value)


# --- text: arrays ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datum", "expected"),
    [
        (arr(), "{}"),
        (arr(None), "{NULL}"),
        (arr(1, None, -3), '{"1",NULL,"-3"}'),
        (arr("NULL", None, ""), '{"NULL",NULL,""}'),
        (arr('a"b', "c\\d", "e,f", "{g}", " h ", "i\tj\nk"),
         '{"a\\"b","c\\\\d","e,f","{g}"," h ","i\tj\nk"}'),
        (arr(arr(1, None), arr(None, -2)), '{{"1",NULL},{NULL,"-2"}}'),
        (arr(arr(arr("x")), arr(arr(None))), '{{{"x"}},{{NULL}}}'),
        (arr(b"\x00\\", b""), '{"\\\\x005c","\\\\x"}'),
        (arr(True, False, math.nan, -math.inf), '{"t","f","NaN","-Infinity"}'),
        (arr((NUMERIC, {"text": "1.50"}), (NUMERIC, {"text": "NaN"})), '{"1.50","NaN"}'),
        (arr((JSON, {"text": '{"a": "b\\"c"}'}), None), '{"{\\"a\\": \\"b\\\\\\"c\\"}",NULL}'),
        (arr(day(INT_MAX), day(0), day(INT_MIN)), '{"infinity","1970-01-01","-infinity"}'),
        (arr(tstz(0)), '{"1970-01-01 00:00:00+00"}'),
        (arr(interval(-1, 0, 1)), '{"-1 mons +0 days +00:00:00.000001"}'),
        (arr(timetz(0, -2670)), '{"00:00:00.000000-00:44:30"}'),
    ],
)
def test_array_text(datum: Any, expected: str) -> None:
    assert text(datum) == expected


nested_text_arrays = st.recursive(
    st.lists(st.one_of(st.none(), st.text(st.characters(codec="utf-8",
                                                        exclude_characters="\x00"))),
             max_size=5),
    lambda children: st.lists(children, min_size=1, max_size=3),
    max_leaves=12,
)


def as_datum(items: list[Any]) -> tuple[str, dict[str, Any]]:
    return arr(*(as_datum(i) if isinstance(i, list) else i for i in items))


@given(nested_text_arrays)
def test_array_text_reads_back_with_the_capture_array_parser(items: list[Any]) -> None:
    rendered = text(as_datum(items))
    assert rendered is not None
    assert parse_array(rendered.encode(), bytes.decode) == items


def test_array_built_by_the_encoder_renders_nested() -> None:
    datum = archived_values({"m": [[1, None], [None, 2]], "j": ['{"a":1}', None]},
                            {"m": "_int4", "j": "_jsonb"})
    assert text(datum["m"]) == '{{"1",NULL},{NULL,"2"}}'
    assert text(datum["j"]) == '{"{\\"a\\":1}",NULL}'


# --- json_value ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("text", "text"),
        ("", ""),
        (7, 7),
        (True, True),
        (False, False),
        (1.5, 1.5),
        (math.nan, "NaN"),
        (math.inf, "Infinity"),
        (-math.inf, "-Infinity"),
        (b"\x01\xab", "\\x01ab"),
        ((NUMERIC, {"text": "1.50"}), "1.50"),  # exact text, not 1.5
        ((NUMERIC, {"text": "NaN"}), "NaN"),
        ((UUID_, {"text": "12345678-1234-5678-1234-567812345678"}),
         "12345678-1234-5678-1234-567812345678"),
        (day(0), "1970-01-01"),
        (day(INT_MAX), "infinity"),
        (tstz(0), "1970-01-01 00:00:00+00"),
        (interval(1, -2, 3), "+1 mons -2 days +00:00:00.000003"),
        ((JSON, {"text": '{"a": [1, null, "x"], "b": {}}'}), {"a": [1, None, "x"], "b": {}}),
        ((JSON, {"text": '"NULL"'}), "NULL"),
        ((JSON, {"text": "null"}), None),
        (arr(1, None, arr("a", None)), [1, None, ["a", None]]),
        (arr((JSON, {"text": "[1]"}), (NUMERIC, {"text": "2.0"}), math.nan), [[1], "2.0", "NaN"]),
    ],
)
def test_json_value(value: Any, expected: Any) -> None:
    got = json_value(value)
    assert got == expected
    assert type(got) is type(expected)
    json.dumps(got, allow_nan=False)  # always valid JSON: no NaN/Infinity numbers


def test_json_value_keeps_json_text_when_asked() -> None:
    doc = ' {"a" : 1.50, "a": 2}'
    assert json_value((JSON, {"text": doc}), json_text=True) == doc
    assert json_value(arr((JSON, {"text": doc}), None), json_text=True) == [doc, None]
    assert json_value((JSON, {"text": doc})) == {"a": 2}


# --- row_digest and TableHash ----------------------------------------------------------------


def table_hash(rows: list[list[Any]]) -> TableHash:
    h = TableHash()
    for row in rows:
        h.add(row)
    return h


ROWS: list[list[Any]] = [
    [1, "a", None, (NUMERIC, {"text": "1.50"})],
    [2, "", "x", day(INT_MAX)],
    [3, None, "y\tz", arr(1, None)],
    [4, "a", None, (NUMERIC, {"text": "1.50"})],
]


def test_row_digest_is_a_stable_128_bit_number() -> None:
    digest = row_digest(ROWS[0])
    assert 0 <= digest < 2**128
    assert digest == row_digest(list(ROWS[0]))
    assert digest == row_digest(iter(ROWS[0]))
    assert digest.bit_length() > 64  # not something truncated to 64 bits (1 in 2**64 flaky)
    assert row_digest([]) != row_digest([None])


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ([1, "a"], [1, "b"]),  # a changed value
        ([None], [""]),  # NULL vs the empty string
        ([None], ["\\N"]),
        ([None], ["NULL"]),
        (["a", "b"], ["b", "a"]),  # a swapped column pair
        ([None, ""], ["", None]),
        ([1, None], [None, 1]),
        (["ab", "c"], ["a", "bc"]),  # no ambiguity in where a value ends
        (["a\x00N"], ["a", None]),
        (["a"], ["a", None]),  # a trailing NULL column counts
        ([day(0)], [day(1)]),
        ([(NUMERIC, {"text": "1.5"})], [(NUMERIC, {"text": "1.50"})]),  # scale is content
        ([interval(0, 1, 0)], [interval(0, 0, DAY_US)]),  # 1 day is not 24 hours
        ([1.0], [1.0000000000000002]),
        ([0.0], [-0.0]),
        ([arr(None)], [arr("NULL")]),
        ([b"\x00"], [b"\x00\x00"]),
        ([tstz(0)], [tstz(1)]),
    ],
)
def test_row_digest_sees_each_difference(one: list[Any], other: list[Any]) -> None:
    assert row_digest(one) != row_digest(other)
    assert table_hash([one]).hexdigest() != table_hash([other]).hexdigest()


def test_table_hash_does_not_depend_on_row_order() -> None:
    reference = table_hash(ROWS)
    for order in itertools.permutations(ROWS):
        got = table_hash(list(order))
        assert got.hexdigest() == reference.hexdigest()
        assert got.rows == len(ROWS)


@given(st.lists(st.lists(st.one_of(st.none(), st.text(max_size=3), st.integers()), max_size=3),
                max_size=6), st.randoms(use_true_random=False))
def test_table_hash_of_shuffled_rows_is_equal(rows: list[list[Any]], rng: Any) -> None:
    shuffled = list(rows)
    rng.shuffle(shuffled)
    assert table_hash(rows).hexdigest() == table_hash(shuffled).hexdigest()


def test_table_hash_sees_changed_missing_and_extra_rows() -> None:
    reference = table_hash(ROWS).hexdigest()
    changed = [list(r) for r in ROWS]
    changed[2][2] = "y\tZ"
    assert table_hash(changed).hexdigest() != reference
    swapped = [list(r) for r in ROWS]
    swapped[1][1], swapped[1][2] = swapped[1][2], swapped[1][1]
    assert table_hash(swapped).hexdigest() != reference
    nulled = [list(r) for r in ROWS]
    nulled[1][1] = None  # '' -> NULL
    assert table_hash(nulled).hexdigest() != reference
    assert table_hash(ROWS[:-1]).hexdigest() != reference
    assert table_hash([*ROWS, ROWS[0]]).hexdigest() != reference
    # rows 0 and 3 differ only in the id: the same other values in another row are not lost
    assert table_hash([ROWS[0], ROWS[0], ROWS[1], ROWS[2]]).hexdigest() != reference


def test_table_hash_counts_rows_and_prints_32_hex_digits() -> None:
    empty = TableHash()
    assert (empty.rows, empty.total, empty.hexdigest()) == (0, 0, "0" * 32)
    h = table_hash(ROWS)
    assert h.rows == 4
    assert h.total == sum(row_digest(r) for r in ROWS) % 2**128
    assert h.hexdigest() == f"{h.total:032x}"
    assert len(h.hexdigest()) == 32
    assert int(h.hexdigest(), 16) == h.total


def test_row_digest_is_the_digest_of_the_rendered_text() -> None:
    """The hash is of Postgres's text: values with the same text hash alike (what makes the
    live and the restored side comparable), the type of the Python value does not matter."""
    assert row_digest([True]) == row_digest(["t"])
    assert row_digest([b"\x01"]) == row_digest(["\\x01"])
    assert row_digest([(NUMERIC, {"text": "2"})]) == row_digest([2])


# --- utc_text --------------------------------------------------------------------------------


def test_utc_text() -> None:
    assert utc_text(0) == "1970-01-01T00:00:00+00:00"
    assert utc_text(1) == "1970-01-01T00:00:00.000001+00:00"
    assert utc_text(-1) == "1969-12-31T23:59:59.999999+00:00"
    stamp = datetime(2024, 6, 1, 12, 30, 5, 123456, tzinfo=UTC)
    us = (stamp - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert utc_text(us) == "2024-06-01T12:30:05.123456+00:00"
    assert datetime.fromisoformat(utc_text(us)) == stamp


def test_uuid_datum_from_the_encoder() -> None:
    value = UUID("12345678-1234-5678-1234-567812345678")
    datum = archived_values({"u": value}, {"u": "uuid"})["u"]
    assert text(datum) == str(value)
