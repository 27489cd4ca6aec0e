"""Python values from the text form that pgoutput sends, by column type OID.

Values keep their Postgres meaning through Kafka and the archive: numeric stays an exact
`Decimal`, timestamptz stays aware with the offset the server printed, and anything Python
cannot hold faithfully is either a marker or an error, never a lookalike:

- `'infinity'` / `'-infinity'` in date, timestamp, timestamptz and (PG 17+) interval columns
  become `Infinity.POSITIVE` / `Infinity.NEGATIVE`. Open-ended validity ranges are common and
  `date.max` would be a real, different date.
- BC dates, years after 9999 and `time '24:00:00'` raise `ValueConversionError`: they are
  vanishingly rare in this database and any Python stand-in would change their meaning.
- json and jsonb stay `str`, exactly as Postgres printed them: parsing would turn numbers into
  floats (losing numeric exactness) and drop json's key order and duplicate keys, and replay
  would then re-serialise a value different from the one captured.
- Arrays become (nested) lists; arrays with lower bounds other than 1 (`[0:1]={1,2}`) raise,
  since a list cannot carry the bounds.

The parsers expect the session defaults of a walsender: DateStyle ISO, IntervalStyle postgres,
bytea_output hex, and a UTF-8 database. Anything else fails loudly rather than misparsing.

Speed: converters are looked up once per relation (`RowDecoder`), so each row is one loop over
(converter, raw value) pairs; most converters are C builtins (`int`, `float`, `bytes.decode`,
`datetime.fromisoformat`) called directly on the raw bytes.

Errors name the table, column and type but never the value itself: values can be personal
data, and error messages end up in logs where they could not be erased.
"""

from __future__ import annotations

import binascii
import enum
import re
from collections.abc import Callable, Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Final
from uuid import UUID

from replicator.errors import ReplicatorError
from replicator.events import join_qualified
from replicator.keys import Infinity, Interval
from replicator.source.pgoutput import UNCHANGED, Column, Relation, TupleData, Type

Converter = Callable[[bytes], object]


class ValueConversionError(ReplicatorError, ValueError):
    """A column value whose text form cannot be turned into its Python value."""

    def __init__(self, problem: str, *, table: str, column: str, type_oid: int) -> None:
        super().__init__(f"cannot convert {table}.{column} (type OID {type_oid}): {problem}")
        self.table = table
        self.column = column
        self.type_oid = type_oid


class UnknownTypeError(ReplicatorError, LookupError):
    """A column whose type has no converter: an extension type, enum or domain not registered."""

    def __init__(self, type_oid: int, type_name: str | None, *, table: str, column: str) -> None:
        named = f" ({type_name})" if type_name else ""
        super().__init__(
            f"no conversion for type OID {type_oid}{named} of column {table}.{column}; register "
            "it in the TypeRegistry as an enum, domain, text-like type or array"
        )
        self.type_oid = type_oid
        self.table = table
        self.column = column


class _BadText(ValueError):
    """Raised by converters with a message that is safe to show (it holds no value)."""


_SPECIAL: Final = {b"infinity": Infinity.POSITIVE, b"-infinity": Infinity.NEGATIVE}


def _special(raw: bytes, what: str) -> Infinity:
    special = _SPECIAL.get(raw)
    if special is not None:
        return special
    if raw.endswith(b" BC"):
        raise _BadText(f"BC {what} values cannot be represented in Python")
    raise _BadText(f"not an ISO {what} within Python's years 1-9999 (is DateStyle ISO?)")


def _date(raw: bytes) -> date | Infinity:
    try:
        return date.fromisoformat(raw.decode())
    except ValueError:
        return _special(raw, "date")


def _timestamp(raw: bytes) -> datetime | Infinity:
    # One parser for timestamp and timestamptz: the text itself carries the offset or not.
    try:
        return datetime.fromisoformat(raw.decode())
    except ValueError:
        return _special(raw, "timestamp")


def _time(raw: bytes) -> time:
    try:
        return time.fromisoformat(raw.decode())
    except ValueError:
        if raw.startswith(b"24:00:00"):
            raise _BadText("time 24:00:00 cannot be represented by datetime.time") from None
        raise _BadText("not an ISO time") from None


_INTERVAL: Final = re.compile(
    rb"(?:([+-]?\d+) years? ?)?(?:([+-]?\d+) mons? ?)?(?:([+-]?\d+) days? ?)?"
    rb"(?:([+-]?)(\d+):(\d\d):(\d\d)(?:\.(\d{1,6}))?)?"
)


def _interval(raw: bytes) -> Interval | Infinity:
    """Parse IntervalStyle 'postgres', e.g. `-1 years -2 mons +3 days -04:05:06.789`."""
    match = _INTERVAL.fullmatch(raw) if raw else None
    if match is None:
        special = _SPECIAL.get(raw)
        if special is not None:
            return special
        raise _BadText("not an interval in IntervalStyle 'postgres'")
    years, months, days, sign, hours, minutes, seconds, fraction = match.groups()
    micros = 0
    if hours is not None:
        micros = (int(hours) * 3600 + int(minutes) * 60 + int(seconds)) * 1_000_000
        if fraction:
            micros += int(fraction.ljust(6, b"0"))
        if sign == b"-":
            micros = -micros
    return Interval(
        int(years or 0) * 12 + int(months or 0),
        int(days or 0),
        micros,
    )


def _bool(raw: bytes) -> bool:
    if raw == b"t":
        return True
    if raw == b"f":
        return False
    raise _BadText("a boolean must be 't' or 'f'")


def _numeric(raw: bytes) -> Decimal:
    return Decimal(raw.decode())  # exact at any precision; also 'NaN', 'Infinity', '-Infinity'


def _uuid(raw: bytes) -> UUID:
    return UUID(raw.decode())


def _bytea(raw: bytes) -> bytes:
    if not raw.startswith(b"\\x"):
        raise _BadText("bytea is not in hex format (set bytea_output = 'hex')")
    return binascii.unhexlify(raw[2:])


_text: Converter = bytes.decode

_ARRAY_QUOTED: Final = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ARRAY_BARE: Final = re.compile(rb'[^,{}"\\]+')
_ARRAY_ESCAPE: Final = re.compile(rb"\\(.)", re.DOTALL)
_OPEN, _CLOSE, _QUOTE, _COMMA = b"{", b"}", b'"', b","


def parse_array(raw: bytes, convert: Converter) -> list[object]:
    """Parse `array_out` text (e.g. `{{1,NULL},{"a\\"b",c}}`) into nested lists.

    The walk is over bytes: UTF-8 never puts an ASCII byte inside a multi-byte character, so
    braces, quotes, commas and backslashes can be found without decoding first. Every element
    type handled here uses ',' as its delimiter (only box uses ';').
    """
    if not raw.startswith(_OPEN):
        if raw.startswith(b"["):
            raise _BadText("arrays with lower bounds other than 1 cannot be lists")
        raise _BadText("an array must start with '{'")
    items, pos = _array_level(raw, 1, convert)
    if pos != len(raw):
        raise _BadText("unexpected text after the array's closing brace")
    return items


def _array_level(raw: bytes, pos: int, convert: Converter) -> tuple[list[object], int]:
    items: list[object] = []
    if raw[pos : pos + 1] == _CLOSE:
        return items, pos + 1
    while True:
        head = raw[pos : pos + 1]
        item: object
        if head == _OPEN:
            item, pos = _array_level(raw, pos + 1, convert)
        elif head == _QUOTE:
            match = _ARRAY_QUOTED.match(raw, pos)
            if match is None:
                raise _BadText("unterminated quoted array element")
            text = match[1]
            if b"\\" in text:
                text = _ARRAY_ESCAPE.sub(rb"\1", text)
            item, pos = convert(text), match.end()
        else:
            match = _ARRAY_BARE.match(raw, pos)
            if match is None:
                raise _BadText("malformed array element")
            text = match[0]
            item, pos = (None if text == b"NULL" else convert(text)), match.end()
        items.append(item)
        separator = raw[pos : pos + 1]
        pos += 1
        if separator == _CLOSE:
            return items, pos
        if separator != _COMMA:
            raise _BadText("malformed array: expected ',' or '}' after an element")


def _array_of(convert: Converter) -> Converter:
    def array(raw: bytes) -> list[object]:
        return parse_array(raw, convert)

    return array


# Built-in types: (oid, array oid, name, converter). OIDs are fixed in Postgres's pg_type.dat.
_BUILTINS: Final[tuple[tuple[int, int, str, Converter], ...]] = (
    (16, 1000, "bool", _bool),
    (17, 1001, "bytea", _bytea),
    (18, 1002, "char", _text),
    (19, 1003, "name", _text),
    (20, 1016, "int8", int),
    (21, 1005, "int2", int),
    (23, 1007, "int4", int),
    (25, 1009, "text", _text),
    (26, 1028, "oid", int),
    (28, 1011, "xid", int),
    (29, 1012, "cid", int),
    (114, 199, "json", _text),
    (142, 143, "xml", _text),
    (650, 651, "cidr", _text),
    (700, 1021, "float4", float),
    (701, 1022, "float8", float),
    (774, 775, "macaddr8", _text),
    (790, 791, "money", _text),  # its text depends on lc_monetary; kept as printed
    (829, 1040, "macaddr", _text),
    (869, 1041, "inet", _text),
    (1042, 1014, "bpchar", _text),
    (1043, 1015, "varchar", _text),
    (1082, 1182, "date", _date),
    (1083, 1183, "time", _time),
    (1114, 1115, "timestamp", _timestamp),
    (1184, 1185, "timestamptz", _timestamp),
    (1186, 1187, "interval", _interval),
    (1266, 1270, "timetz", _time),
    (1560, 1561, "bit", _text),
    (1562, 1563, "varbit", _text),
    (1700, 1231, "numeric", _numeric),
    (2950, 2951, "uuid", _uuid),
    (3614, 3643, "tsvector", _text),
    (3615, 3645, "tsquery", _text),
    (3802, 3807, "jsonb", _text),
    (4072, 4073, "jsonpath", _text),
)

BUILTIN_CONVERTERS: Final[dict[int, Converter]] = {oid: conv for oid, _, _, conv in _BUILTINS}
ARRAY_ELEMENTS: Final[dict[int, int]] = {array: oid for oid, array, _, _ in _BUILTINS}
"""Array type OID -> element type OID for the built-in types."""
_BUILTIN_NAMES: Final[dict[int, str]] = {
    **{oid: name for oid, _, name, _ in _BUILTINS},
    **{array: f"_{name}" for _, array, name, _ in _BUILTINS},
}
_FIRST_USER_OID: Final = 16384  # FirstNormalObjectId: OIDs below are fixed by Postgres


class _Kind(enum.Enum):
    TEXT = "text"
    DOMAIN = "domain"
    ARRAY = "array"


class TypeRegistry:
    """Converters for the types a database adds: enums, domains, extension types, their arrays.

    Built-in types are fixed; the rest have database-specific OIDs and are registered from a
    catalog query (`register_catalog_type`) or by hand. pgoutput Type messages only give a
    type's name, so `observe` records it for error messages; it cannot say what kind it is.
    """

    def __init__(self) -> None:
        self._kinds: dict[int, tuple[_Kind, int]] = {}
        self._names: dict[int, str] = {}

    def register_enum(self, oid: int, name: str | None = None) -> None:
        """An enum's text form is its label: a `str`."""
        self._register(oid, _Kind.TEXT, 0, name)

    def register_text(self, oid: int, name: str | None = None) -> None:
        """Keep the text form as `str` (e.g. citext, or any type whose text is its meaning)."""
        self._register(oid, _Kind.TEXT, 0, name)

    def register_domain(self, oid: int, base_oid: int, name: str | None = None) -> None:
        """A domain prints like its base type, so it converts like it."""
        self._register(oid, _Kind.DOMAIN, base_oid, name)

    def register_array(self, array_oid: int, element_oid: int, name: str | None = None) -> None:
        self._register(array_oid, _Kind.ARRAY, element_oid, name)

    def register_catalog_type(
        self, oid: int, name: str, typtype: str, typcategory: str, typbasetype: int, typelem: int
    ) -> bool:
        """Register from a `pg_type` row; returns False for kinds that have no conversion here.

        Arrays are told apart by typcategory 'A': `typelem` alone is not enough (e.g. `point`
        has one but is not an array).
        """
        if typtype == "e":
            self.register_enum(oid, name)
        elif typtype == "d":
            self.register_domain(oid, typbasetype, name)
        elif typcategory == "A" and typelem:
            self.register_array(oid, typelem, name)
        elif typtype == "b" and typcategory == "S":
            self.register_text(oid, name)
        else:
            return False
        return True

    def observe(self, message: Type) -> None:
        """Remember a type's name from a pgoutput Type message, for error messages."""
        if message.oid not in self._names:
            qualified = f"{message.namespace}.{message.name}" if message.namespace else message.name
            self._names[message.oid] = qualified

    def type_name(self, oid: int) -> str | None:
        return _BUILTIN_NAMES.get(oid) or self._names.get(oid)

    def base_type_name(self, oid: int) -> str | None:
        """The name of the type a column's values really have: domains resolved to their
        base (the encoder needs `date` or `jsonb`, not `public.wedding_day`)."""
        seen: set[int] = set()
        while oid not in seen:
            seen.add(oid)
            kind, target = self._kinds.get(oid, (None, 0))
            if kind is not _Kind.DOMAIN:
                return self.type_name(oid)
            oid = target
        return None

    def converter(self, oid: int, *, table: str = "?", column: str = "?") -> Converter:
        """The converter for a column type; raises `UnknownTypeError` naming the column."""
        seen: set[int] = set()
        current = oid
        while current not in seen:  # follow domains over domains, refusing cycles
            seen.add(current)
            builtin = BUILTIN_CONVERTERS.get(current)
            if builtin is not None:
                return builtin
            element = ARRAY_ELEMENTS.get(current)
            if element is not None:
                return _array_of(self.converter(element, table=table, column=column))
            kind, target = self._kinds.get(current, (None, 0))
            if kind is _Kind.TEXT:
                return _text
            if kind is _Kind.ARRAY:
                return _array_of(self.converter(target, table=table, column=column))
            if kind is not _Kind.DOMAIN:
                break
            current = target
        raise UnknownTypeError(oid, self.type_name(oid), table=table, column=column)

    def _register(self, oid: int, kind: _Kind, target: int, name: str | None) -> None:
        if oid < _FIRST_USER_OID:
            raise ValueError(f"type OID {oid} is built into Postgres and cannot be re-registered")
        self._kinds[oid] = (kind, target)
        if name is not None:
            self._names[oid] = name


def _unexpected(raw: object) -> object:
    """Values that are neither text nor NULL/UNCHANGED: binary format, which has no converter."""
    if raw is None or raw is UNCHANGED:
        return raw
    raise _BadText("binary-format values cannot be converted; replicate in text format")


class RowDecoder:
    """Converts the raw tuples of one relation; built once per Relation message.

    The server re-sends Relation messages after a schema change and after every reconnect, and
    a new RowDecoder is built then, so its converters always match the column types.
    """

    __slots__ = ("_columns", "_converters", "names", "table")

    def __init__(self, columns: Sequence[Column], registry: TypeRegistry, *, table: str) -> None:
        self.table = table
        self._columns = tuple(columns)
        self.names = tuple(column.name for column in self._columns)
        self._converters = tuple(
            registry.converter(column.type_oid, table=table, column=column.name)
            for column in self._columns
        )

    @classmethod
    def from_relation(cls, relation: Relation, registry: TypeRegistry) -> RowDecoder:
        table = (join_qualified(relation.namespace, relation.name) if relation.namespace
                 else relation.name)
        return cls(relation.columns, registry, table=table)

    def decode(self, raw: TupleData) -> tuple[object, ...]:
        """Python values for a raw tuple; NULL stays None and `UNCHANGED` stays the marker."""
        converters = self._converters
        if len(raw) != len(converters):
            raise ValueConversionError(
                f"row has {len(raw)} values but the relation has {len(converters)} columns",
                table=self.table,
                column="*",
                type_oid=0,
            )
        try:
            return tuple(
                [
                    convert(value) if type(value) is bytes else _unexpected(value)
                    for convert, value in zip(converters, raw, strict=True)
                ]
            )
        except Exception as exc:
            raise self._explain(raw) from exc

    def _explain(self, raw: TupleData) -> ValueConversionError:
        """Find the column that failed; slow, but only on the error path."""
        for column, convert, value in zip(self._columns, self._converters, raw, strict=True):
            try:
                if type(value) is bytes:
                    convert(value)
                else:
                    _unexpected(value)
            except Exception as exc:
                problem = str(exc) if isinstance(exc, _BadText) else type(exc).__name__
                length = f" ({len(value)} bytes)" if isinstance(value, bytes) else ""
                return ValueConversionError(
                    f"{problem}{length}",
                    table=self.table,
                    column=column.name,
                    type_oid=column.type_oid,
                )
        return ValueConversionError(
            "conversion failed but no single column reproduces it",
            table=self.table,
            column="*",
            type_oid=0,
        )


def decode_row(
    relation_columns: Sequence[Column],
    values: TupleData,
    registry: TypeRegistry,
    *,
    table: str = "?",
) -> tuple[object, ...]:
    """One-off conversion of a row; for streams, keep a `RowDecoder` per relation instead."""
    return RowDecoder(relation_columns, registry, table=table).decode(values)
