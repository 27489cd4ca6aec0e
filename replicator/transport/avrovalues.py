"""Avro union datums back to Python values, and decoded envelopes back to events.

The other half of `transport.avro`: the names of the envelope's Value records, the bounds
that stand for infinities, and the one converter from the decoded form (fastavro's
`return_record_name=True`) to `ChangeEvent` and `TransactionRecord`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Final
from uuid import UUID

from replicator.events import TIER_BY_NAME, ChangeEvent, Op, TransactionRecord
from replicator.keys import Infinity, Interval
from replicator.position import ChangePosition, Lsn

__all__ = ["ARRAY", "DATE", "INTERVAL", "JSON", "NAMESPACE", "NUMERIC", "TIME", "TIMESTAMP",
           "TIMESTAMPTZ", "TIMETZ", "UUID_", "event_from_dict", "to_python",
           "transaction_from_dict"]

NAMESPACE: Final = "com.wedsync.replicator"
_N = f"{NAMESPACE}."
NUMERIC, TIMESTAMP, TIMESTAMPTZ = f"{_N}Numeric", f"{_N}Timestamp", f"{_N}TimestampTz"
DATE, TIME, TIMETZ, INTERVAL = f"{_N}Date", f"{_N}Time", f"{_N}TimeTz", f"{_N}Interval"
UUID_, JSON, ARRAY = f"{_N}Uuid", f"{_N}Json", f"{_N}Array"

INT_MAX, INT_MIN = 2**31 - 1, -(2**31)
LONG_MAX, LONG_MIN = 2**63 - 1, -(2**63)
EPOCH: Final = datetime(1970, 1, 1)
EPOCH_UTC: Final = datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_ORDINAL: Final = EPOCH.toordinal()


def _timestamp_of(fields: Mapping[str, int], epoch: datetime) -> datetime | Infinity:
    micros = fields["micros"]
    if micros == LONG_MAX:
        return Infinity.POSITIVE
    if micros == LONG_MIN:
        return Infinity.NEGATIVE
    return epoch + timedelta(microseconds=micros)


def _date_of(fields: Mapping[str, int]) -> date | Infinity:
    days = fields["days"]
    if days == INT_MAX:
        return Infinity.POSITIVE
    if days == INT_MIN:
        return Infinity.NEGATIVE
    return date.fromordinal(days + EPOCH_ORDINAL)


def _time_of(micros: int, tzinfo: timezone | None = None) -> time:
    seconds, micro = divmod(micros, 1_000_000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return time(hour, minute, second, micro, tzinfo=tzinfo)


def _interval_of(fields: Mapping[str, int]) -> Interval | Infinity:
    months, days, micros = fields["months"], fields["days"], fields["micros"]
    if (months, days, micros) == (INT_MAX, INT_MAX, LONG_MAX):
        return Infinity.POSITIVE
    if (months, days, micros) == (INT_MIN, INT_MIN, LONG_MIN):
        return Infinity.NEGATIVE
    return Interval(months, days, micros)


_DECODERS: Final[dict[str, Callable[[Mapping[str, Any]], Any]]] = {
    NUMERIC: lambda f: Decimal(f["text"]),
    TIMESTAMP: lambda f: _timestamp_of(f, EPOCH),
    TIMESTAMPTZ: lambda f: _timestamp_of(f, EPOCH_UTC),
    DATE: _date_of,
    TIME: lambda f: _time_of(f["micros"]),
    TIMETZ: lambda f: _time_of(f["micros"], timezone(timedelta(seconds=f["offset_s"]))),
    INTERVAL: _interval_of,
    UUID_: lambda f: UUID(f["text"]),
    JSON: lambda f: f["text"],  # json stays its exact text, as in replicator.source.values
    ARRAY: lambda f: [to_python(item) for item in f["items"]],
}


def to_python(value: Any) -> Any:
    """A decoded Value (or a decoded row, a dict of them) as the Python value it was made from.

    Expects fastavro's `return_record_name=True` form, which `decode_event` returns.
    """
    cls = type(value)
    if cls is tuple:
        name, fields = value
        return _DECODERS[name](fields)
    if cls is dict:
        return {column: to_python(item) for column, item in value.items()}
    return value


def event_from_dict(decoded: Mapping[str, Any], *, python_values: bool = True,
                    python_key: bool = True, op: Op | None = None,
                    key: Mapping[str, Any] | None = None) -> ChangeEvent:
    """The `ChangeEvent` a decoded envelope (a Kafka message's or an archived record's) was
    made from; `ts_ms`, processing time, is not part of it. The one converter from the
    decoded form to events.

    *python_values* / *python_key*: `before`/`after` and the key as the Python values they
    were made from (`to_python`), or left as decoded (the tagged form `archive.render` turns
    into Postgres text without a round trip: what a restore merges and writes). *op* and
    *key* replace the record's own (an update that moved its key becomes a delete of the old
    key)."""
    source = decoded["source"]
    before, after = decoded["before"], decoded["after"]
    keys = decoded["key"] if key is None else key
    if python_values:
        before = None if before is None else to_python(before)
        after = None if after is None else to_python(after)
    return ChangeEvent(
        op=op or _OPS[decoded["op"]],
        schema=source["schema"],
        table=source["table"],
        position=ChangePosition(Lsn(source["lsn"]), source["seq"]),
        commit_ts_us=source["ts_us"],
        xid=source["txId"],
        key=to_python(keys) if python_key else keys,
        before=before,
        after=after,
        unchanged=tuple(decoded["unchanged"]),
        origin=source["origin"],
        db=source["db"],
        tier=TIER_BY_NAME[decoded["priority"]],
        wedding_id=decoded["wedding_id"],
    )


_OPS: Final[dict[str, Op]] = {op.value: op for op in Op}


def transaction_from_dict(decoded: Mapping[str, Any]) -> TransactionRecord:
    return TransactionRecord(
        commit_lsn=Lsn.of(decoded["commit_lsn"]),
        end_lsn=Lsn.of(decoded["end_lsn"]),
        commit_ts_us=decoded["commit_ts_us"],
        xid=decoded["xid"],
        counts=dict(decoded["counts"]),
        origin=decoded["origin"],
        tier_counts=dict(decoded.get("tier_counts") or {}),
        digests=dict(decoded.get("digests") or {}),
    )
