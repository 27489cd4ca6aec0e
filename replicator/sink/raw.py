"""The raw sink path: a change goes into its segment without being decoded.

A change's Kafka value is the Avro datum of the envelope the segments are written with, behind
a single-object or Confluent prefix. The capture also sends, as headers, what a segment's
header and filters need (`transport/kafka.py`): `table`, `op`, `lsn`, `seq`, `ts_us` and
`wedding`. With those, the sink checks the prefix names its own envelope schema (the
fingerprint, or the registry id learnt for it), strips it, and keeps the body as it is: the
segment is an Avro object container of those bodies, readable by any Avro reader, byte for
byte what decoding and writing again would give.

Transaction records likewise (`raw_transaction`): `lsn`, `end_lsn`, `ts_us`, `xid`, `counts`
and `tiers` are what the completeness tracker and the segment's header need; the record's
digests stay in its body, which `verify` reads from the archive.

Decoded instead (`SinkWorker._add_change`, `_add_transaction`), as before:
- a message without the `ts_us` header (an older capture, another producer);
- a value under another writer schema (an older envelope: it is resolved and written anew);
- a snapshot row (`op` r): snapshot rows become parts, which need the values;
- a delete without a wedding: the segment's filter of deleted keys needs its key.

What this trusts: that the headers and the body of a message from the capture agree. The
topics are the capture's own (only it writes them); a message whose body does not decode
although its prefix and headers look right can only come from a writer that already can
write wrong data, and a restore reading such a segment stops with an error naming the
segment, not with wrong rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Final

from replicator.archive.segment import EventFacts
from replicator.position import Lsn

__all__ = ["raw_change", "raw_transaction"]

# Only these three ops go the raw way: c, u, and d with a wedding (module docstring).
_OPS: Final = {b"c": "c", b"u": "u", b"d": "d"}
_TX_HEADERS: Final = frozenset({"lsn", "end_lsn", "ts_us", "xid", "counts", "tiers"})
# Table names as read, one string per table for every buffered change (bounded: a table
# past the bound is decoded each time).
_tables: dict[bytes, str] = {}
_TABLES_KEPT: Final = 10_000


_new_lsn: Any = int.__new__  # an Lsn without Lsn()'s checks: `_parse_lsn` made the value


def _parse_lsn(text: bytes) -> Lsn:
    """An `lsn` or `end_lsn` header: the Postgres form (`16/B374D848`), each half 1 to 8 hex
    digits; ValueError otherwise."""
    high, slash, low = text.partition(b"/")
    if not slash or not 0 < len(high) <= 8 or not 0 < len(low) <= 8 \
            or not (high + low).isalnum():
        raise ValueError(f"invalid LSN {text!r}")
    value: Lsn = _new_lsn(Lsn, (int(high, 16) << 32) | int(low, 16))
    return value


# The same few texts come again and again (every change of a transaction): parsed once.
_lsn = lru_cache(maxsize=8)(_parse_lsn)


@lru_cache(maxsize=1024)
def _counts_header(text: bytes) -> dict[str, int] | None:
    """A transaction record's `counts` or `tiers` header (`{"public.guests":1}`): names to
    numbers, or None when it is not. The same few texts repeat, so each is read once; the
    dict returned is shared: read it, never change it (`transaction_from_dict` copies)."""
    try:
        value = json.loads(text)
    except ValueError:  # a JSONDecodeError or UnicodeDecodeError is a ValueError
        return None
    if isinstance(value, dict) and all(type(k) is str and type(n) is int
                                       for k, n in value.items()):
        return value
    return None


def raw_change(headers: Sequence[tuple[str, bytes]], value: bytes,
               own_body: Callable[[bytes], bytes | None]) -> tuple[EventFacts, bytes] | None:
    """The change's segment facts and Avro body from its *headers* and *value*, or None when
    it must be decoded (module docstring). *own_body* is `EventCodec.own_event_body`."""
    table = op = lsn = seq = ts = wedding = None
    for name, data in headers:
        if name == "table":
            table = data
        elif name == "op":
            op = _OPS.get(data)
        elif name == "lsn":
            lsn = data
        elif name == "seq":
            seq = data
        elif name == "ts_us":
            ts = data
        elif name == "wedding":
            wedding = data
    if ts is None or table is None or op is None or lsn is None or seq is None:
        return None
    if wedding is None and op == "d":
        return None
    body = own_body(value)
    if body is None:
        return None
    try:
        qualified = _tables.get(table)
        if qualified is None:
            qualified = table.decode()
            if len(_tables) < _TABLES_KEPT:
                _tables[table] = qualified
        return ((qualified, (_lsn(lsn), int(seq)), int(ts), op,
                 None if wedding is None else wedding.decode(), None), body)
    except ValueError:  # not the capture's headers (UnicodeDecodeError is a ValueError)
        return None


def raw_transaction(headers: Sequence[tuple[str, bytes]], value: bytes,
                    own_body: Callable[[bytes], bytes | None]
                    ) -> tuple[dict[str, Any], bytes] | None:
    """A transaction record's facts (what the completeness tracker and the segment's header
    need: positions, commit time, xid, counts per table and per tier; not its digests, which
    stay in the body) and its Avro body, from its *headers* and *value*; None when it must be
    decoded. *own_body* is `EventCodec.own_transaction_body`."""
    found: dict[str, bytes] = {}
    for name, data in headers:
        if name in _TX_HEADERS:
            found[name] = data
    if len(found) != len(_TX_HEADERS):
        return None
    body = own_body(value)
    if body is None:
        return None
    counts = _counts_header(found["counts"])
    tiers = _counts_header(found["tiers"])
    if counts is None or tiers is None:
        return None
    try:
        return {"commit_lsn": _parse_lsn(found["lsn"]), "end_lsn": _parse_lsn(found["end_lsn"]),
                "commit_ts_us": int(found["ts_us"]), "xid": int(found["xid"]),
                "counts": counts, "tier_counts": tiers, "origin": None, "digests": {}}, body
    except ValueError:  # not the capture's headers
        return None
