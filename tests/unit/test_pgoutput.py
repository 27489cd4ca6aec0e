"""pgoutput decoding against messages built here from the documented layout.

The builders below follow "Logical Replication Message Formats" field by field, independently of
the decoder's code, so a layout mistake would have to be made twice to go unnoticed.
"""

import contextlib
import struct
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.position import Lsn
from replicator.source.pgoutput import (
    PG_EPOCH,
    UNCHANGED,
    Begin,
    BeginPrepare,
    Binary,
    Column,
    Commit,
    CommitPrepared,
    Decoder,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputError,
    PgOutputMessage,
    Prepare,
    RawValue,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
    from_pg_timestamp,
    to_pg_timestamp,
)

LSN = Lsn.parse("16/B374D848")
END = Lsn.parse("16/B374D900")
TS = 769_000_000_123_456  # 2024-05-14 11:06:40.123456 UTC
XID = 7_000_001
SUBXID = 7_000_002


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def tuple_data(values: tuple[RawValue, ...]) -> bytes:
    out = struct.pack(">H", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED:
            out += b"u"
        elif isinstance(value, Binary):
            out += b"b" + struct.pack(">i", len(value)) + value
        else:
            out += b"t" + struct.pack(">i", len(value)) + value
    return out


def xid_field(xid: int | None) -> bytes:
    return b"" if xid is None else struct.pack(">I", xid)


def begin() -> bytes:
    return b"B" + struct.pack(">QqI", LSN, TS, XID)


def commit() -> bytes:
    return b"C" + struct.pack(">BQQq", 0, LSN, END, TS)


def origin(name: str) -> bytes:
    return b"O" + struct.pack(">Q", LSN) + s(name)


def relation(xid: int | None = None) -> bytes:
    columns = [(1, "id", 23, -1), (0, "name", 1043, 104), (0, "notes", 25, -1)]
    body = struct.pack(">I", 16384) + s("public") + s("guests") + b"d"
    body += struct.pack(">H", len(columns))
    for flags, name, type_oid, modifier in columns:
        body += struct.pack(">B", flags) + s(name) + struct.pack(">Ii", type_oid, modifier)
    return b"R" + xid_field(xid) + body


RELATION = Relation(
    16384,
    "public",
    "guests",
    "d",
    (
        Column(True, "id", 23, -1),
        Column(False, "name", 1043, 104),
        Column(False, "notes", 25, -1),
    ),
)


def type_message(xid: int | None = None) -> bytes:
    return b"Y" + xid_field(xid) + struct.pack(">I", 16500) + s("public") + s("mood")


def insert(values: tuple[RawValue, ...], xid: int | None = None) -> bytes:
    return b"I" + xid_field(xid) + struct.pack(">I", 16384) + b"N" + tuple_data(values)


def update(
    new: tuple[RawValue, ...],
    old: tuple[RawValue, ...] | None = None,
    old_kind: bytes = b"K",
    xid: int | None = None,
) -> bytes:
    body = struct.pack(">I", 16384)
    if old is not None:
        body += old_kind + tuple_data(old)
    return b"U" + xid_field(xid) + body + b"N" + tuple_data(new)


def delete(old: tuple[RawValue, ...], old_kind: bytes = b"K", xid: int | None = None) -> bytes:
    return b"D" + xid_field(xid) + struct.pack(">I", 16384) + old_kind + tuple_data(old)


def truncate(oids: list[int], options: int, xid: int | None = None) -> bytes:
    body = struct.pack(">IB", len(oids), options) + b"".join(struct.pack(">I", o) for o in oids)
    return b"T" + xid_field(xid) + body


def message(transactional: bool, content: bytes, xid: int | None = None) -> bytes:
    body = struct.pack(">BQ", int(transactional), LSN) + s("wedsync") + struct.pack(">I", 5)
    return b"M" + xid_field(xid) + body + content


def stream_start(first: bool = True) -> bytes:
    return b"S" + struct.pack(">IB", XID, int(first))


def two_phase(kind: bytes) -> bytes:
    return kind + struct.pack(">BQQqI", 0, LSN, END, TS, XID) + s("gid-1")


ROW = (b"1", b"Ana", UNCHANGED)

# (protocol version, encoded message, expected decoding), outside any stream.
PLAIN_CASES: list[tuple[int, bytes, PgOutputMessage]] = [
    (1, begin(), Begin(LSN, TS, XID)),
    (1, commit(), Commit(0, LSN, END, TS)),
    (1, origin("eu-west"), Origin(LSN, "eu-west")),
    (1, relation(), RELATION),
    (1, type_message(), Type(16500, "public", "mood")),
    (1, insert((b"1", b"Ana", None)), Insert(16384, (b"1", b"Ana", None))),
    (1, update(ROW), Update(16384, None, None, ROW)),
    (1, update(ROW, old=(b"2",), old_kind=b"K"), Update(16384, "K", (b"2",), ROW)),
    (
        1,
        update(ROW, old=(b"2", b"Bo", None), old_kind=b"O"),
        Update(16384, "O", (b"2", b"Bo", None), ROW),
    ),
    (1, delete((b"1", None, None)), Delete(16384, "K", (b"1", None, None))),
    (1, delete((b"1", b"Ana", b"x"), b"O"), Delete(16384, "O", (b"1", b"Ana", b"x"))),
    (1, truncate([16384, 16390], 0), Truncate((16384, 16390), False, False)),
    (1, truncate([16384], 1), Truncate((16384,), True, False)),
    (1, truncate([16384], 3), Truncate((16384,), True, True)),
    (1, message(True, b"hello"), LogicalMessage(True, LSN, "wedsync", b"hello")),
    (
        1,
        message(False, b"\x00\xff\x00ab"),
        LogicalMessage(False, LSN, "wedsync", b"\x00\xff\x00ab"),
    ),
    (2, b"c" + struct.pack(">IBQQq", XID, 0, LSN, END, TS), StreamCommit(XID, 0, LSN, END, TS)),
    (2, b"A" + struct.pack(">II", XID, SUBXID), StreamAbort(XID, SUBXID)),
    (4, b"A" + struct.pack(">II", XID, SUBXID), StreamAbort(XID, SUBXID)),
    (
        4,
        b"A" + struct.pack(">IIQq", XID, XID, END, TS),
        StreamAbort(XID, XID, END, TS),
    ),
    (
        3,
        b"b" + struct.pack(">QQqI", LSN, END, TS, XID) + s("gid-1"),
        BeginPrepare(LSN, END, TS, XID, "gid-1"),
    ),
    (3, two_phase(b"P"), Prepare(0, LSN, END, TS, XID, "gid-1")),
    (3, two_phase(b"K"), CommitPrepared(0, LSN, END, TS, XID, "gid-1")),
    (3, two_phase(b"p"), StreamPrepare(0, LSN, END, TS, XID, "gid-1")),
    (
        3,
        b"r" + struct.pack(">BQQqqI", 0, LSN, END, TS, TS + 5, XID) + s("gid-1"),
        RollbackPrepared(0, LSN, END, TS, TS + 5, XID, "gid-1"),
    ),
]


@pytest.mark.parametrize(("version", "data", "expected"), PLAIN_CASES)
def test_decodes_each_message_type(version: int, data: bytes, expected: PgOutputMessage) -> None:
    decoded = Decoder(version).decode(data)
    assert decoded == expected
    assert type(decoded) is type(expected)


@pytest.mark.parametrize(("version", "data", "expected"), [c for c in PLAIN_CASES if c[0] == 1])
def test_protocol_1_messages_decode_the_same_under_later_versions(
    version: int, data: bytes, expected: PgOutputMessage
) -> None:
    for later in (2, 3, 4):
        assert Decoder(later).decode(data) == expected


STREAMED_CASES: list[tuple[bytes, PgOutputMessage]] = [
    (relation(XID), RELATION._replace(xid=XID)),
    (type_message(XID), Type(16500, "public", "mood", XID)),
    (insert(ROW, xid=SUBXID), Insert(16384, ROW, SUBXID)),
    (update(ROW, old=(b"1",), xid=XID), Update(16384, "K", (b"1",), ROW, XID)),
    (delete((b"1",), xid=SUBXID), Delete(16384, "K", (b"1",), SUBXID)),
    (truncate([16384], 2, xid=XID), Truncate((16384,), False, True, XID)),
    (message(True, b"hello", xid=XID), LogicalMessage(True, LSN, "wedsync", b"hello", XID)),
    (origin("eu-west"), Origin(LSN, "eu-west")),
]


@pytest.mark.parametrize(("data", "expected"), STREAMED_CASES)
def test_inside_a_stream_data_messages_carry_an_xid(data: bytes, expected: PgOutputMessage) -> None:
    decoder = Decoder(2)
    assert decoder.decode(stream_start()) == StreamStart(XID, True)
    assert decoder.in_stream
    assert decoder.stream_xid == XID
    assert decoder.decode(data) == expected
    assert decoder.decode(b"E") == StreamStop()
    assert not decoder.in_stream


def test_a_streamed_transaction_from_start_to_commit() -> None:
    decoder = Decoder(2)
    decoded = [
        decoder.decode(m)
        for m in [
            stream_start(first=True),
            relation(XID),
            insert((b"1", b"Ana", None), xid=XID),
            b"E",
            stream_start(first=False),
            insert((b"2", b"Bo", None), xid=SUBXID),
            b"E",
            b"A" + struct.pack(">II", XID, SUBXID),
            b"c" + struct.pack(">IBQQq", XID, 0, LSN, END, TS),
            begin(),
            insert((b"3", b"Cy", None)),
            commit(),
        ]
    ]
    assert decoded[1] == RELATION._replace(xid=XID)
    assert decoded[4] == StreamStart(XID, False)
    assert decoded[5] == Insert(16384, (b"2", b"Bo", None), SUBXID)
    assert decoded[7] == StreamAbort(XID, SUBXID, None, None)
    assert decoded[10] == Insert(16384, (b"3", b"Cy", None), None)


def test_unchanged_toast_is_a_marker_distinct_from_any_value() -> None:
    decoded = Decoder(1).decode(update((b"1", b"u", UNCHANGED, None)))
    assert isinstance(decoded, Update)
    assert decoded.new == (b"1", b"u", UNCHANGED, None)
    assert decoded.new[2] is UNCHANGED
    assert type(decoded.new[1]) is bytes  # the text "u" is a value, not the marker
    assert not isinstance(UNCHANGED, bytes | str)
    assert repr(UNCHANGED) == "UNCHANGED"


def test_unknown_message_type_names_the_byte_and_the_lsn() -> None:
    with pytest.raises(PgOutputError, match=r"unknown pgoutput message type b'Z' \(0x5a\)") as info:
        Decoder(4).decode(b"Z\x00\x00", lsn=LSN)
    assert "16/B374D848" in str(info.value)
    assert info.value.lsn == LSN


@pytest.mark.parametrize(
    ("version", "data"),
    [(1, stream_start()), (1, b"E"), (2, two_phase(b"P")), (2, b"b"), (1, b"c")],
)
def test_messages_of_later_protocol_versions_are_unknown(version: int, data: bytes) -> None:
    with pytest.raises(PgOutputError, match="unknown pgoutput message type"):
        Decoder(version).decode(data)


def test_stream_state_violations_are_errors() -> None:
    decoder = Decoder(2)
    with pytest.raises(PgOutputError, match="not expected outside a stream block"):
        decoder.decode(b"E")
    decoder.decode(stream_start())
    with pytest.raises(PgOutputError, match="not expected inside a stream block"):
        decoder.decode(begin())
    with pytest.raises(PgOutputError, match="not expected inside a stream block"):
        decoder.decode(stream_start())
    decoder.reset()
    assert not decoder.in_stream
    assert decoder.decode(begin()) == Begin(LSN, TS, XID)


def test_a_missed_stream_start_shows_as_a_malformed_message() -> None:
    # The xid read as the relation OID shifts everything after it; the length check catches it.
    with pytest.raises(PgOutputError):
        Decoder(2).decode(insert(ROW, xid=XID))


@pytest.mark.parametrize("cut", [1, 3, 5, 9, 12, 20])
def test_truncated_messages_are_errors(cut: int) -> None:
    data = insert((b"1", b"Ana", b"notes"))
    with pytest.raises(PgOutputError, match="'I' message"):
        Decoder(1).decode(data[: len(data) - cut], lsn=LSN)


def test_trailing_bytes_are_errors() -> None:
    with pytest.raises(PgOutputError, match="decoding ended at byte"):
        Decoder(1).decode(commit() + b"\x00")
    with pytest.raises(PgOutputError, match="trailing"):
        Decoder(2).decode(stream_start() + b"\x00")


def test_empty_message_is_an_error() -> None:
    with pytest.raises(PgOutputError, match="empty"):
        Decoder(1).decode(b"")


def test_unknown_column_kind_is_an_error() -> None:
    data = b"I" + struct.pack(">I", 16384) + b"N" + struct.pack(">H", 1) + b"x"
    with pytest.raises(PgOutputError, match="unknown column kind b'x'"):
        Decoder(1).decode(data)


def test_binary_values_need_a_binary_decoder() -> None:
    data = insert((b"1", Binary(b"\x00\x00\x00\x07"), None))
    with pytest.raises(PgOutputError, match="binary-format column value"):
        Decoder(1).decode(data)
    decoded = Decoder(1, binary=True).decode(data)
    assert isinstance(decoded, Insert)
    assert decoded.new == (b"1", b"\x00\x00\x00\x07", None)
    assert type(decoded.new[0]) is bytes
    assert type(decoded.new[1]) is Binary


def test_accepts_memoryview_of_the_whole_xlogdata_with_an_offset() -> None:
    header = b"w" + struct.pack(">QQq", LSN, END, TS)
    assert len(header) == 25
    frame = memoryview(bytearray(header + insert(ROW)))
    assert Decoder(1).decode(frame, offset=25) == Insert(16384, ROW)
    assert Decoder(1).decode(bytearray(insert(ROW))) == Insert(16384, ROW)


def test_non_ascii_names_and_values() -> None:
    decoded = Decoder(1).decode(origin("région-été"))
    assert decoded == Origin(LSN, "région-été")
    value = "Zoë & Maëlle".encode()
    assert Decoder(1).decode(insert((value,))) == Insert(16384, (value,))


def test_invalid_protocol_version() -> None:
    with pytest.raises(ValueError, match="protocol version 5"):
        Decoder(5)


def test_wire_timestamps() -> None:
    assert from_pg_timestamp(0) == datetime(2000, 1, 1, tzinfo=UTC) == PG_EPOCH
    moment = datetime(2024, 5, 14, 11, 6, 40, 123456, tzinfo=UTC)
    assert to_pg_timestamp(moment) == TS
    assert from_pg_timestamp(TS) == moment
    assert from_pg_timestamp(-1) == PG_EPOCH - timedelta(microseconds=1)


raw_values = st.one_of(
    st.none(),
    st.just(UNCHANGED),
    st.binary(max_size=40),
)
rows = st.lists(raw_values, max_size=30).map(tuple)


@given(rows, st.one_of(st.none(), rows), st.sampled_from([b"K", b"O"]), st.booleans())
def test_row_messages_round_trip(
    new: tuple[RawValue, ...], old: tuple[RawValue, ...] | None, old_kind: bytes, streamed: bool
) -> None:
    decoder = Decoder(2)
    xid = None
    if streamed:
        decoder.decode(stream_start())
        xid = XID
    kind: Literal["K", "O"] = "K" if old_kind == b"K" else "O"
    assert decoder.decode(insert(new, xid=xid)) == Insert(16384, new, xid)
    expected = Update(16384, kind if old is not None else None, old, new, xid)
    assert decoder.decode(update(new, old, old_kind, xid=xid)) == expected
    assert decoder.decode(delete(new, old_kind, xid=xid)) == Delete(16384, kind, new, xid)


@given(
    st.sampled_from(b"BCORYIUDTMSEcAbPKrpZ").map(lambda kind: bytes([kind])),
    st.binary(max_size=60),
    st.integers(1, 4),
    st.booleans(),
)
def test_any_bytes_decode_or_raise_pgoutput_error(
    kind: bytes, body: bytes, version: int, streamed: bool
) -> None:
    decoder = Decoder(version)
    if streamed and version >= 2:
        decoder.decode(stream_start())
    with contextlib.suppress(PgOutputError):
        decoder.decode(kind + body)
