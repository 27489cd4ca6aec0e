"""Avro encoding of `ChangeEvent` and `TransactionRecord` (schemas in `schemas/*.avsc`).

Two framings, chosen by the caller:

- **Avro single-object encoding** (the default): `C3 01`, the 8-byte little-endian
  CRC-64-AVRO fingerprint of the schema's parsing canonical form, then the Avro binary body.
  Any Avro library can read it given the schema; the fingerprint says which schema.
- **Confluent wire format** (when a schema registry is configured): byte `00`, the 4-byte
  big-endian schema id the registry gave, then the same body.

`decode_event` / `decode_transaction` accept both, check the marker and the fingerprint or id,
and return fastavro's dict with `return_record_name=True`: a Value held in one of the named
records comes back as `(full record name, fields)`, because `Numeric`, `Uuid` and `Json` all
have one string field and only the name tells them apart. `to_python` turns those back into
the Python values of `replicator.source.values`; `event_from_dict` rebuilds the `ChangeEvent`.

Why a hint is needed: a json/jsonb value is a `str` in Python, like text, and Postgres's
`infinity` is one `Infinity` marker for date, timestamp, timestamptz and interval. So the
encoder takes `column_types`, column name -> Postgres base type name (`jsonb`, `_jsonb`,
`date`, `timestamptz`, ...); only json/jsonb and the four date/time types change the
encoding, every other name is accepted and ignored. An `Infinity` without a hint is an
`EncodeError` (naming the column, never the value) rather than a guess.

Infinity is written as Postgres stores it: the integer field at its maximum (`infinity`) or
minimum (`-infinity`), e.g. `Date.days = 2147483647`; intervals use PostgreSQL 17's encoding,
all three fields at their maximum or minimum.

Speed: schemas are parsed and fingerprinted once; the union branch of every value is named
with fastavro's tuple notation (`("long", 5)`), which spares fastavro from trying each branch
of a 16-way union in turn (about half of the encoding time otherwise).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from time import time_ns
from typing import Any, Final, cast

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from replicator import __version__
from replicator.events import ChangeEvent, TransactionRecord
from replicator.transport.avroencode import (
    CONNECTOR,
    CodecError,
    EncodeError,
    EnvelopeWriter,
    _row,
)
from replicator.transport.avrovalues import (
    ARRAY,
    DATE,
    INTERVAL,
    JSON,
    NAMESPACE,
    NUMERIC,
    TIME,
    TIMESTAMP,
    TIMESTAMPTZ,
    TIMETZ,
    UUID_,
    event_from_dict,
    to_python,
    transaction_from_dict,
)
from replicator.transport.avrowrite import Unsupported

__all__ = [
    "ARRAY",
    "CONNECTOR",
    "CONTENT_DIGEST",
    "DATE",
    "INTERVAL",
    "JSON",
    "NAMESPACE",
    "NUMERIC",
    "TIME",
    "TIMESTAMP",
    "TIMESTAMPTZ",
    "TIMETZ",
    "UUID_",
    "CodecError",
    "EncodeError",
    "EventCodec",
    "UnknownSchemaError",
    "body_digest",
    "content_digest",
    "digest_text",
    "event_from_dict",
    "load_schema",
    "to_python",
    "transaction_from_dict",
]

SCHEMA_DIR: Final = Path(__file__).resolve().parents[2] / "schemas"
SINGLE_OBJECT_MARKER: Final = b"\xc3\x01"
CONFLUENT_MAGIC: Final = 0
_CONFLUENT_BYTE: Final = bytes([CONFLUENT_MAGIC])
DIGEST_MODULUS: Final = 1 << 128


#: The kind of content digest a transaction record's text names by this prefix: the BLAKE2b
#: of each change's Avro body with `ts_ms` written as 0. `ts_ms` is the processing time, so a
#: change sent again (the capture resumes from the slot's confirmed position after a
#: reconnect) has other bytes there, and an archive may keep one copy of the change and the
#: other copy's transaction record; the content is the same. A digest text without the
#: prefix (transaction records written before it) covers the whole body (`body_digest`).
CONTENT_DIGEST: Final = "c2:"


def body_digest(value: bytes | bytearray | memoryview) -> int:
    """The 128-bit BLAKE2b of an encoded change's whole Avro body (the message value less its
    framing: 10 bytes of single-object header, or 5 of the Confluent wire format): the
    content digest of transaction records without the `CONTENT_DIGEST` prefix."""
    view = memoryview(value)
    start = 10 if bytes(view[:2]) == SINGLE_OBJECT_MARKER else 5
    return int.from_bytes(hashlib.blake2b(view[start:], digest_size=16).digest(), "big")


def content_digest(body: bytes | bytearray | memoryview, ts_ms: tuple[int, int]) -> int:
    """The content digest of one change (`CONTENT_DIGEST`): the 128-bit BLAKE2b of its Avro
    *body* with the bytes of `ts_ms`, at *ts_ms* = (start, end), replaced by a 0."""
    view = memoryview(body)
    start, end = ts_ms
    digest = hashlib.blake2b(view[:start], digest_size=16)
    digest.update(b"\x00")
    digest.update(view[end:])
    return int.from_bytes(digest.digest(), "big")


def digest_text(total: int, *, content: bool = True) -> str:
    """A transaction record's digest text of *total* (a sum of digests): with the
    `CONTENT_DIGEST` prefix, or, for a sum of `body_digest`s, without it."""
    return f"{CONTENT_DIGEST if content else ''}{total % DIGEST_MODULUS:032x}"

EVENT_RECORD: Final = f"{NAMESPACE}.ChangeEvent"
TRANSACTION_RECORD: Final = f"{NAMESPACE}.TransactionRecord"


class UnknownSchemaError(CodecError):
    """The message was written with a schema this codec does not know."""

    def __init__(
        self, message: str, *, fingerprint: bytes | None = None, schema_id: int | None = None
    ) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint
        self.schema_id = schema_id


def load_schema(name: str) -> dict[str, Any]:
    """The JSON of `schemas/<name>.avsc`."""
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    return schema


# --- the codec -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Schema:
    record: str  # full name of the top-level record
    parsed: Any  # fastavro's parsed schema
    json: str  # canonical JSON, as registered
    fingerprint: bytes  # CRC-64-AVRO, little-endian, as in single-object encoding

    @classmethod
    def of(cls, schema: Mapping[str, Any] | str) -> _Schema:
        raw = json.loads(schema) if isinstance(schema, str) else dict(schema)
        canonical = to_parsing_canonical_form(raw)
        parsed = cast(dict[str, Any], parse_schema(raw))
        return cls(
            record=str(parsed["name"]),
            parsed=parsed,
            json=canonical,
            fingerprint=bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")),
        )


class EventCodec:
    """Encodes and decodes the envelope and the transaction record.

    `name` is the topic prefix (the envelope's `source.name`); `clock` gives the processing
    time in nanoseconds (the envelope's `ts_ms`). Encoding is thread-compatible but not
    thread-safe; decoding is stateless apart from the schemas learnt with `add_writer_schema`.
    """

    def __init__(self, name: str = "", *, clock: Callable[[], int] = time_ns) -> None:
        self.name = name
        self._clock = clock
        self._event = _Schema.of(load_schema("change_event"))
        self._transaction = _Schema.of(load_schema("transaction"))
        self._header_event = SINGLE_OBJECT_MARKER + self._event.fingerprint
        self._fast = EnvelopeWriter(load_schema("change_event"), name)
        self._header_transaction = SINGLE_OBJECT_MARKER + self._transaction.fingerprint
        # Writer schemas by fingerprint and by registry id; the reader is always our own.
        self._by_fingerprint: dict[bytes, _Schema] = {
            self._event.fingerprint: self._event,
            self._transaction.fingerprint: self._transaction,
        }
        self._by_id: dict[int, _Schema] = {}
        # Earlier versions of our own schemas (schemas/history/): messages already on the
        # topics stay readable after the envelope grows a field.
        for old in sorted((SCHEMA_DIR / "history").glob("*.avsc")):
            self.add_writer_schema(json.loads(old.read_text()))

    # The schemas, for the registry and for Avro container files.

    @property
    def event_schema(self) -> str:
        """Parsing canonical form of the envelope schema (what is registered and fingerprinted)."""
        return self._event.json

    @property
    def transaction_schema(self) -> str:
        return self._transaction.json

    @property
    def parsed_event_schema(self) -> Any:
        return self._event.parsed

    @property
    def parsed_transaction_schema(self) -> Any:
        return self._transaction.parsed

    @property
    def event_fingerprint(self) -> bytes:
        return self._event.fingerprint

    @property
    def transaction_fingerprint(self) -> bytes:
        return self._transaction.fingerprint

    def add_writer_schema(self, schema: Mapping[str, Any] | str, *, schema_id: int | None = None
                          ) -> None:
        """Accept messages written with *schema* (by fingerprint, and by *schema_id* when it is
        a registry's id for it). A schema other than ours is resolved to ours by Avro's rules,
        so older or newer envelopes can be read as long as they are compatible."""
        writer = _Schema.of(schema)
        if writer.record not in (EVENT_RECORD, TRANSACTION_RECORD):
            raise CodecError(f"schema {writer.record} is neither {EVENT_RECORD} nor "
                             f"{TRANSACTION_RECORD}")
        writer = self._by_fingerprint.setdefault(writer.fingerprint, writer)
        if schema_id is not None:
            self._by_id[schema_id] = writer

    def knows_schema_id(self, schema_id: int) -> bool:
        return schema_id in self._by_id

    # Encoding.

    def event_datum(
        self, event: ChangeEvent, column_types: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """The Avro datum of *event*, for fastavro writers (e.g. object container files)."""
        hints = column_types or None
        try:
            key = _row(event.key, hints)
            before = None if event.before is None else ("map", _row(event.before, hints))
            after = None if event.after is None else ("map", _row(event.after, hints))
        except EncodeError as exc:
            raise EncodeError(
                f"cannot encode {event.qualified_table} at {event.position}: {exc}"
            ) from None
        commit_lsn, seq = event.position
        commit_us = event.commit_ts_us
        return {
            "before": before,
            "after": after,
            "key": key,
            "unchanged": list(event.unchanged),
            "op": str(event.op),
            "ts_ms": self._clock() // 1_000_000,
            "source": {
                "version": __version__,
                "connector": CONNECTOR,
                "name": self.name,
                "db": event.db,
                "schema": event.schema,
                "table": event.table,
                "lsn": int(commit_lsn),
                "txId": event.xid,
                "ts_ms": commit_us // 1000,
                "ts_us": commit_us,
                "seq": seq,
                "origin": event.origin,
            },
            "priority": str(event.tier),
            "wedding_id": event.wedding_id,
        }

    def encode_event(
        self,
        event: ChangeEvent,
        column_types: Mapping[str, str] | None = None,
        *,
        schema_id: int | None = None,
    ) -> bytes:
        """Single-object encoding, or the Confluent wire format with *schema_id*."""
        header = _prefix(self._header_event, schema_id)
        try:
            out = bytearray(header)
            self._fast.write(out, event, column_types or None, self._clock() // 1_000_000)
            return bytes(out)
        except (Unsupported, EncodeError):
            pass  # fastavro writes it, or says what is wrong with it
        return self._write(self._event, self._header_event, self.event_datum(event, column_types),
                           schema_id)

    def encode_event_digested(
        self, event: ChangeEvent, column_types: Mapping[str, str] | None = None, *,
        schema_id: int | None = None,
    ) -> tuple[bytes, int]:
        """`encode_event`, and the change's content digest (`content_digest`)."""
        header = _prefix(self._header_event, schema_id)
        out = bytearray(header)
        try:
            start, end = self._fast.write(out, event, column_types or None,
                                          self._clock() // 1_000_000)
        except (Unsupported, EncodeError):
            datum = self.event_datum(event, column_types)
            value = self._write(self._event, self._header_event, datum, schema_id)
            body = self._write(self._event, b"", datum | {"ts_ms": 0}, None)
            return value, int.from_bytes(hashlib.blake2b(body, digest_size=16).digest(), "big")
        head = len(header)
        return bytes(out), content_digest(memoryview(out)[head:], (start - head, end - head))

    def transaction_datum(self, record: TransactionRecord) -> dict[str, Any]:
        return {
            "commit_lsn": int(record.commit_lsn),
            "end_lsn": int(record.end_lsn),
            "commit_ts_us": record.commit_ts_us,
            "xid": record.xid,
            "origin": record.origin,
            "counts": record.counts,
            "total": record.total,
            "tier_counts": record.tier_counts,
            "digests": record.digests,
        }

    def encode_transaction(self, record: TransactionRecord, *, schema_id: int | None = None
                           ) -> bytes:
        out = bytearray(_prefix(self._header_transaction, schema_id))
        try:  # the compiled writer (`avroencode`): the same bytes as fastavro's, faster
            self._fast.write_transaction(out, record)
        except (Unsupported, TypeError, ValueError, OverflowError, KeyError):
            return self._write(self._transaction, self._header_transaction,
                               self.transaction_datum(record), schema_id)
        return bytes(out)

    def _write(self, schema: _Schema, header: bytes, datum: dict[str, Any],
               schema_id: int | None) -> bytes:
        buffer = io.BytesIO()
        buffer.write(_prefix(header, schema_id))
        try:
            schemaless_writer(buffer, schema.parsed, datum)
        except (ValueError, TypeError, OverflowError) as exc:
            # fastavro's messages can quote the datum; say only which record failed.
            raise EncodeError(f"cannot write a {schema.record}: {type(exc).__name__}") from exc
        return buffer.getvalue()

    # Decoding.

    def decode_event(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """The envelope as fastavro reads it (record-typed Values as `(name, fields)`)."""
        return self._read(data, self._event)[0]

    def decode_event_body(self, data: bytes | bytearray | memoryview
                          ) -> tuple[dict[str, Any], bytes]:
        """The envelope decoded, and its Avro binary body under this codec's own envelope
        schema, ready for an object container file's block.

        The body is the message's own bytes when it was written with this schema and holds
        exactly that one record (the usual case: nothing is encoded again, so the archive
        keeps the message byte for byte); otherwise (an older or foreign writer schema,
        trailing bytes) it is the decoded record encoded again."""
        return self._with_body(data, self._event)

    def own_event_body(self, data: bytes) -> bytes | None:
        """The Avro body of *data* when its prefix (single-object fingerprint, or a registry
        id learnt for it) names this codec's own envelope schema, else None. Nothing is
        decoded: the raw sink path (`sink/raw.py`)."""
        return self._own_body(data, self._header_event, self._event)

    def own_transaction_body(self, data: bytes) -> bytes | None:
        """`own_event_body` for a transaction record."""
        return self._own_body(data, self._header_transaction, self._transaction)

    def _own_body(self, data: bytes, header: bytes, schema: _Schema) -> bytes | None:
        if data[:10] == header:
            return data[10:]
        if data[:1] == _CONFLUENT_BYTE and len(data) >= 5 and self._by_id.get(
                int.from_bytes(data[1:5], "big")) is schema:
            return data[5:]
        return None

    def decode_transaction_body(self, data: bytes | bytearray | memoryview
                                ) -> tuple[dict[str, Any], bytes]:
        """`decode_event_body` for a transaction record."""
        return self._with_body(data, self._transaction)

    def _with_body(self, data: bytes | bytearray | memoryview, reader: _Schema
                   ) -> tuple[dict[str, Any], bytes]:
        decoded, writer, body, used = self._read(data, reader)
        if writer is reader and used == len(body):
            return decoded, bytes(body)
        return decoded, self._body(reader, decoded)

    def _body(self, schema: _Schema, decoded: Mapping[str, Any]) -> bytes:
        """*decoded* (as `_read` returns it) as Avro binary under *schema*."""
        buffer = io.BytesIO()
        try:
            schemaless_writer(buffer, schema.parsed, dict(decoded))
        except (ValueError, TypeError, OverflowError, KeyError) as exc:
            raise EncodeError(f"cannot write a {schema.record}: {type(exc).__name__}"
                              ) from exc
        return buffer.getvalue()

    def decode_transaction(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        return self._read(data, self._transaction)[0]

    def _read(self, data: bytes | bytearray | memoryview, reader: _Schema
              ) -> tuple[dict[str, Any], _Schema, memoryview, int]:
        """The decoded record, its writer schema, its body and how many bytes of the body
        the record took."""
        view = memoryview(data)
        if bytes(view[:2]) == SINGLE_OBJECT_MARKER and len(view) >= 10:
            fp = bytes(view[2:10])
            writer = self._by_fingerprint.get(fp)
            if writer is None:
                raise UnknownSchemaError(
                    f"unknown schema fingerprint {fp.hex()} (CRC-64-AVRO, as stored): this codec "
                    f"reads {reader.record} {reader.fingerprint.hex()}; add the writer's schema "
                    "with add_writer_schema() or upgrade the reader",
                    fingerprint=fp,
                )
            body = view[10:]
        elif len(view) >= 5 and view[0] == CONFLUENT_MAGIC:
            schema_id = int.from_bytes(view[1:5], "big")
            found = self._by_id.get(schema_id)
            if found is None:
                raise UnknownSchemaError(
                    f"unknown schema registry id {schema_id}: fetch it from the registry and "
                    "pass it to add_writer_schema(schema, schema_id=...)",
                    schema_id=schema_id,
                )
            writer, body = found, view[5:]
        else:
            raise CodecError(
                f"not an Avro single-object or Confluent-framed message (starts with "
                f"{bytes(view[:2]).hex() or 'nothing'})"
            )
        if writer.record != reader.record:
            raise CodecError(f"message holds a {writer.record}, not a {reader.record}")
        stream = io.BytesIO(body)
        try:
            decoded = schemaless_reader(
                stream,
                writer.parsed,
                None if writer is reader else reader.parsed,
                return_record_name=True,
            )
        except (EOFError, ValueError, IndexError, KeyError) as exc:
            raise CodecError(f"corrupt {writer.record} body: {type(exc).__name__}") from exc
        if not isinstance(decoded, dict):
            raise CodecError(f"a {writer.record} body did not decode to a record")
        return decoded, writer, body, stream.tell()


def _prefix(single_object: bytes, schema_id: int | None) -> bytes:
    """*single_object* (marker, fingerprint), or the Confluent framing of *schema_id*."""
    return single_object if schema_id is None else _CONFLUENT_BYTE + schema_id.to_bytes(4, "big")


_PRIMITIVES: Final = frozenset({"boolean", "long", "double", "string", "bytes"})


def archived_values(row: Mapping[str, Any], column_types: Mapping[str, str] | None = None
                    ) -> dict[str, Any]:
    """A row of Python values as an archive reader gets it back: the Value union datums as
    fastavro decodes them (primitives bare, logical types as `(name, fields)`). Verify uses it
    to compare a live database with a restore through one rendering."""
    out: dict[str, Any] = {}
    for name, datum in _row(row, column_types or None).items():
        out[name] = _bare(datum)
    return out


def _bare(datum: Any) -> Any:
    if type(datum) is tuple and datum[0] in _PRIMITIVES:
        return datum[1]
    if type(datum) is tuple and datum[0] == ARRAY:
        return (ARRAY, {"items": [_bare(item) for item in datum[1]["items"]]})
    return datum
