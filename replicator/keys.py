"""Row keys and the two Postgres values Python lacks: what both the transport and the archive
need, in a module that imports neither a Kafka client nor the source.

- `Infinity` and `Interval` are the Python values of Postgres's `'infinity'` (date/time types)
  and `interval`; the source produces them, the Avro encoding and the archive carry them.
- `canonical_key` is the **canonical key** of a row: the JSON of its key columns, the same
  for every spelling of one key (sorted names, no spaces, UTF-8; numeric normalised so 1.50
  and 1.5 agree, as they do in a Postgres index; timestamptz in UTC; uuid lower-case; bytea as
  `\\x` + hex). Kafka message keys, the sinks' merge and the segment headers' filters of
  deleted keys use it.
- `message_key` is the Kafka message key of a change: `schema.table`, a NUL byte, then the
  canonical key, e.g. `public.guests\\x00{"id":42}`. One row, one key, one partition.

(The other text form of a key, the key columns' Postgres text joined by U+001F as snapshot
parts hold it, is `archive.part.pg_key_text`.)
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final
from uuid import UUID

if TYPE_CHECKING:
    from replicator.events import ChangeEvent

__all__ = ["KEY_SEPARATOR", "Infinity", "Interval", "canonical_key", "message_key"]

KEY_SEPARATOR: Final = b"\x00"  # between the table and the canonical key in a message key


class Infinity(enum.Enum):
    """Postgres's 'infinity' and '-infinity' for date/time types, which Python has no value for."""

    POSITIVE = "infinity"
    NEGATIVE = "-infinity"

    def __repr__(self) -> str:
        return f"Infinity.{self.name}"


@dataclass(frozen=True, slots=True)
class Interval:
    """A Postgres interval: its three fields are independent (a month is not 30 days, a day is
    not 24 hours across a DST change), so it is not a `timedelta`."""

    months: int = 0
    days: int = 0
    microseconds: int = 0


def _canonical(value: Any) -> Any:
    """A JSON value that is the same for every representation of one Postgres value."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return value + 0.0  # -0.0 == 0.0 in Postgres; make them one key
    if isinstance(value, Decimal):
        return "NaN" if value.is_nan() else format(value.normalize(), "f")
    if isinstance(value, datetime):
        return (value if value.tzinfo is None else value.astimezone(UTC)).isoformat()
    if isinstance(value, (date, time)):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    if isinstance(value, Interval):
        return f"{value.months}m{value.days}d{value.microseconds}us"
    if isinstance(value, Infinity):
        return value.value
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    raise TypeError(f"a {type(value).__name__} cannot be part of a message key")


def canonical_key(key: Mapping[str, Any]) -> str:
    """The canonical JSON of a row's key columns: the same for every spelling of one key."""
    if len(key) == 1:  # the common key, once per change: one integer column, kept short
        for name, value in key.items():
            if type(value) is int:
                return f"{{{json.dumps(name, ensure_ascii=False)}:{value}}}"
    columns = {name: _canonical(value) for name, value in key.items()}
    return json.dumps(columns, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def message_key(event: ChangeEvent) -> bytes:
    """`schema.table` NUL canonical key: one row, one key, one partition."""
    return event.qualified_table.encode() + KEY_SEPARATOR + canonical_key(event.key).encode()
