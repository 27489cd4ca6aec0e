"""The raw sink path: a change goes into its segment without being decoded.

A change's Kafka value is the Avro datum of the envelope the segments are written with, behind
a single-object or Confluent prefix. The capture also sends, as headers, what a segment's
header and filters need (`transport/kafka.py`): `table`, `op`, `facts` (commit LSN, seq and
commit time, packed) and `wedding`. With those, the sink checks the prefix names its own
envelope schema (the fingerprint, or the registry id learnt for it), strips it, and keeps the
body as it is: the segment is an Avro object container of those bodies, readable by any Avro
reader, byte for byte what decoding and writing again would give.

Decoded instead (`SinkWorker._add_change`), as before:
- a message without the `facts` header (an older capture, another producer);
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

import struct
from collections.abc import Callable, Sequence
from typing import Final

from replicator.archive.segment import EventFacts

__all__ = ["raw_change"]

_FACTS: Final = struct.Struct(">QIq")
# Only these three ops go the raw way: c, u, and d with a wedding (module docstring).
_OPS: Final = {b"c": "c", b"u": "u", b"d": "d"}


def raw_change(headers: Sequence[tuple[str, bytes]], value: bytes,
               own_body: Callable[[bytes], bytes | None]) -> tuple[EventFacts, bytes] | None:
    """The change's segment facts and Avro body from its *headers* and *value*, or None when
    it must be decoded (module docstring). *own_body* is `EventCodec.own_event_body`."""
    table = op = facts = wedding = None
    for name, data in headers:
        if name == "facts":
            facts = data
        elif name == "table":
            table = data
        elif name == "op":
            op = _OPS.get(data)
        elif name == "wedding":
            wedding = data
    if facts is None or table is None or op is None or len(facts) != _FACTS.size:
        return None
    if wedding is None and op == "d":
        return None
    body = own_body(value)
    if body is None:
        return None
    lsn, seq, ts_us = _FACTS.unpack(facts)
    try:
        return ((table.decode(), (lsn, seq), ts_us, op,
                 None if wedding is None else wedding.decode(), None), body)
    except UnicodeDecodeError:
        return None
