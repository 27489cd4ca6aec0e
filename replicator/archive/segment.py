"""Segments: the Avro object container files of the archive (names: `archive.layout`).

Two kinds, both plain Avro object container files (OCF) once decrypted, so `fastavro`,
`avro-tools tojson` or Spark open them with the schema stored inside:

- a **change segment**, `segments/<table>/<first>-<last>.seg`, holds change events of one
  table, as records of the Kafka envelope schema (`schemas/change_event.avsc`), built by the
  same code that builds the Kafka messages (`EventCodec.event_datum`);
- a **transaction segment**, `transactions/<first>-<last>.seg`, holds transaction records
  (`schemas/transaction.avsc`).

Records are in position order, `(source.lsn, source.seq)` for changes and `commit_lsn` for
transactions, and no position appears twice: the encoders sort, and drop a repeated position
(an at-least-once redelivery) keeping its first occurrence.

**Names.** `<first>` and `<last>` are the first and last commit LSNs as `Lsn.hex_key()`, so a
LIST of `segments/<table>/` returns the table's segments in position order. `<table>` is the
qualified table name percent-encoded with `quote(table, safe="")` (`public.guests` stays as it
is; a `/` in a quoted identifier becomes `%2F`). A sink appends `-<digest>` (a hash of the
object's bytes) before `.seg`, because one transaction's changes to one table can reach it in
two batches, and two segments of the same LSN range must not collide.

**Header.** The OCF metadata carries, besides Avro's own `avro.schema` and `avro.codec`:

| key | value (UTF-8 text) |
|---|---|
| `wedsync.format` | format version of these keys, `1` |
| `wedsync.kind` | `changes` or `transactions` |
| `wedsync.table` | qualified table (`public.guests`); empty for transactions |
| `wedsync.first_lsn`, `wedsync.first_seq` | position of the first record (`16/B374D848`, `0`) |
| `wedsync.last_lsn`, `wedsync.last_seq` | position of the last record (seq is 0 for transactions) |
| `wedsync.min_commit_ts_us`, `wedsync.max_commit_ts_us` | commit-time range, µs since the epoch |
| `wedsync.rows` | number of records |
| `wedsync.ops` | records per op code, JSON (`{"c":3,"u":1}`); `{}` for transactions |
| `wedsync.wedding_ids` | the `wedding_id`s present, a sorted JSON array, or `many` (below) |
| `wedsync.schema_fingerprint` | CRC-64-AVRO of the records' schema, hex, as in Kafka messages |

The wedding list is capped so the header stays small enough to fetch first (every header this
module writes fits in `HEADER_PREFIX_SIZE`): above `MAX_WEDDING_IDS` ids, or
`MAX_WEDDING_IDS_BYTES` bytes of JSON, it is the word `many`, and the ids go into a Bloom
filter instead (`wedsync.wedding_bloom`, `archive.bloom`; up to `MAX_BLOOM_ITEMS` ids, beyond
which a restore of one wedding must read the segment). `wedsync.unknown_deletes` counts the
deletes whose wedding is not known (a key-only before image) and `wedsync.delete_key_bloom`
holds their keys (canonical JSON, up to `MAX_DELETE_KEYS`, 20 bits per key), so a wedding
restore reads such a segment only if one of the wedding's keys may be among them. These
three keys are absent from older segments, which read as before. `ops` shows truncates,
which concern every wedding of the table.

**Verification.** The decoders check the content against the header while they stream: the
table of every record, strict position order, and at the end the first and last positions,
commit-time range, row count, op counts and wedding ids. A mismatch raises `SegmentCorrupt`
(only after the records before it were yielded: act on a segment once its iterator is
exhausted, as `verify_segment` does).

**Memory.** Encoding builds the file in memory (the caller holds the events already); decoding
holds one OCF block (`BLOCK_SIZE` bytes of records before compression) at a time, also from a
stream of decrypted chunks (`chunk_stream`).

**Bounded blocks.** `wedsync.max_block_bytes` (absent from older segments) is the largest OCF
block's size before compression, stamped into the header once the blocks are written (the
header is written first, with a fixed-width placeholder). A block is decompressed in bounded
chunks and may produce no more than that (older segments: `bounded.MAX_BLOCK_BYTES`; never
more than `bounded.HARD_BLOCK_BYTES`), so a corrupt or hostile block (a zstd or deflate bomb)
fails as `SegmentCorrupt` instead of exhausting memory. The bounded block readers replace
fastavro's own for `zstandard` and `deflate` (`fastavro.read.BLOCK_READERS`, its registry of
codecs), for every OCF this process reads.

**Compression**, the caller's choice: `zstandard` (fastavro needs `backports.zstd` for it on
Python < 3.14) or `deflate`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cache, lru_cache, partial
from typing import IO, TYPE_CHECKING, Any, Final, TypeVar, cast

import fastavro
import fastavro.read
import fastavro.write
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint, to_parsing_canonical_form

from replicator.archive.bloom import Bloom, may_hold
from replicator.archive.bounded import (
    HARD_BLOCK_BYTES,
    MAX_BLOCK_BYTES,
    BoundedBytes,
    BoundedReader,
    chunk_stream,
    deflate_block,
    zstd_block,
)
from replicator.archive.layout import (
    SegmentKind,
    segment_key,
    transactions_key,
)
from replicator.archive.ordering import ordered as _ordered
from replicator.errors import ReplicatorError
from replicator.events import ChangeEvent, TransactionRecord, join_qualified
from replicator.keys import canonical_key
from replicator.position import ChangePosition, Lsn
from replicator.transport.avro import (
    CodecError,
    EventCodec,
    event_from_dict,
    to_python,
    transaction_from_dict,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "BLOCK_SIZE", "FORMAT_VERSION", "HEADER_PREFIX_SIZE", "MAX_WEDDING_IDS",
    "MAX_WEDDING_IDS_BYTES", "EventFacts", "SegmentCorrupt", "SegmentError", "SegmentHeader",
    "SegmentHeaderIncomplete", "chunk_stream", "decode_record_segment", "decode_segment",
    "decode_transaction_segment", "encode_body_segment", "encode_record_segment",
    "encode_segment", "encode_transaction_body_segment", "encode_transaction_segment",
    "event_facts", "read_header", "verify_segment",
]

FORMAT_VERSION: Final = 1
BLOCK_SIZE: Final = 256 * 1024  # uncompressed record bytes per OCF block
HEADER_PREFIX_SIZE: Final = 256 * 1024
MAX_WEDDING_IDS: Final = 1000
MAX_WEDDING_IDS_BYTES: Final = 40_000
MAX_BLOOM_ITEMS: Final = 40_000  # wedding ids in a Bloom filter: at most 67 kB of header
MAX_DELETE_KEYS: Final = 16_000  # delete keys in a Bloom filter: at most 54 kB of header
MANY: Final = "many"
_CODECS: Final = {"zstandard": "zstandard", "zstd": "zstandard", "deflate": "deflate"}
_OCF_MAGIC: Final = b"Obj\x01"
_OCF_HEADER: Final = parse_schema({
    "type": "record", "name": "org.apache.avro.file.Header",
    "fields": [
        {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
        {"name": "meta", "type": {"type": "map", "values": "bytes"}},
        {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}},
    ],
})
Source = bytes | bytearray | memoryview | IO[bytes]
_T = TypeVar("_T")


class SegmentError(ReplicatorError, ValueError):
    """A segment cannot be written or read as asked."""


class SegmentCorrupt(SegmentError):
    """The bytes are not a valid segment, or its content contradicts its header."""


class SegmentHeaderIncomplete(SegmentError):
    """The prefix given to `read_header` ends inside the header: fetch more bytes."""


# --- the header ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """The `wedsync.*` metadata of a segment (module docstring), plus its Avro codec."""

    kind: SegmentKind
    table: str  # qualified, "public.guests"; empty for transactions
    first: ChangePosition
    last: ChangePosition
    min_commit_ts_us: int
    max_commit_ts_us: int
    rows: int
    ops: Mapping[str, int]
    wedding_ids: tuple[str, ...] | None  # None: more than the cap ("many")
    schema_fingerprint: str
    codec: str
    format_version: int = FORMAT_VERSION
    # Added later (absent from older segments: None, and a restore reads the segment):
    wedding_bloom: str | None = None  # Bloom filter of the wedding ids, when the list is "many"
    unknown_deletes: int | None = None  # deletes whose wedding is not known (key-only image)
    delete_key_bloom: str | None = None  # Bloom filter of those deletes' keys
    max_block_bytes: int | None = None  # the largest block before compression (docstring)

    #: The optional fields: compared with the content only when the header has them.
    OPTIONAL = ("wedding_bloom", "unknown_deletes", "delete_key_bloom", "max_block_bytes")

    @property
    def key(self) -> str:
        """The object name this segment belongs under."""
        first, last = self.first.commit_lsn, self.last.commit_lsn
        if self.kind is SegmentKind.TRANSACTIONS:
            return transactions_key(first, last)
        return segment_key(self.table, first, last)

    def may_hold_wedding(self, wedding_id: str) -> bool:
        """False only when the header proves no row of *wedding_id* is inside."""
        return may_hold(wedding_id, self.wedding_ids, self.wedding_bloom)

    def may_delete_key(self, key: str) -> bool:
        """False only when the header proves no delete of unknown wedding removes *key* (its
        canonical key, `keys.canonical_key`)."""
        if self.unknown_deletes is None:
            return self.ops.get("d", 0) > 0
        if self.unknown_deletes == 0:
            return False
        if self.delete_key_bloom is not None:
            return key in Bloom.from_text(self.delete_key_bloom)
        return True

    def metadata(self) -> dict[str, str]:
        ids = MANY if self.wedding_ids is None else _json(list(self.wedding_ids))
        return {
            "wedsync.format": str(self.format_version),
            "wedsync.kind": str(self.kind),
            "wedsync.table": self.table,
            "wedsync.first_lsn": str(self.first.commit_lsn),
            "wedsync.first_seq": str(self.first.seq),
            "wedsync.last_lsn": str(self.last.commit_lsn),
            "wedsync.last_seq": str(self.last.seq),
            "wedsync.min_commit_ts_us": str(self.min_commit_ts_us),
            "wedsync.max_commit_ts_us": str(self.max_commit_ts_us),
            "wedsync.rows": str(self.rows),
            "wedsync.ops": _json(dict(sorted(self.ops.items()))),
            "wedsync.wedding_ids": ids,
            "wedsync.schema_fingerprint": self.schema_fingerprint,
        } | {f"wedsync.{name}": str(value) for name in self.OPTIONAL
             if (value := getattr(self, name)) is not None} | (
            {} if self.max_block_bytes is None
            else {_STAMP: f"{self.max_block_bytes:0{_STAMP_WIDTH}d}"})

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], codec: str) -> SegmentHeader:
        if "wedsync.format" not in meta:
            raise SegmentCorrupt("not a wedsync segment: its Avro header has no wedsync.format")

        def get(key: str, parse: Callable[[str], _T]) -> _T:
            try:
                return parse(meta[f"wedsync.{key}"])
            except (KeyError, ValueError, TypeError, AttributeError):
                raise SegmentCorrupt(f"segment header field wedsync.{key} is missing or not "
                                     "valid") from None

        version = get("format", int)
        if version > FORMAT_VERSION:
            raise SegmentError(f"segment format {version} is newer than this replicator reads "
                               f"({FORMAT_VERSION}): upgrade it")
        return cls(
            kind=get("kind", SegmentKind), table=get("table", str),
            first=ChangePosition(get("first_lsn", Lsn.parse), get("first_seq", int)),
            last=ChangePosition(get("last_lsn", Lsn.parse), get("last_seq", int)),
            min_commit_ts_us=get("min_commit_ts_us", int),
            max_commit_ts_us=get("max_commit_ts_us", int), rows=get("rows", int),
            ops=get("ops", _parse_ops), wedding_ids=get("wedding_ids", _parse_wedding_ids),
            schema_fingerprint=get("schema_fingerprint", str), codec=codec,
            format_version=version,
            wedding_bloom=_optional(meta, "wedding_bloom", _bloom_text),
            unknown_deletes=_optional(meta, "unknown_deletes", int),
            delete_key_bloom=_optional(meta, "delete_key_bloom", _bloom_text),
            max_block_bytes=_optional(meta, "max_block_bytes", int))


def _optional(meta: Mapping[str, str], key: str, parse: Callable[[str], _T]) -> _T | None:
    text = meta.get(f"wedsync.{key}")
    if text is None:
        return None
    try:
        return parse(text)
    except (ValueError, TypeError):
        raise SegmentCorrupt(f"segment header field wedsync.{key} is not valid") from None


def _bloom_text(text: str) -> str:
    Bloom.from_text(text)  # refuses a malformed filter
    return text


def _parse_ops(text: str) -> dict[str, int]:
    return {str(op): int(count) for op, count in json.loads(text).items()}


def _parse_wedding_ids(text: str) -> tuple[str, ...] | None:
    if text == MANY:
        return None
    ids = json.loads(text)
    if not isinstance(ids, list):
        raise TypeError("not a list")
    return tuple(str(wedding_id) for wedding_id in ids)


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Summary:
    """Builds a header from records in position order; refuses records out of order."""

    def __init__(self, kind: SegmentKind, table: str, *, writing: bool = False) -> None:
        self.kind, self.table, self.writing = kind, table, writing
        self.first: tuple[int, int] | None = None
        self.last: tuple[int, int] | None = None
        self.low = self.high = self.rows = 0
        self.ops: dict[str, int] = {}
        self.weddings: set[str] | None = set()  # None once past the cap: memory stays bounded
        self.unknown_deletes = 0
        self.delete_keys: set[str] | None = set()

    def add(self, table: str, position: tuple[int, int], commit_ts_us: int, op: str | None,
            wedding_id: str | None, key: Callable[[], str] | None = None) -> None:
        if table != self.table and self.writing:
            raise SegmentError(f"cannot put a record of {table} ({position}) in a segment of "
                               f"{self.table}: a segment holds one table")
        if table != self.table:
            raise SegmentCorrupt(f"a segment of {self.table or 'transactions'} holds a record of "
                                 f"{table or 'transactions'} at {position}")
        if self.last is None:
            self.first, self.low, self.high = position, commit_ts_us, commit_ts_us
        elif position < self.last or (position == self.last
                                      and self.kind is not SegmentKind.TRANSACTIONS):
            # Transactions may share an LSN: a snapshot has one boundary record per table.
            raise SegmentCorrupt(f"segment of {self.table or 'transactions'}: record at "
                                 f"{position} follows {self.last} (not in position order)")
        self.last = position
        self.low, self.high = min(self.low, commit_ts_us), max(self.high, commit_ts_us)
        self.rows += 1
        if op is not None:
            self.ops[op] = self.ops.get(op, 0) + 1
        if wedding_id is not None and self.weddings is not None:
            self.weddings.add(wedding_id)
            if len(self.weddings) > MAX_BLOOM_ITEMS:
                self.weddings = None
        elif wedding_id is None and op == "d" and self.kind is SegmentKind.CHANGES:
            self.unknown_deletes += 1
            if self.delete_keys is not None and key is not None:
                self.delete_keys.add(key())
                if len(self.delete_keys) > MAX_DELETE_KEYS:
                    self.delete_keys = None

    def header(self, schema_fingerprint: str, codec: str) -> SegmentHeader:
        if self.first is None or self.last is None:
            raise SegmentError("a segment needs at least one record")
        ids = None if self.weddings is None else tuple(sorted(self.weddings))
        bloom = None
        if ids is not None and (len(ids) > MAX_WEDDING_IDS
                                or len(_json(list(ids)).encode()) > MAX_WEDDING_IDS_BYTES):
            bloom, ids = Bloom.of(ids).to_text(), None
        changes = self.kind is SegmentKind.CHANGES
        keys = (Bloom.of(self.delete_keys, bits_per_item=20, hashes=14).to_text()
                if changes and self.unknown_deletes and self.delete_keys is not None else None)
        first = ChangePosition(Lsn(self.first[0]), self.first[1])
        last = ChangePosition(Lsn(self.last[0]), self.last[1])
        return SegmentHeader(
            kind=self.kind, table=self.table, first=first, last=last,
            min_commit_ts_us=self.low, max_commit_ts_us=self.high, rows=self.rows,
            ops=self.ops, wedding_ids=ids, schema_fingerprint=schema_fingerprint, codec=codec,
            wedding_bloom=bloom, unknown_deletes=self.unknown_deletes if changes else None,
            delete_key_bloom=keys)


# table, position, commit time, op, wedding, the key's canonical text (computed on demand)
EventFacts = tuple[str, tuple[int, int], int, str | None, str | None, Callable[[], str] | None]


def event_facts(record: Mapping[str, Any]) -> EventFacts:
    # The position as a plain tuple (it compares like a ChangePosition; the header converts
    # the first and last): this runs once per record read, so it is kept lean.
    source = record["source"]
    op, wedding = record["op"], record["wedding_id"]
    return (join_qualified(source["schema"], source["table"]), (source["lsn"], source["seq"]),
            source["ts_us"], op, wedding,
            partial(_record_canonical_key, record) if op == "d" and wedding is None else None)


def _record_canonical_key(record: Mapping[str, Any]) -> str:
    return canonical_key(to_python(record["key"]))


def _transaction_facts(record: Mapping[str, Any]) -> EventFacts:
    return ("", (record["commit_lsn"], 0), record["commit_ts_us"], None,
            None, None)


# --- encoding --------------------------------------------------------------------------------


@cache
def _default_codec() -> EventCodec:
    return EventCodec()


def _codec_name(codec: str) -> str:
    name = _CODECS.get(codec)
    if name is None:
        raise SegmentError(f"unknown segment codec {codec!r}: use 'zstandard' or 'deflate'")
    if name == "zstandard" and not _zstd_available():
        raise SegmentError("the zstandard codec needs the backports.zstd package on Python "
                           "< 3.14: install it, or use codec='deflate'")
    return name


@cache
def _zstd_available() -> bool:
    module = "compression.zstd" if sys.version_info >= (3, 14) else "backports.zstd"
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def _transaction_identity(record: Mapping[str, Any]) -> object:
    return record["commit_lsn"], record["xid"], tuple(sorted(record["counts"]))


_STAMP: Final = "wedsync.max_block_bytes"
_STAMP_WIDTH: Final = 12


@dataclass(frozen=True, slots=True)
class _RawBlock:
    """A block of records already in Avro binary, as `fastavro`'s `Writer.write_block` takes
    it (the shape of `fastavro.read.Block` it reads)."""

    num_records: int
    bytes_: io.BytesIO


def _write(parsed: Any, records: Iterable[Mapping[str, Any]] | Iterable[bytes],
           header: SegmentHeader, level: int | None, *, bodies: bool = False
           ) -> tuple[bytes, SegmentHeader]:
    """The segment's bytes, and *header* with its `max_block_bytes` (module docstring).

    With *bodies*, *records* are already Avro binary (one record each, under *parsed*): they
    go into the blocks as they are."""
    buffer = io.BytesIO()
    largest = 0
    try:
        # A sync marker derived from the header, not random: the same records give the same
        # bytes, so a sink repeating a flush after a crash finds its segment already there.
        marker = hashlib.sha256(json.dumps(header.metadata(), sort_keys=True).encode()).digest()
        # Blocks end where fastavro.writer(sync_interval=BLOCK_SIZE) ends them, but here, so
        # that their size before compression is seen.
        writer = fastavro.write.Writer(
            buffer, parsed, codec=header.codec, sync_interval=1 << 62,
            metadata=header.metadata() | {_STAMP: "0" * _STAMP_WIDTH},
            compression_level=level, sync_marker=marker[:16])
        if bodies:
            largest = _write_bodies(writer, cast(Iterable[bytes], records))
        else:
            block = cast(Any, writer).io  # the block being filled, before compression
            for record in records:
                writer.write(cast(Any, record))
                if (size := block.tell()) >= BLOCK_SIZE:
                    largest = max(largest, size)
                    writer.flush()
            largest = max(largest, block.tell())
        writer.flush()
    except CodecError:
        raise
    except (ValueError, TypeError, OverflowError, KeyError) as exc:
        # fastavro's messages can quote the record; say only which segment failed.
        raise SegmentError(f"cannot write the segment of {header.table or 'transactions'} at "
                           f"{header.first}: {type(exc).__name__}") from exc
    data = bytearray(buffer.getbuffer())
    placeholder = _STAMP.encode() + bytes([2 * _STAMP_WIDTH]) + b"0" * _STAMP_WIDTH
    at = data.index(placeholder) + len(placeholder) - _STAMP_WIDTH
    data[at:at + _STAMP_WIDTH] = b"%0*d" % (_STAMP_WIDTH, largest)
    return bytes(data), dataclasses.replace(header, max_block_bytes=largest)


def _write_bodies(writer: fastavro.write.Writer, bodies: Iterable[bytes]) -> int:
    """Blocks of *bodies*, cut where `_write` cuts records; the largest block's size."""
    pending: list[bytes] = []
    size = largest = 0
    for body in itertools.chain(bodies, (None,)):
        if body is not None:
            pending.append(body)
            size += len(body)
        if pending and (size >= BLOCK_SIZE or body is None):
            writer.write_block(_RawBlock(len(pending), io.BytesIO(b"".join(pending))))
            largest, pending, size = max(largest, size), [], 0
    return largest


def encode_segment(
    events: Sequence[ChangeEvent], *, table: str,
    column_types: Mapping[str, Mapping[str, str]] | None, codec: str,
    level: int | None = None, event_codec: EventCodec | None = None,
) -> tuple[bytes, SegmentHeader]:
    """A change segment of *events*, all of *table* (qualified, `public.guests`).

    *column_types* is qualified table -> column -> Postgres type name (as
    `Assembler.column_kinds`); the encoder needs it for json/jsonb and infinity values
    (`replicator.transport.avro`). *event_codec* supplies `source.name` (the topic prefix) and
    `ts_ms`; pass the one the Kafka producer uses. *level* is the compression level.
    """
    avro = event_codec or _default_codec()
    name = _codec_name(codec)
    ordered = _ordered(events, lambda event: event.position)
    summary = _Summary(SegmentKind.CHANGES, table, writing=True)
    for event in ordered:
        summary.add(event.qualified_table, event.position, event.commit_ts_us, str(event.op),
                    event.wedding_id, partial(canonical_key, event.key))
    header = summary.header(avro.event_fingerprint.hex(), name)
    hints = column_types.get(table) if column_types else None
    datums = (avro.event_datum(event, hints) for event in ordered)
    return _write(avro.parsed_event_schema, datums, header, level)


def encode_record_segment(
    records: Sequence[Mapping[str, Any]], *, table: str, codec: str, level: int | None = None,
) -> tuple[bytes, SegmentHeader]:
    """A change segment of envelope records as `EventCodec.decode_event` returns them.

    This is the lossless path for a sink: the records are written exactly as they came from
    Kafka (json stays Json, infinities keep their type, `ts_ms` is kept), with no type hints.
    """
    avro = _default_codec()
    name = _codec_name(codec)
    ordered = _ordered(records, lambda record: event_facts(record)[1])
    summary = _Summary(SegmentKind.CHANGES, table, writing=True)
    for record in ordered:
        summary.add(*event_facts(record))
    header = summary.header(avro.event_fingerprint.hex(), name)
    return _write(avro.parsed_event_schema, ordered, header, level)


def encode_body_segment(
    changes: Sequence[tuple[EventFacts, bytes]], *, table: str, codec: str,
    level: int | None = None,
) -> tuple[bytes, SegmentHeader]:
    """A change segment of envelopes already in Avro binary: each change is its facts
    (`event_facts` of the decoded record) and its body (`EventCodec.decode_event_body`).

    The sink's path: the bodies go into the blocks as they came from Kafka, so the archive
    holds each message's record byte for byte and nothing is encoded twice. The result reads
    exactly as `encode_record_segment` of the decoded records would.
    """
    avro = _default_codec()
    name = _codec_name(codec)
    ordered = _ordered(changes, lambda change: change[0][1])
    summary = _Summary(SegmentKind.CHANGES, table, writing=True)
    for facts, _ in ordered:
        summary.add(*facts)
    header = summary.header(avro.event_fingerprint.hex(), name)
    return _write(avro.parsed_event_schema, [body for _, body in ordered], header, level,
                  bodies=True)


def encode_transaction_segment(
    records: Sequence[TransactionRecord | Mapping[str, Any]], *, codec: str,
    level: int | None = None,
) -> tuple[bytes, SegmentHeader]:
    """A transaction segment of `TransactionRecord`s, or of the records as
    `EventCodec.decode_transaction` returns them."""
    avro = _default_codec()
    name = _codec_name(codec)
    datums = [avro.transaction_datum(r) if isinstance(r, TransactionRecord) else r
              for r in records]
    ordered = _ordered(datums, lambda record: _transaction_facts(record)[1],
                       _transaction_identity)
    summary = _Summary(SegmentKind.TRANSACTIONS, "", writing=True)
    for record in ordered:
        summary.add(*_transaction_facts(record))
    header = summary.header(avro.transaction_fingerprint.hex(), name)
    return _write(avro.parsed_transaction_schema, ordered, header, level)


def encode_transaction_body_segment(
    records: Sequence[tuple[Mapping[str, Any], bytes]], *, codec: str,
    level: int | None = None,
) -> tuple[bytes, SegmentHeader]:
    """`encode_body_segment` for transaction records: each is the decoded record and its
    body (`EventCodec.decode_transaction_body`)."""
    avro = _default_codec()
    name = _codec_name(codec)
    ordered = _ordered(records, lambda record: _transaction_facts(record[0])[1],
                       lambda record: _transaction_identity(record[0]))
    summary = _Summary(SegmentKind.TRANSACTIONS, "", writing=True)
    for record, _ in ordered:
        summary.add(*_transaction_facts(record))
    header = summary.header(avro.transaction_fingerprint.hex(), name)
    return _write(avro.parsed_transaction_schema, [body for _, body in ordered], header,
                  level, bodies=True)


# --- decoding --------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _fingerprint_of(schema_json: str) -> str:
    result: str = fingerprint(to_parsing_canonical_form(json.loads(schema_json)), "CRC-64-AVRO")
    return result


def _checked_header(meta: Mapping[str, str], codec: str) -> SegmentHeader:
    header = SegmentHeader.from_metadata(meta, codec)
    try:
        actual = _fingerprint_of(meta["avro.schema"])
    except (KeyError, ValueError, TypeError) as exc:
        raise SegmentCorrupt(f"segment's Avro schema is not readable: {type(exc).__name__}"
                             ) from None
    if actual != header.schema_fingerprint:
        raise SegmentCorrupt(f"segment header says schema {header.schema_fingerprint}, but its "
                             f"records are written with schema {actual}")
    return header


class _Recorder:
    """Keeps what is read from a stream, so the header can be read twice without seeking."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.seen = bytearray()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.seen += data
        return data


def _read_meta(stream: Any, available: int | None) -> dict[str, str]:
    try:
        raw = schemaless_reader(stream, _OCF_HEADER, None)
    except EOFError:
        where = "" if available is None else f" within the first {available} bytes"
        raise SegmentHeaderIncomplete(f"the segment header does not end{where}") from None
    if not isinstance(raw, dict) or raw["magic"] != _OCF_MAGIC:
        raise SegmentCorrupt("not an Avro object container file")
    try:
        return {key: value.decode("utf-8") for key, value in raw["meta"].items()}
    except UnicodeDecodeError:
        raise SegmentCorrupt("segment header metadata is not UTF-8 text") from None


def read_header(data_prefix: bytes | bytearray | memoryview) -> SegmentHeader:
    """The header of a (decrypted) segment from its first bytes; `HEADER_PREFIX_SIZE` bytes
    always hold a header this module wrote. Raises `SegmentHeaderIncomplete` when they do not.
    """
    meta = _read_meta(io.BytesIO(data_prefix), len(data_prefix))
    return _checked_header(meta, meta.get("avro.codec", "null"))


def _open(data: Source, kind: SegmentKind | None, after: int | None = None
          ) -> tuple[SegmentHeader, Iterator[dict[str, Any]]]:
    """Reads the header first, to give fastavro a reader schema only when the segment was
    written with another schema (resolution halves the reading speed). With *after*, blocks
    whose records all have a commit LSN at or below it are passed over undecoded."""
    stream: IO[bytes]
    try:
        if isinstance(data, bytes | bytearray | memoryview):
            meta = _read_meta(io.BytesIO(data), None)
            stream = BoundedBytes(data)
        else:
            recorder = _Recorder(data)
            meta = _read_meta(recorder, None)
            rest = iter(partial(data.read, BLOCK_SIZE), b"")
            stream = chunk_stream(itertools.chain((bytes(recorder.seen),), rest))
    except SegmentHeaderIncomplete:
        raise SegmentCorrupt("the segment ends inside its header") from None
    header = _checked_header(meta, meta.get("avro.codec", "null"))
    if kind is not None and header.kind is not kind:
        raise SegmentError(f"this is a {header.kind} segment, not a {kind} one")
    if header.codec == "zstandard":
        _codec_name(header.codec)  # says which package is missing, rather than "corrupt"
    avro = _default_codec()
    if header.kind is SegmentKind.CHANGES:
        ours, schema, facts = (avro.event_fingerprint, avro.parsed_event_schema, event_facts)
    else:
        ours, schema, facts = (avro.transaction_fingerprint, avro.parsed_transaction_schema,
                               _transaction_facts)
    reader_schema = None if header.schema_fingerprint == ours.hex() else schema
    limit = min(HARD_BLOCK_BYTES, header.max_block_bytes if header.max_block_bytes is not None
                else MAX_BLOCK_BYTES)
    if isinstance(stream, BoundedBytes | BoundedReader):
        stream.block_limit = limit
    try:
        if after is not None and header.first.commit_lsn <= after:
            seekable = BoundedBytes(stream.read())  # block_reader asks for positions
            seekable.block_limit = limit
            records = _blocks_after(fastavro.block_reader(
                seekable, reader_schema=reader_schema, return_record_name=True), after)
            return header, _verified(header, records, facts, complete=False)
        reader = fastavro.reader(stream, reader_schema=reader_schema, return_record_name=True)
    except Exception as exc:  # fastavro raises assorted types on bytes that are not an OCF
        raise SegmentCorrupt(f"segment of {header.table or 'transactions'} is not readable: "
                             f"{type(exc).__name__}") from exc
    return header, _verified(header, cast(Iterator[dict[str, Any]], iter(reader)), facts)


def _blocks_after(blocks: Iterable[Any], after: int) -> Iterator[dict[str, Any]]:
    """The records of the OCF *blocks* less the blocks that hold only records at or below
    LSN *after*: records are in position order, so a block is such a block when the next
    block's first record is at or below *after*; only that first record is decoded."""
    pending: tuple[dict[str, Any], Iterator[dict[str, Any]]] | None = None
    for block in blocks:
        rest = iter(block)
        first = next(rest, None)
        if pending is not None and (first is None or first["source"]["lsn"] > after):
            yield pending[0]
            yield from pending[1]
        pending = None if first is None else (first, rest)
    if pending is not None:
        yield pending[0]
        yield from pending[1]


def _verified(header: SegmentHeader, records: Iterator[dict[str, Any]],
              facts: Callable[[Mapping[str, Any]], EventFacts], complete: bool = True,
              ) -> Iterator[dict[str, Any]]:
    """The records, checked as they pass (table, position order) and, when *complete* (no
    block was passed over), against every field of the header once they are all out."""
    summary = _Summary(header.kind, header.table)
    where = f"segment of {header.table or 'transactions'} starting at {header.first}"
    while True:
        try:
            record = next(records)
        except StopIteration:
            break
        except Exception as exc:  # fastavro, zlib and zstd each raise their own types
            detail = str(exc) if isinstance(exc, SegmentCorrupt) else type(exc).__name__
            raise SegmentCorrupt(f"{where} is corrupt after {summary.rows} records: "
                                 f"{detail}") from exc
        summary.add(*facts(record))
        yield record
    if not complete:
        if summary.last is not None and summary.last != (header.last.commit_lsn,
                                                         header.last.seq):
            raise SegmentCorrupt(f"{where}: its last record is at {summary.last}, its header "
                                 f"says {header.last}")
        return
    try:
        actual = summary.header(header.schema_fingerprint, header.codec)
    except SegmentError:
        raise SegmentCorrupt(f"{where} holds no records") from None
    differ = [f.name for f in fields(SegmentHeader)
              if getattr(actual, f.name) != getattr(header, f.name)
              and f.name not in ("format_version", "max_block_bytes")
              and not (f.name in SegmentHeader.OPTIONAL and getattr(header, f.name) is None)]
    if differ:
        raise SegmentCorrupt(f"{where}: the header does not match the content "
                             f"({', '.join(differ)})")


def decode_record_segment(data: Source, after: int | None = None
                          ) -> tuple[SegmentHeader, Iterator[dict[str, Any]]]:
    """The header and the envelope records of a change segment (fastavro's dicts, with
    record-typed Values as `(name, fields)`), streamed and verified (module docstring).
    With *after* (a commit LSN), the OCF blocks holding only records at or below it are
    passed over undecoded (a restore from a snapshot at *after*); the records read are then
    checked for order and for the header's last position, not for its counts."""
    return _open(data, SegmentKind.CHANGES, after)


def decode_segment(data: Source) -> tuple[SegmentHeader, Iterator[ChangeEvent]]:
    """The header and the events of a change segment, streamed and verified."""
    header, records = _open(data, SegmentKind.CHANGES)
    return header, (event_from_dict(record) for record in records)


def decode_transaction_segment(data: Source) -> tuple[SegmentHeader, Iterator[TransactionRecord]]:
    """The header and the records of a transaction segment, streamed and verified."""
    header, records = _open(data, SegmentKind.TRANSACTIONS)
    return header, (transaction_from_dict(record) for record in records)


def verify_segment(data: Source) -> SegmentHeader:
    """Read a whole segment of either kind; its header, if the content matches it."""
    header, records = _open(data, None)
    for _ in records:
        pass
    return header


fastavro.read.BLOCK_READERS["zstandard"] = partial(zstd_block, error=SegmentCorrupt)
fastavro.read.BLOCK_READERS["deflate"] = partial(deflate_block, error=SegmentCorrupt)
