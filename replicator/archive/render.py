"""Archived values as text: Postgres's input form, COPY lines, CSV fields, JSON values, hashes.

Segment records hold values as fastavro decodes the envelope's `Value` union: `None`, `bool`,
`int`, `float`, `str`, `bytes`, or a `(record name, fields)` pair for the logical types
(`replicator.transport.avro`). Replay never turns them into Python objects first: each is
rendered straight to the text Postgres accepts as input for the column, which is what COPY,
CSV and the content hash need.

- `text(value)`: the Postgres input text (`None` stays `None`): ISO dates and times, numeric
  and uuid and json as their exact archived text, bytea as `\\x<hex>`, arrays as `{...}`
  literals, intervals as `<+-m> mons <+-d> days <+->hh:mm:ss.us`, and `infinity`/`-infinity`.
  The text means the same whatever the reading session's DateStyle, IntervalStyle and
  TimeZone: timestamptz is printed in UTC with `+00`, every interval field carries its own
  sign (IntervalStyle `sql_standard` would otherwise extend a leading `-` to unsigned fields),
  and instants whose UTC date lies outside Python's years 1-9999 (a timestamptz captured as
  `9999-12-31 17:00:00-08`) are printed as Postgres does (`10000-01-01 01:00:00+00`,
  `0001-12-31 21:06:32+00 BC`).
- `copy_line(values)`: one line of COPY's text format (tab-separated, `\\N` for NULL).
- `row_digest(values)`: a 128-bit digest of a row's canonical text; `TableHash` sums them, so
  a table's hash does not depend on row order (the same rows give the same hash however they
  were restored or read).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

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
)

__all__ = ["FLOAT_TYPES", "INT_TYPES", "PgText", "TableHash", "copy_escape", "copy_line",
           "json_value", "row_digest", "text", "typed"]

_INT_MAX: Final = 2**31 - 1
_INT_MIN: Final = -(2**31)
_LONG_MAX: Final = 2**63 - 1
_LONG_MIN: Final = -(2**63)
_EPOCH: Final = datetime(1970, 1, 1)
_EPOCH_ORDINAL: Final = _EPOCH.toordinal()
_US: Final = 1_000_000
# Python's datetime/date range (years 1-9999) in archived units; outside it, the Gregorian
# calendar's 400-year cycle (146097 days exactly) shifts the value into range.
_MICRO: Final = timedelta(microseconds=1)
_MIN_MICROS: Final = (datetime.min - _EPOCH) // _MICRO
_MAX_MICROS: Final = (datetime.max - _EPOCH) // _MICRO
_MIN_DAYS: Final = date.min.toordinal() - _EPOCH_ORDINAL
_MAX_DAYS: Final = date.max.toordinal() - _EPOCH_ORDINAL
_CYCLE_DAYS: Final = 146_097
_CYCLE_MICROS: Final = _CYCLE_DAYS * 86_400 * _US

# COPY text format: backslash, and the characters that would end a field or a line.
_COPY_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_escape(text: str) -> str:
    """*text* as a field of COPY's text format (backslash, tab, newline, CR escaped)."""
    return text.translate(_COPY_ESCAPES)


def _shifted(iso: str, cycles: int, suffix: str) -> str:
    """*iso* (a date or timestamp text in years 1970-2369) moved by *cycles* 400-year cycles,
    in Postgres's form: 4+ digit years, and years up to 0 as `<1 - year> ... BC`."""
    year = int(iso[:4]) + 400 * cycles
    if year > 0:
        return f"{year:04d}{iso[4:]}{suffix}"
    return f"{1 - year:04d}{iso[4:]}{suffix} BC"


def _timestamp(fields: dict[str, int], zone: str) -> str:
    micros = fields["micros"]
    if _MIN_MICROS <= micros <= _MAX_MICROS:
        return (_EPOCH + timedelta(microseconds=micros)).isoformat(" ") + zone
    if micros == _LONG_MAX:
        return "infinity"
    if micros == _LONG_MIN:
        return "-infinity"
    # Only a timestamptz gets here from a Python value: printed in a zone far from UTC, its
    # UTC date can be 10000-01-01 or 1 BC.
    cycles, rest = divmod(micros, _CYCLE_MICROS)
    return _shifted((_EPOCH + timedelta(microseconds=rest)).isoformat(" "), cycles, zone)


def _date(fields: dict[str, int]) -> str:
    days = fields["days"]
    if _MIN_DAYS <= days <= _MAX_DAYS:
        return date.fromordinal(days + _EPOCH_ORDINAL).isoformat()
    if days == _INT_MAX:
        return "infinity"
    if days == _INT_MIN:
        return "-infinity"
    cycles, rest = divmod(days, _CYCLE_DAYS)
    return _shifted(date.fromordinal(rest + _EPOCH_ORDINAL).isoformat(), cycles, "")


def _clock(micros: int, plus: str = "") -> str:
    sign = "-" if micros < 0 else plus
    seconds, micro = divmod(abs(micros), _US)
    minutes, second = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    return f"{sign}{hours:02d}:{minute:02d}:{second:02d}.{micro:06d}"


def _offset(seconds: int) -> str:
    # Python's utcoffset is east-positive, as is Postgres's timetz output.
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{sign}{hours:02d}:{minutes:02d}:{secs:02d}"


def _interval(fields: dict[str, int]) -> str:
    months, days, micros = fields["months"], fields["days"], fields["micros"]
    if (months, days, micros) == (_INT_MAX, _INT_MAX, _LONG_MAX):
        return "infinity"
    if (months, days, micros) == (_INT_MIN, _INT_MIN, _LONG_MIN):
        return "-infinity"
    # Every field signed: under IntervalStyle sql_standard, `-1 mons 0 days 04:05:06` reads
    # as -1 month -4 hours (a leading sign extends to the unsigned fields).
    return f"{months:+d} mons {days:+d} days {_clock(micros, '+')}"


def _float(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def _array_element(value: Any) -> str:
    if value is None:
        return "NULL"
    if type(value) is tuple and value[0] == ARRAY:
        return _array(value[1])
    rendered = text(value)
    assert rendered is not None
    return '"' + rendered.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _array(fields: dict[str, Any]) -> str:
    return "{" + ",".join(_array_element(item) for item in fields["items"]) + "}"


_RECORDS: Final[dict[str, Callable[[dict[str, Any]], str]]] = {
    NUMERIC: lambda f: f["text"],
    UUID_: lambda f: f["text"],
    JSON: lambda f: f["text"],
    TIMESTAMP: lambda f: _timestamp(f, ""),
    TIMESTAMPTZ: lambda f: _timestamp(f, "+00"),
    DATE: _date,
    TIME: lambda f: _clock(f["micros"]),
    TIMETZ: lambda f: _clock(f["micros"]) + _offset(f["offset_s"]),
    INTERVAL: _interval,
    ARRAY: _array,
}


class PgText(str):
    """A value known only as its Postgres text (a row read from a snapshot part): it renders
    as itself, whatever the column's type."""

    __slots__ = ()


def text(value: Any) -> str | None:
    """The Postgres input text of one archived value (`None` for NULL)."""
    cls = type(value)
    if cls is str or cls is PgText:
        return str(value)
    if value is None:
        return None
    if cls is int:
        return str(value)
    if cls is bool:
        return "t" if value else "f"
    if cls is float:
        return _float(value)
    if cls is bytes:
        return "\\x" + bytes(value).hex()
    if cls is tuple:
        name, fields = value
        render = _RECORDS.get(name)
        if render is None:
            raise ValueError(f"unknown archived value type {name!r}")
        return render(fields)
    raise ValueError(f"unknown archived value {value!r}")


def copy_line(values: Sequence[Any]) -> str:
    """One row in COPY's text format, newline included."""
    parts: list[str] = []
    append = parts.append
    escapes = _COPY_ESCAPES
    for value in values:
        cls = type(value)
        if cls is str:
            append(value.translate(escapes))
        elif value is None:
            append("\\N")
        elif cls is int:
            append(str(value))
        else:
            rendered = text(value)
            append("\\N" if rendered is None else rendered.translate(escapes))
    return "\t".join(parts) + "\n"


def json_value(value: Any, json_text: bool = False) -> Any:
    """The value as JSON: numbers and booleans as themselves, numeric as its exact text (a
    JSON number would lose its scale), json/jsonb columns as the document they hold
    (*json_text* keeps the text), bytea as `\\x<hex>`, arrays as lists, the rest as their
    Postgres text."""
    cls = type(value)
    if value is None or cls is str or cls is int or cls is bool:
        return value
    if cls is float:
        return value if math.isfinite(value) else _float(value)
    if cls is tuple:
        name, fields = value
        if name == ARRAY:
            return [json_value(item, json_text) for item in fields["items"]]
        if name == JSON and not json_text:
            return json.loads(fields["text"])
    return text(value)


def row_digest(values: Iterable[Any]) -> int:
    """A 128-bit digest of the row's canonical text: each value's Postgres text, NULL
    distinct from every text."""
    h = hashlib.blake2b(digest_size=16)
    for value in values:
        rendered = text(value)
        if rendered is None:
            h.update(b"\x00N")
        else:
            data = rendered.encode()
            h.update(b"\x01" + len(data).to_bytes(8, "little") + data)
    return int.from_bytes(h.digest(), "little")


class TableHash:
    """An order-independent content hash of a table: the sum of its rows' digests modulo
    2**128, with the row count."""

    __slots__ = ("rows", "total")

    def __init__(self) -> None:
        self.rows = 0
        self.total = 0

    def add(self, values: Iterable[Any]) -> None:
        self.rows += 1
        self.total = (self.total + row_digest(values)) % (1 << 128)

    def hexdigest(self) -> str:
        return f"{self.total:032x}"


def utc_text(us: int) -> str:
    """A commit time (microseconds since the epoch) as ISO 8601 UTC."""
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)).isoformat()


INT_TYPES: Final = frozenset({"smallint", "integer", "bigint", "oid"})
FLOAT_TYPES: Final = frozenset({"real", "double precision"})
_EPOCH_UTC: Final = datetime(1970, 1, 1, tzinfo=UTC)


def typed(value: Any, type_name: str) -> Any:
    """A value known as Postgres text (`PgText`, from a snapshot part) as the archived value
    of its column's type, for the typed outputs (JSONL, Parquet); other values unchanged."""
    if type(value) is not PgText:
        return value
    text_ = str(value)
    try:
        if type_name in INT_TYPES:
            return int(text_)
        if type_name in FLOAT_TYPES:
            return float(text_)
        if type_name == "boolean":
            return text_ == "t"
        if type_name == "bytea":
            return bytes.fromhex(text_[2:])
        if type_name in ("json", "jsonb"):
            return (JSON, {"text": text_})
        if type_name == "date":
            days = {"infinity": 2**31 - 1, "-infinity": -(2**31)}.get(text_)
            if days is None:
                days = date.fromisoformat(text_).toordinal() - _EPOCH_ORDINAL
            return (DATE, {"days": days})
        if type_name.startswith("timestamp"):
            zoned = type_name.endswith("with time zone")
            micros = {"infinity": 2**63 - 1, "-infinity": -(2**63)}.get(text_)
            if micros is None:
                moment = datetime.fromisoformat(text_)
                base = _EPOCH_UTC if zoned else _EPOCH
                micros = (moment - base) // timedelta(microseconds=1)
            return (TIMESTAMPTZ if zoned else TIMESTAMP, {"micros": micros})
    except ValueError:
        return value  # beyond Python's dates (BC): the text, as Postgres wrote it
    return value
