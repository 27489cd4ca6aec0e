"""Writing Avro: Python values as the envelope's Value union, and the compiled writers of
the change-event envelope and the transaction record (`transport.avro` frames them).

The union branch of every value is named with fastavro's tuple notation (`("long", 5)`),
which spares fastavro from trying each branch of a 16-way union in turn. The hot path does
not build those tuples at all: `EnvelopeWriter` writes the common Python types (None, int,
str, and json text) straight as their branch and value, and the rest through `_ENCODERS`
and the compiled Value union (`avrowrite`), so the bytes are fastavro's either way
(`tests/unit/test_avrowrite.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final
from uuid import UUID

from replicator import __version__
from replicator.errors import ReplicatorError
from replicator.events import ChangeEvent, TransactionRecord
from replicator.keys import Infinity, Interval
from replicator.transport.avrovalues import (
    ARRAY,
    DATE,
    EPOCH,
    EPOCH_ORDINAL,
    EPOCH_UTC,
    INT_MAX,
    INT_MIN,
    INTERVAL,
    JSON,
    LONG_MAX,
    LONG_MIN,
    NUMERIC,
    TIME,
    TIMESTAMP,
    TIMESTAMPTZ,
    TIMETZ,
    UUID_,
)
from replicator.transport.avrowrite import compile_writer, write_long, write_string

CONNECTOR: Final = "wedsync-replicator"


class CodecError(ReplicatorError, ValueError):
    """A message cannot be encoded or decoded."""


class EncodeError(CodecError):
    """A value has no Avro form; the message names the column and Python type, not the value."""



# --- Python value -> Avro union datum --------------------------------------------------------


_MICRO: Final = timedelta(microseconds=1)

# Hints are Postgres base type names, array types with or without the leading underscore.
_JSON_KINDS: Final = frozenset({"json", "jsonb", "_json", "_jsonb", "json[]", "jsonb[]"})
_INFINITY_KINDS: Final[dict[str, str]] = {
    variant: kind
    for kind, names in {
        "date": ("date",),
        "timestamp": ("timestamp", "timestamp without time zone"),
        "timestamptz": ("timestamptz", "timestamp with time zone"),
        "interval": ("interval",),
    }.items()
    for name in names
    for variant in (name, f"_{name}", f"{name}[]")
}
_INFINITE: Final[dict[tuple[str, bool], tuple[str, dict[str, int]]]] = {
    ("date", True): (DATE, {"days": INT_MAX}),
    ("date", False): (DATE, {"days": INT_MIN}),
    ("timestamp", True): (TIMESTAMP, {"micros": LONG_MAX}),
    ("timestamp", False): (TIMESTAMP, {"micros": LONG_MIN}),
    ("timestamptz", True): (TIMESTAMPTZ, {"micros": LONG_MAX}),
    ("timestamptz", False): (TIMESTAMPTZ, {"micros": LONG_MIN}),
    ("interval", True): (INTERVAL, {"months": INT_MAX, "days": INT_MAX, "micros": LONG_MAX}),
    ("interval", False): (INTERVAL, {"months": INT_MIN, "days": INT_MIN, "micros": LONG_MIN}),
}

Datum = tuple[str, Any] | None
_Encoder = Callable[[Any, str | None], Datum]


def _none(value: None, kind: str | None) -> Datum:
    return None


def _bool(value: bool, kind: str | None) -> Datum:
    return ("boolean", value)


def _long(value: int, kind: str | None) -> Datum:
    return ("long", value)


def _double(value: float, kind: str | None) -> Datum:
    return ("double", value)


def _str(value: str, kind: str | None) -> Datum:
    if kind is not None and kind in _JSON_KINDS:
        return (JSON, {"text": value})
    return ("string", value)


def _bytes(value: bytes, kind: str | None) -> Datum:
    return ("bytes", value)


def _numeric(value: Decimal, kind: str | None) -> Datum:
    # 'f' never uses an exponent (str() would print 1E-7) and keeps the scale: 1.50 stays 1.50.
    return (NUMERIC, {"text": format(value, "f")})


def _datetime(value: datetime, kind: str | None) -> Datum:
    if value.tzinfo is None:
        return (TIMESTAMP, {"micros": (value - EPOCH) // _MICRO})
    return (TIMESTAMPTZ, {"micros": (value - EPOCH_UTC) // _MICRO})


def _date(value: date, kind: str | None) -> Datum:
    return (DATE, {"days": value.toordinal() - EPOCH_ORDINAL})


def _time_micros(value: time) -> int:
    return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond


def _time(value: time, kind: str | None) -> Datum:
    offset = value.utcoffset()
    if offset is None:
        return (TIME, {"micros": _time_micros(value)})
    return (TIMETZ, {"micros": _time_micros(value), "offset_s": offset // timedelta(seconds=1)})


def _interval(value: Interval, kind: str | None) -> Datum:
    return (
        INTERVAL,
        {"months": value.months, "days": value.days, "micros": value.microseconds},
    )


def _uuid(value: UUID, kind: str | None) -> Datum:
    return (UUID_, {"text": str(value)})


def _array(value: list[Any], kind: str | None) -> Datum:
    return (ARRAY, {"items": [_value(item, kind) for item in value]})


def _infinity(value: Infinity, kind: str | None) -> Datum:
    target = _INFINITY_KINDS.get(kind) if kind is not None else None
    if target is None:
        raise EncodeError(
            f"{value.value} needs the column's type (date, timestamp, timestamptz or interval) "
            f"in column_types, got {kind!r}"
        )
    return _INFINITE[target, value is Infinity.POSITIVE]


_ENCODERS: Final[dict[type, _Encoder]] = {
    type(None): _none,
    bool: _bool,
    int: _long,
    float: _double,
    str: _str,
    bytes: _bytes,
    Decimal: _numeric,
    datetime: _datetime,
    date: _date,
    time: _time,
    Interval: _interval,
    UUID: _uuid,
    list: _array,
    Infinity: _infinity,
}


def _encoder_for(cls: type) -> _Encoder:
    """Subclasses (an IntEnum, an `Lsn`) encode like their nearest known base."""
    for base in cls.__mro__[1:]:
        encoder = _ENCODERS.get(base)
        if encoder is not None:
            _ENCODERS[cls] = encoder
            return encoder
    raise EncodeError(f"a {cls.__name__} has no Avro Value form")


def _value(value: Any, kind: str | None) -> Datum:
    cls = type(value)
    encoder = _ENCODERS.get(cls) or _encoder_for(cls)
    return encoder(value, kind)


def _row(row: Mapping[str, Any], hints: Mapping[str, str] | None) -> dict[str, Datum]:
    encoders = _ENCODERS
    out: dict[str, Datum] = {}
    name = ""
    try:
        if hints:
            for name, value in row.items():
                cls = type(value)
                out[name] = (encoders.get(cls) or _encoder_for(cls))(value, hints.get(name))
        else:
            for name, value in row.items():
                cls = type(value)
                out[name] = (encoders.get(cls) or _encoder_for(cls))(value, None)
    except EncodeError as exc:
        raise EncodeError(f"column {name}: {exc}") from None
    return out



# --- the compiled writers --------------------------------------------------------------------


def _long_bytes(n: int) -> bytes:
    out = bytearray()
    write_long(out, n)
    return bytes(out)


def _branch(schema: Any, namespace: str) -> str:
    """The name a union branch is known by (as in fastavro's tuple notation)."""
    if isinstance(schema, str):
        return schema
    if schema["type"] != "record":
        return str(schema["type"])
    name = str(schema["name"])
    return name if "." in name else f"{schema.get('namespace', namespace)}.{name}"


class EnvelopeWriter:
    """The envelope's Avro body, written straight from a `ChangeEvent` (and the transaction
    record's, `write_transaction`): the bytes fastavro
    writes for `EventCodec.event_datum` (checked by `tests/unit/test_avrowrite.py`), at a
    fraction of the cost. The parts that repeat (source constants, table names, column names,
    ops, tiers) are encoded once; None, int and str values (json text included) are written
    here as their union branch and value, every other value goes through `_ENCODERS` as for
    fastavro, then the compiled Value union (`avrowrite`). Raises `Unsupported` (or
    `EncodeError`) for what it does not take; the caller then uses fastavro."""

    def __init__(self, schema: Mapping[str, Any], name: str) -> None:
        fields = {f["name"]: f["type"] for f in schema["fields"]}
        # ["null", {"type": "map", "values": <Value union, with the named types inline>}]
        union = fields["before"][1]["values"]
        namespace = str(schema.get("namespace", ""))
        self._value = compile_writer(union, namespace=namespace)
        branches = [_branch(b, namespace) for b in union]
        json_record = union[branches.index(JSON)]
        if [(f["name"], f["type"]) for f in json_record["fields"]] != [("text", "string")]:
            raise ValueError("the Json Value record is expected to hold one string, text")
        # Branch indexes as the one-byte longs they are written as (every union here < 64).
        self._null = bytes([branches.index("null") << 1])
        self._long = branches.index("long") << 1
        self._str = branches.index("string") << 1
        self._json = branches.index(JSON) << 1
        # A long's branch and value for -64..63 (one byte each): ids, counts, flags.
        self._small = tuple(bytes([self._long, (n << 1) ^ (n >> 63)]) for n in range(-64, 64))
        self._name = name
        self._text: dict[str, bytes] = {}  # a string's Avro encoding (names, constants)
        self._source: dict[tuple[str, str, str], bytes] = {}  # db, schema, table -> prefix
        self._ts_ms, self._ts_ms_bytes = -1, b""
        self._commit: tuple[int, int, int] | None = None
        self._commit_bytes = b""
        self._commit_parts = (b"", b"", b"")  # the commit's LSN, xid and commit_ts_us

    def _string(self, text: str) -> bytes:
        encoded = self._text.get(text)
        if encoded is None:
            out = bytearray()
            write_string(out, text)
            encoded = self._text[text] = bytes(out)
        return encoded

    def _row(self, out: bytearray, row: Mapping[str, Any], hints: Mapping[str, str] | None
             ) -> None:
        if not row:
            out.append(0)
            return
        count = len(row)
        if count < 64:
            out.append(count << 1)
        else:
            write_long(out, count)
        names, small, null = self._text, self._small, self._null
        for name, item in row.items():
            encoded = names.get(name)
            out += self._string(name) if encoded is None else encoded
            cls = type(item)
            if cls is int:
                if -64 <= item < 64:
                    out += small[item + 64]
                else:
                    out.append(self._long)
                    write_long(out, item)
            elif cls is str:
                out.append(self._json if hints and hints.get(name) in _JSON_KINDS
                           else self._str)
                data = item.encode()
                size = len(data)
                if size < 64:
                    out.append(size << 1)
                else:
                    write_long(out, size)
                out += data
            elif item is None:
                out += null
            else:
                self._value(out, (_ENCODERS.get(cls) or _encoder_for(cls))(
                    item, hints.get(name) if hints else None))
        out.append(0)

    def write(self, out: bytearray, event: ChangeEvent, hints: Mapping[str, str] | None,
              ts_ms: int) -> tuple[int, int]:
        """Appends the body to *out*; where in *out* `ts_ms` is (start, end)."""
        row = event.before
        if row is None:
            out.append(0)
        else:
            out.append(2)
            self._row(out, row, hints)
        row = event.after
        if row is None:
            out.append(0)
        else:
            out.append(2)
            self._row(out, row, hints)
        self._row(out, event.key, hints)
        unchanged = event.unchanged
        if unchanged:
            write_long(out, len(unchanged))
            for column in unchanged:
                write_string(out, column)
        out.append(0)
        text = self._text
        op = str(event.op)
        encoded = text.get(op)
        out += self._string(op) if encoded is None else encoded
        if ts_ms != self._ts_ms:  # the same for every change of a millisecond
            self._ts_ms, self._ts_ms_bytes = ts_ms, _long_bytes(ts_ms)
        at = len(out)
        out += self._ts_ms_bytes
        where = (at, len(out))
        source_key = (event.db, event.schema, event.table)
        prefix = self._source.get(source_key)
        if prefix is None:
            prefix = self._source[source_key] = b"".join(
                self._string(part) for part in (__version__, CONNECTOR, self._name, *source_key))
        out += prefix
        commit_lsn, seq = event.position
        commit = (int(commit_lsn), event.xid, event.commit_ts_us)
        if commit != self._commit:  # the same for every change of a transaction
            lsn, xid, commit_us = parts = (
                _long_bytes(commit[0]), _long_bytes(commit[1]), _long_bytes(commit[2]))
            self._commit_bytes = b"".join((lsn, xid, _long_bytes(commit[2] // 1000), commit_us))
            self._commit_parts = parts
            self._commit = commit
        out += self._commit_bytes
        if type(seq) is int and 0 <= seq < 64:
            out.append(seq << 1)
        else:
            write_long(out, seq)
        origin = event.origin
        if origin is None:
            out.append(0)
        else:
            out.append(2)
            write_string(out, origin)
        tier = str(event.tier)
        encoded = text.get(tier)
        out += self._string(tier) if encoded is None else encoded
        wedding = event.wedding_id
        if wedding is None:
            out.append(0)
        else:
            out.append(2)
            write_string(out, wedding)
        return where


    def _map_of_longs(self, out: bytearray, values: Mapping[str, int]) -> None:
        if values:
            write_long(out, len(values))
            text, string = self._text, self._string
            for key, value in values.items():
                encoded = text.get(key)
                out += string(key) if encoded is None else encoded
                if type(value) is int and 0 <= value < 64:
                    out.append(value << 1)
                else:
                    write_long(out, value)
        out.append(0)

    def write_transaction(self, out: bytearray, record: TransactionRecord) -> None:
        """Appends the Avro body of *record* (the bytes fastavro writes for
        `EventCodec.transaction_datum`); `Unsupported` for what it does not take. The
        commit's longs are the ones its changes' envelopes were just written with."""
        commit = (int(record.commit_lsn), record.xid, record.commit_ts_us)
        if commit == self._commit:
            lsn, xid, commit_us = self._commit_parts
            out += lsn
            write_long(out, int(record.end_lsn))
            out += commit_us
            out += xid
        else:
            write_long(out, commit[0])
            write_long(out, int(record.end_lsn))
            write_long(out, commit[2])
            write_long(out, commit[1])
        origin = record.origin
        if origin is None:
            out.append(0)
        else:
            out.append(2)
            write_string(out, origin)
        counts = record.counts
        self._map_of_longs(out, counts)
        write_long(out, sum(counts.values()))
        self._map_of_longs(out, record.tier_counts)
        digests = record.digests
        if digests:
            write_long(out, len(digests))
            text, string = self._text, self._string
            for key, value in digests.items():
                encoded = text.get(key)
                out += string(key) if encoded is None else encoded
                write_string(out, value)
        out.append(0)
