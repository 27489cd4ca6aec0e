"""Decoder for pgoutput, the logical decoding output plugin behind Postgres publications.

One call decodes one message: the payload of an XLogData (`w`) copy-data message after its
25-byte header. The layout below is from the Postgres documentation, "Logical Replication
Message Formats" (protocol versions 1-4); integers are big-endian, a String is UTF-8 ending in a
zero byte, LSNs are unsigned 64-bit and timestamps are microseconds since 2000-01-01 UTC.

    B  Begin              final LSN:8, commit ts:8, xid:4
    C  Commit             flags:1, commit LSN:8, end LSN:8, commit ts:8
    O  Origin             commit LSN on origin:8, name:String
    R  Relation       [x] oid:4, namespace:String ("" = pg_catalog), name:String,
                          replica identity:1, ncols:2, ncols * (flags:1 (1 = key), name:String,
                          type oid:4, type modifier:4)
    Y  Type           [x] oid:4, namespace:String, name:String
    I  Insert         [x] oid:4, 'N', TupleData
    U  Update         [x] oid:4, optional ('K' | 'O', TupleData), 'N', TupleData
    D  Delete         [x] oid:4, 'K' | 'O', TupleData
    T  Truncate       [x] nrels:4, options:1 (1 = CASCADE, 2 = RESTART IDENTITY), nrels * oid:4
    M  Message        [x] flags:1 (1 = transactional), LSN:8, prefix:String, length:4, content
    S  Stream Start   (v2) xid:4, first segment:1
    E  Stream Stop    (v2) nothing
    c  Stream Commit  (v2) xid:4, flags:1, commit LSN:8, end LSN:8, commit ts:8
    A  Stream Abort   (v2) xid:4, subxid:4, then in v4 with streaming = parallel only:
                          abort LSN:8, abort ts:8
    b  Begin Prepare  (v3) prepare LSN:8, end LSN:8, prepare ts:8, xid:4, gid:String
    P  Prepare        (v3) flags:1, prepare LSN:8, end LSN:8, prepare ts:8, xid:4, gid:String
    K  Commit Prepared (v3) flags:1, commit LSN:8, end LSN:8, commit ts:8, xid:4, gid:String
    r  Rollback Prepared (v3) flags:1, prepare end LSN:8, rollback end LSN:8, prepare ts:8,
                          rollback ts:8, xid:4, gid:String
    p  Stream Prepare (v3) same layout as Prepare

    TupleData: ncols:2, then per column one of
        'n' NULL | 'u' unchanged TOASTed value (not sent) | 't' length:4 text | 'b' length:4 binary

[x]: between Stream Start and Stream Stop (protocol 2+) the message carries the xid:4 of the
(sub)transaction right after its type byte. That is why decoding needs a `Decoder` that follows
the stream state, and why the data messages carry `xid` (None outside a stream): a Stream Abort
may name a subtransaction whose changes alone must be discarded.

Column values stay raw here (`bytes` of the text form, None, or `UNCHANGED`); turning them into
Python values by type is `values.py`'s job, done once per relation rather than per message.

Speed matters: in the client profile two thirds of the time went to decoding, mostly the
per-column loop. So row messages are NamedTuples built by `tuple.__new__`, integers come from
precompiled `struct.Struct`s, the input is copied to `bytes` once so every column value is one
slice, and bounds are checked once per message (the message must end exactly where decoding
ends) instead of once per column.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, NamedTuple, TypeAlias, cast

from replicator.errors import ReplicatorError
from replicator.position import Lsn

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
"""Origin of Postgres's wire timestamps (microseconds since this instant)."""


def from_pg_timestamp(micros: int) -> datetime:
    """Aware UTC datetime from a wire timestamp.

    Messages keep the raw int (`commit_ts`, `prepare_ts`...): most are never looked at as a
    datetime, and the int is what Avro and the transaction records store.
    """
    return PG_EPOCH + timedelta(microseconds=micros)


def to_pg_timestamp(moment: datetime) -> int:
    """Wire timestamp of an aware datetime (standby status updates send the client's clock)."""
    return (moment - PG_EPOCH) // timedelta(microseconds=1)


class PgOutputError(ReplicatorError):
    """A message that is not valid pgoutput for this protocol version and stream state.

    It means the decoder and the server disagree (wrong protocol version, a missed Stream
    Start/Stop, a truncated buffer), so the stream cannot be trusted past this point.
    """

    def __init__(self, problem: str, *, lsn: Lsn | None, offset: int) -> None:
        where = f"in the message at WAL {lsn}" if lsn is not None else "in the message"
        super().__init__(f"{problem} ({where}, byte offset {offset})")
        self.lsn = lsn
        self.offset = offset


class Unchanged(enum.Enum):
    """Type of `UNCHANGED`: a TOASTed column value that the server did not send.

    An Update that leaves a large (TOASTed) value alone does not resend it. This is a marker,
    not a value: no string or bytes can be mistaken for it, and replay fills the column from the
    row's previous version.
    """

    UNCHANGED = "unchanged"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged.UNCHANGED


class Binary(bytes):
    """A column value in binary format ('b'), only seen when the slot was started with binary.

    A distinct type so that binary data can never be parsed as the text form by accident.
    """

    __slots__ = ()


RawValue: TypeAlias = bytes | Literal[Unchanged.UNCHANGED] | None
TupleData: TypeAlias = tuple[RawValue, ...]


class Begin(NamedTuple):
    final_lsn: Lsn
    commit_ts: int
    xid: int


class Commit(NamedTuple):
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_ts: int


class Origin(NamedTuple):
    commit_lsn: Lsn
    name: str


class Column(NamedTuple):
    flags_key: bool
    name: str
    type_oid: int
    type_modifier: int


class Relation(NamedTuple):
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]
    xid: int | None = None


class Type(NamedTuple):
    oid: int
    namespace: str
    name: str
    xid: int | None = None


class Insert(NamedTuple):
    relation_oid: int
    new: TupleData
    xid: int | None = None


class Update(NamedTuple):
    relation_oid: int
    old_kind: Literal["K", "O"] | None
    old: TupleData | None
    new: TupleData
    xid: int | None = None


class Delete(NamedTuple):
    relation_oid: int
    old_kind: Literal["K", "O"]
    old: TupleData
    xid: int | None = None


class Truncate(NamedTuple):
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool
    xid: int | None = None


class LogicalMessage(NamedTuple):
    """A `pg_logical_emit_message()` record."""

    transactional: bool
    lsn: Lsn
    prefix: str
    content: bytes
    xid: int | None = None


class StreamStart(NamedTuple):
    xid: int
    first_segment: bool


class StreamStop(NamedTuple):
    pass


class StreamCommit(NamedTuple):
    xid: int
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_ts: int


class StreamAbort(NamedTuple):
    """Discard the streamed changes of `subxid` (the whole transaction when it equals `xid`)."""

    xid: int
    subxid: int
    abort_lsn: Lsn | None = None
    abort_ts: int | None = None


class BeginPrepare(NamedTuple):
    prepare_lsn: Lsn
    end_lsn: Lsn
    prepare_ts: int
    xid: int
    gid: str


class Prepare(NamedTuple):
    flags: int
    prepare_lsn: Lsn
    end_lsn: Lsn
    prepare_ts: int
    xid: int
    gid: str


class StreamPrepare(NamedTuple):
    flags: int
    prepare_lsn: Lsn
    end_lsn: Lsn
    prepare_ts: int
    xid: int
    gid: str


class CommitPrepared(NamedTuple):
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn
    commit_ts: int
    xid: int
    gid: str


class RollbackPrepared(NamedTuple):
    flags: int
    prepare_end_lsn: Lsn
    rollback_end_lsn: Lsn
    prepare_ts: int
    rollback_ts: int
    xid: int
    gid: str


PgOutputMessage: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | BeginPrepare
    | Prepare
    | StreamPrepare
    | CommitPrepared
    | RollbackPrepared
)

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U32_U8 = struct.Struct(">IB")
_U32_U32 = struct.Struct(">II")
_LSN_TS = struct.Struct(">Qq")
_BEGIN = struct.Struct(">QqI")
_COMMIT = struct.Struct(">BQQq")
_OID_TYPMOD = struct.Struct(">Ii")
_FLAGS_LSN = struct.Struct(">BQ")
_U32_U8_QQq = struct.Struct(">IBQQq")
_QQqI = struct.Struct(">QQqI")
_BQQqI = struct.Struct(">BQQqI")
_BQQqqI = struct.Struct(">BQQqqI")

# Type bytes of TupleData columns and tuple markers, as ints (indexing bytes gives ints).
_TEXT: Final = ord("t")
_NULL: Final = ord("n")
_TOAST: Final = ord("u")
_BINARY: Final = ord("b")
_NEW: Final = ord("N")
_KEY: Final = ord("K")
_OLD: Final = ord("O")

_new: Any = tuple.__new__  # skips the NamedTuple's Python-level __new__ on the hot path
_lsn: Any = int.__new__  # an Lsn without range checks: unpacked ">Q" values are always valid
_BEGIN_SIZE: Final = _BEGIN.size
_COMMIT_SIZE: Final = _COMMIT.size


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


def _tuple_text(buf: bytes, pos: int) -> tuple[TupleData, int]:
    """Read TupleData in text format; returns the values and the position after them."""
    (count,) = _U16.unpack_from(buf, pos)
    pos += 2
    values: list[RawValue] = []
    append = values.append
    length_at = _I32.unpack_from
    for _ in range(count):
        kind = buf[pos]
        if kind == _TEXT:
            (length,) = length_at(buf, pos + 1)
            pos += 5
            append(buf[pos : pos + length])
            pos += length
        elif kind == _NULL:
            append(None)
            pos += 1
        elif kind == _TOAST:
            append(UNCHANGED)
            pos += 1
        elif kind == _BINARY:
            raise ValueError(
                "a binary-format column value arrived but this decoder expects text; "
                "start replication without the binary option or use Decoder(binary=True)"
            )
        else:
            raise ValueError(f"unknown column kind {bytes([kind])!r} in tuple data")
    return tuple(values), pos


def _tuple_any(buf: bytes, pos: int) -> tuple[TupleData, int]:
    """Read TupleData that may mix text and binary columns (slot started with binary)."""
    (count,) = _U16.unpack_from(buf, pos)
    pos += 2
    values: list[RawValue] = []
    for _ in range(count):
        kind = buf[pos]
        if kind in (_TEXT, _BINARY):
            (length,) = _I32.unpack_from(buf, pos + 1)
            pos += 5
            value = buf[pos : pos + length]
            values.append(value if kind == _TEXT else Binary(value))
            pos += length
        elif kind == _NULL:
            values.append(None)
            pos += 1
        elif kind == _TOAST:
            values.append(UNCHANGED)
            pos += 1
        else:
            raise ValueError(f"unknown column kind {bytes([kind])!r} in tuple data")
    return tuple(values), pos


def _put_tuple(out: bytearray, values: TupleData) -> None:
    out += _U16.pack(len(values))
    for value in values:
        if value is None:
            out.append(_NULL)
        elif value is UNCHANGED:
            out.append(_TOAST)
        else:
            out.append(_BINARY if isinstance(value, Binary) else _TEXT)
            out += _I32.pack(len(value))
            out += value


def encode(message: Insert | Update | Delete | Truncate) -> bytes:
    """The pgoutput bytes of a row or Truncate message as sent outside a stream block: what
    `Decoder(binary=True).decode` reads back as the same message, with `xid` None. The
    assembler spills a large transaction's changes to disk in this form."""
    out = bytearray()
    if type(message) is Insert:
        out += b"I" + _U32.pack(message.relation_oid)
    elif type(message) is Update:
        out += b"U" + _U32.pack(message.relation_oid)
        if message.old is not None:
            out.append(_KEY if message.old_kind == "K" else _OLD)
            _put_tuple(out, message.old)
    elif type(message) is Delete:
        out += b"D" + _U32.pack(message.relation_oid)
        out.append(_KEY if message.old_kind == "K" else _OLD)
        _put_tuple(out, message.old)
        return bytes(out)
    elif type(message) is Truncate:
        options = (1 if message.cascade else 0) | (2 if message.restart_identity else 0)
        out += b"T" + _U32_U8.pack(len(message.relation_oids), options)
        out += struct.pack(f">{len(message.relation_oids)}I", *message.relation_oids)
        return bytes(out)
    else:
        raise TypeError(f"cannot encode {type(message).__name__} messages")
    out.append(_NEW)
    _put_tuple(out, message.new)
    return bytes(out)


_TupleReader: TypeAlias = Callable[[bytes, int], tuple[TupleData, int]]
# Decodes one message from the byte after its type; returns it and the position where it ended.
_Handler: TypeAlias = Callable[[bytes, int], tuple[PgOutputMessage, int]]
_DataHandler: TypeAlias = Callable[[bytes, int, "int | None"], tuple[PgOutputMessage, int]]


def _begin(buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
    final_lsn, ts, xid = _BEGIN.unpack_from(buf, pos)
    return _new(Begin, (_lsn(Lsn, final_lsn), ts, xid)), pos + _BEGIN_SIZE


def _commit(buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
    flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, pos)
    return (_new(Commit, (flags, _lsn(Lsn, commit_lsn), _lsn(Lsn, end_lsn), ts)),
            pos + _COMMIT_SIZE)


def _origin(buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
    (lsn,) = struct.unpack_from(">Q", buf, pos)
    name, pos = _string(buf, pos + 8)
    return Origin(Lsn(lsn), name), pos


def _relation(buf: bytes, pos: int, xid: int | None = None) -> tuple[PgOutputMessage, int]:
    (oid,) = _U32.unpack_from(buf, pos)
    namespace, pos = _string(buf, pos + 4)
    name, pos = _string(buf, pos)
    identity = chr(buf[pos])
    (count,) = _U16.unpack_from(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        column_name, pos = _string(buf, pos + 1)
        type_oid, modifier = _OID_TYPMOD.unpack_from(buf, pos)
        pos += 8
        columns.append(Column(bool(flags & 1), column_name, type_oid, modifier))
    return Relation(oid, namespace, name, identity, tuple(columns), xid), pos


def _type(buf: bytes, pos: int, xid: int | None = None) -> tuple[PgOutputMessage, int]:
    (oid,) = _U32.unpack_from(buf, pos)
    namespace, pos = _string(buf, pos + 4)
    name, pos = _string(buf, pos)
    return Type(oid, namespace, name, xid), pos


def _truncate(buf: bytes, pos: int, xid: int | None = None) -> tuple[PgOutputMessage, int]:
    count, options = _U32_U8.unpack_from(buf, pos)
    pos += 5
    oids = struct.unpack_from(f">{count}I", buf, pos)
    return Truncate(oids, bool(options & 1), bool(options & 2), xid), pos + 4 * count


def _message(buf: bytes, pos: int, xid: int | None = None) -> tuple[PgOutputMessage, int]:
    flags, lsn = _FLAGS_LSN.unpack_from(buf, pos)
    prefix, pos = _string(buf, pos + 9)
    (length,) = _U32.unpack_from(buf, pos)
    pos += 4
    content = buf[pos : pos + length]
    return LogicalMessage(bool(flags & 1), Lsn(lsn), prefix, content, xid), pos + length


def _stream_commit(buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
    xid, flags, commit_lsn, end_lsn, ts = _U32_U8_QQq.unpack_from(buf, pos)
    message = StreamCommit(xid, flags, Lsn(commit_lsn), Lsn(end_lsn), ts)
    return message, pos + _U32_U8_QQq.size


def _stream_abort(buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
    xid, subxid = _U32_U32.unpack_from(buf, pos)
    pos += 8
    # Protocol 4 with streaming = parallel appends the abort LSN and time. The receiver cannot
    # tell from the protocol version alone (it depends on the streaming option), and the payload
    # is exactly one message, so the length decides.
    if len(buf) - pos >= _LSN_TS.size:
        lsn, ts = _LSN_TS.unpack_from(buf, pos)
        return StreamAbort(xid, subxid, Lsn(lsn), ts), pos + _LSN_TS.size
    return StreamAbort(xid, subxid), pos


def _begin_prepare(buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
    prepare_lsn, end_lsn, ts, xid = _QQqI.unpack_from(buf, pos)
    gid, pos = _string(buf, pos + _QQqI.size)
    return BeginPrepare(Lsn(prepare_lsn), Lsn(end_lsn), ts, xid, gid), pos


def _prepare_like(
    cls: type[Prepare] | type[StreamPrepare] | type[CommitPrepared],
) -> _Handler:
    def handler(buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
        flags, lsn, end_lsn, ts, xid = _BQQqI.unpack_from(buf, pos)
        gid, pos = _string(buf, pos + _BQQqI.size)
        return cls(flags, Lsn(lsn), Lsn(end_lsn), ts, xid, gid), pos

    return handler


def _rollback_prepared(buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
    flags, prepare_end, rollback_end, prepare_ts, rollback_ts, xid = _BQQqqI.unpack_from(buf, pos)
    gid, pos = _string(buf, pos + _BQQqqI.size)
    message = RollbackPrepared(
        flags, Lsn(prepare_end), Lsn(rollback_end), prepare_ts, rollback_ts, xid, gid
    )
    return message, pos


def _row_handlers(read: _TupleReader) -> tuple[_DataHandler, _DataHandler, _DataHandler]:
    """Insert, Update and Delete decoders over one TupleData reader (text-only or mixed)."""

    def insert(buf: bytes, pos: int, xid: int | None = None) -> tuple[PgOutputMessage, int]:
        (oid,) = _U32.unpack_from(buf, pos)
        if buf[pos + 4] != _NEW:
            raise ValueError(f"Insert expects 'N' before the new tuple, got {buf[pos + 4]:#04x}")
        new, pos = read(buf, pos + 5)
        return _new(Insert, (oid, new, xid)), pos

    def update(buf: bytes, pos: int, xid: int | None = None) -> tuple[PgOutputMessage, int]:
        (oid,) = _U32.unpack_from(buf, pos)
        marker = buf[pos + 4]
        pos += 5
        old: TupleData | None = None
        old_kind: Literal["K", "O"] | None = None
        if marker in (_KEY, _OLD):
            old_kind = "K" if marker == _KEY else "O"
            old, pos = read(buf, pos)
            marker = buf[pos]
            pos += 1
        if marker != _NEW:
            raise ValueError(f"Update expects 'N' before the new tuple, got {marker:#04x}")
        new, pos = read(buf, pos)
        return _new(Update, (oid, old_kind, old, new, xid)), pos

    def delete(buf: bytes, pos: int, xid: int | None = None) -> tuple[PgOutputMessage, int]:
        (oid,) = _U32.unpack_from(buf, pos)
        marker = buf[pos + 4]
        if marker not in (_KEY, _OLD):
            raise ValueError(f"Delete expects 'K' or 'O' before the old tuple, got {marker:#04x}")
        old, pos = read(buf, pos + 5)
        old_kind: Literal["K", "O"] = "K" if marker == _KEY else "O"
        return _new(Delete, (oid, old_kind, old, xid)), pos

    return insert, update, delete


_TEXT_ROWS = _row_handlers(_tuple_text)
_ANY_ROWS = _row_handlers(_tuple_any)


def _with_xid(handler: _DataHandler) -> _Handler:
    """Inside a stream, the same message with the (sub)transaction id read first."""

    def streamed(buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
        (xid,) = _U32.unpack_from(buf, pos)
        return handler(buf, pos + 4, xid)

    return streamed


class Decoder:
    """Decodes the pgoutput messages of one replication connection, in order.

    It is stateful only in what the protocol makes stateful: whether a stream block (Stream
    Start ... Stream Stop) is open, which changes the layout of data messages. Use one Decoder
    per connection and a fresh one (or `reset()`) after reconnecting, since the server restarts
    cleanly from a transaction boundary.
    """

    __slots__ = ("_inside", "_outside", "_stream_xid", "_table", "protocol_version")

    def __init__(self, protocol_version: int = 1, *, binary: bool = False) -> None:
        if protocol_version not in (1, 2, 3, 4):
            raise ValueError(f"pgoutput protocol version {protocol_version} is not 1, 2, 3 or 4")
        self.protocol_version = protocol_version
        insert, update, delete = _ANY_ROWS if binary else _TEXT_ROWS
        data: dict[int, _DataHandler] = {
            ord("I"): insert,
            ord("U"): update,
            ord("D"): delete,
            ord("R"): _relation,
            ord("Y"): _type,
            ord("T"): _truncate,
            ord("M"): _message,
        }
        outside: dict[int, _Handler] = {
            ord("B"): _begin,
            ord("C"): _commit,
            ord("O"): _origin,
            **{kind: cast(_Handler, handler) for kind, handler in data.items()},
        }
        inside: dict[int, _Handler] = {}
        if protocol_version >= 2:
            outside[ord("S")] = self._stream_start
            outside[ord("c")] = _stream_commit
            outside[ord("A")] = _stream_abort
            inside = {kind: _with_xid(handler) for kind, handler in data.items()}
            inside[ord("O")] = _origin
            inside[ord("E")] = self._stream_stop
        if protocol_version >= 3:
            outside[ord("b")] = _begin_prepare
            outside[ord("P")] = _prepare_like(Prepare)
            outside[ord("K")] = _prepare_like(CommitPrepared)
            outside[ord("r")] = _rollback_prepared
            outside[ord("p")] = _prepare_like(StreamPrepare)
        self._outside = outside
        self._inside = inside
        self._table = outside
        self._stream_xid: int | None = None

    @property
    def in_stream(self) -> bool:
        return self._stream_xid is not None

    @property
    def stream_xid(self) -> int | None:
        """The top-level xid of the open stream block, if any."""
        return self._stream_xid

    def reset(self) -> None:
        """Forget stream state, as after a reconnect."""
        self._stream_xid = None
        self._table = self._outside

    def decode(
        self, data: bytes | bytearray | memoryview, *, lsn: Lsn | None = None, offset: int = 0
    ) -> PgOutputMessage:
        """Decode the message in `data[offset:]`, which must hold exactly one message.

        `lsn` (the XLogData start LSN) is only used to say where a bad message was. `offset`
        lets the caller pass the whole XLogData and skip its header without another copy.
        """
        buf = data if type(data) is bytes else bytes(data)
        if offset >= len(buf):
            raise PgOutputError("empty pgoutput message", lsn=lsn, offset=0)
        kind = buf[offset]
        handler = self._table.get(kind)
        if handler is None:
            raise PgOutputError(self._unknown(kind), lsn=lsn, offset=0)
        try:
            message, end = handler(buf, offset + 1)
        except PgOutputError:
            raise
        except (struct.error, IndexError, ValueError) as exc:
            # UnicodeDecodeError is a ValueError; IndexError and struct.error mean truncation.
            problem = f"malformed {chr(kind)!r} message: {exc}"
            raise PgOutputError(problem, lsn=lsn, offset=0) from exc
        if end != len(buf):
            problem = (
                f"{chr(kind)!r} message is {len(buf) - offset} bytes but decoding ended at byte "
                f"{end - offset}: truncated, or the stream state or protocol version is wrong"
            )
            raise PgOutputError(problem, lsn=lsn, offset=end - offset)
        return message

    def _unknown(self, kind: int) -> str:
        shown = repr(bytes([kind]))
        if kind in self._outside or kind in self._inside:
            state = "inside" if self._table is self._inside else "outside"
            return f"pgoutput message {shown} is not expected {state} a stream block"
        return (
            f"unknown pgoutput message type {shown} ({kind:#04x}) for protocol version "
            f"{self.protocol_version}"
        )

    def _stream_start(self, buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
        xid, first = _U32_U8.unpack_from(buf, pos)
        if len(buf) != pos + _U32_U8.size:
            raise ValueError("Stream Start has trailing bytes")
        self._stream_xid = xid
        self._table = self._inside
        return StreamStart(xid, bool(first)), pos + _U32_U8.size

    def _stream_stop(self, buf: bytes, pos: int) -> tuple[PgOutputMessage, int]:
        if len(buf) != pos:
            raise ValueError("Stream Stop has trailing bytes")
        self._stream_xid = None
        self._table = self._outside
        return StreamStop(), pos
