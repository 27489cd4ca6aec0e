"""Segments: plain Avro container files of envelope records, in position order, whose header
says what is inside and is checked against the content; names sort by position."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable
from datetime import timedelta
from typing import Any
from uuid import UUID

import fastavro
import pytest

from replicator.archive.layout import (
    SegmentKey,
    SegmentKind,
    parse_segment_key,
    segment_key,
    transactions_key,
)
from replicator.archive.segment import (
    HEADER_PREFIX_SIZE,
    MAX_WEDDING_IDS,
    SegmentCorrupt,
    SegmentError,
    SegmentHeader,
    SegmentHeaderIncomplete,
    chunk_stream,
    decode_record_segment,
    decode_segment,
    decode_transaction_segment,
    encode_body_segment,
    encode_record_segment,
    encode_segment,
    encode_transaction_body_segment,
    encode_transaction_segment,
    event_facts,
    read_header,
    verify_segment,
)
from replicator.crypto import Keyring, decrypt, decrypt_stream, encrypt
from replicator.events import ChangeEvent, Op, Tier, TransactionRecord
from replicator.keys import Infinity
from replicator.position import ChangePosition, Lsn
from replicator.transport.avro import EventCodec
from tests.unit.test_avro import ROUND_TRIP, same

TABLE = "public.guests"
NOW_NS = 1_750_000_000_123_456_789
CODECS = ["zstandard", "deflate"]


def change(lsn: int, seq: int, *, ts: int | None = None, op: Op = Op.CREATE,
           wedding: str | None = "w-1", **fields: Any) -> ChangeEvent:
    values: dict[str, Any] = {
        "op": op, "schema": "public", "table": "guests",
        "position": ChangePosition(Lsn(lsn), seq),
        "commit_ts_us": 1_718_000_000_000_000 + lsn if ts is None else ts,
        "xid": 700 + lsn, "key": {"id": seq}, "after": {"id": seq, "name": "Ana"},
        "db": "wedsync", "tier": Tier.HIGH, "wedding_id": wedding,
    }
    values.update(fields)
    return ChangeEvent(**values)


def events_of_every_kind() -> tuple[list[ChangeEvent], dict[str, dict[str, str]]]:
    """One event per value kind of the Avro tests, plus one row holding all of them."""
    hints = {f"v{i}": hint for i, (_, _, hint) in enumerate(ROUND_TRIP) if hint}
    row = {f"v{i}": value for i, (_, value, _) in enumerate(ROUND_TRIP)}
    events = [change(0x100, i, after={"id": i, f"v{i}": value})
              for i, (_, value, _) in enumerate(ROUND_TRIP)]
    events.append(change(0x200, 0, op=Op.UPDATE, before={"id": 1, **row}, after={"id": 1, **row},
                         unchanged=("notes",), origin="eu-west"))
    events.append(change(0x201, 0, op=Op.DELETE, before={"id": 1}, after=None))
    events.append(change(0x202, 0, op=Op.TRUNCATE, key={}, after=None, wedding=None))
    return events, {TABLE: hints}


def same_row(left: dict[str, Any] | None, right: dict[str, Any] | None) -> bool:
    if left is None or right is None:
        return left is right
    if left.keys() != right.keys():
        return False
    for column, value in left.items():
        back = right[column]
        if getattr(value, "tzinfo", None) is not None and hasattr(value, "date"):
            # timestamptz is an instant: it comes back in UTC (as in the Avro tests)
            if not (back == value and back.utcoffset() == timedelta(0)):
                return False
        elif not same(value, back):
            return False
    return True


def assert_same_events(got: list[ChangeEvent], expected: list[ChangeEvent]) -> None:
    assert len(got) == len(expected)
    for back, event in zip(got, expected, strict=True):
        assert (back.position, back.op, back.qualified_table, back.commit_ts_us, back.xid,
                back.unchanged, back.origin, back.db, back.tier, back.wedding_id) == (
            event.position, event.op, event.qualified_table, event.commit_ts_us, event.xid,
            event.unchanged, event.origin, event.db, event.tier, event.wedding_id)
        for row in ("key", "before", "after"):
            assert same_row(getattr(event, row), getattr(back, row)), (event.position, row)


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_every_value_kind_round_trips(codec: str) -> None:
    events, hints = events_of_every_kind()
    data, header = encode_segment(events, table=TABLE, column_types=hints, codec=codec)
    decoded_header, decoded = decode_segment(data)
    assert decoded_header == header
    assert_same_events(list(decoded), events)


@pytest.mark.parametrize("codec", CODECS)
def test_a_decrypted_segment_is_a_plain_avro_file(codec: str) -> None:
    """Any Avro reader sees the Kafka envelope records, in order, and the wedsync header."""
    events, hints = events_of_every_kind()
    avro = EventCodec("wedsync", clock=lambda: NOW_NS)
    data, header = encode_segment(events, table=TABLE, column_types=hints, codec=codec,
                                  event_codec=avro)
    keyring = Keyring({"k1": bytes(32)})
    plain = decrypt(encrypt(data, header.key, keyring), header.key, keyring)
    reader = fastavro.reader(io.BytesIO(plain), return_record_name=True)
    assert reader.codec == codec
    assert {k: v for k, v in reader.metadata.items() if k.startswith("wedsync.")} \
        == header.metadata()
    expected = [avro.decode_event(avro.encode_event(e, hints[TABLE])) for e in events]
    assert list(reader) == expected


def test_streaming_decode_from_decrypted_chunks() -> None:
    events = [change(lsn, seq) for lsn in range(1, 400) for seq in range(3)]
    data, header = encode_segment(events, table=TABLE, column_types=None, codec="zstandard")
    keyring = Keyring({"k1": bytes(32)})
    blob = encrypt(data, header.key, keyring, chunk_size=1000)
    pieces = (blob[i:i + 777] for i in range(0, len(blob), 777))
    decoded_header, decoded = decode_segment(chunk_stream(
        decrypt_stream(pieces, name=header.key, keyring=keyring)))
    assert decoded_header == header
    assert_same_events(list(decoded), events)


def test_kafka_records_are_written_as_they_came() -> None:
    """The sink's lossless path: decoded envelopes need no type hints and keep ts_ms."""
    avro = EventCodec("wedsync", clock=lambda: NOW_NS)
    hints = {"doc": "jsonb", "until": "date"}
    records = [avro.decode_event(avro.encode_event(
        change(9, seq, after={"id": seq, "doc": '{"a": 1}', "until": Infinity.POSITIVE}), hints))
        for seq in (2, 0, 1)]
    data, header = encode_record_segment(records, table=TABLE, codec="deflate")
    assert header.rows == 3 and header.first == ChangePosition(Lsn(9), 0)
    _, decoded = decode_record_segment(data)
    assert list(decoded) == sorted(records, key=lambda r: r["source"]["seq"])


@pytest.mark.parametrize("codec", CODECS)
def test_kafka_bodies_go_into_the_segment_as_they_are(codec: str) -> None:
    """The sink's path: message bodies are put into the blocks without encoding them again;
    the segment (header and records) is the one `encode_record_segment` writes from the
    decoded records, across several blocks and with key-only deletes."""
    avro = EventCodec("wedsync", clock=lambda: NOW_NS)
    events, hints = events_of_every_kind()
    events += [change(0x300 + n, 0, after={"id": n, "note": "x" * 2000}) for n in range(300)]
    events.append(change(0x500, 1, op=Op.DELETE, before={"id": 5}, after=None, wedding=None))
    messages = [avro.encode_event(e, hints[TABLE]) for e in reversed(events)]
    pairs = [avro.decode_event_body(m) for m in messages]
    assert all(body == m[10:] for (_, body), m in zip(pairs, messages, strict=True))
    data, header = encode_body_segment([(event_facts(value), body) for value, body in pairs],
                                       table=TABLE, codec=codec)
    expected, expected_header = encode_record_segment([v for v, _ in pairs], table=TABLE,
                                                      codec=codec)
    assert header == expected_header and header.unknown_deletes == 1
    assert header.max_block_bytes is not None and header.max_block_bytes >= 256 * 1024
    decoded_header, decoded = decode_record_segment(data)
    assert decoded_header == header
    assert list(decoded) == list(decode_record_segment(expected)[1])
    assert data == expected  # the same bytes: same records, same blocks, same marker


def test_transaction_bodies_go_into_the_segment_as_they_are() -> None:
    records = [TransactionRecord(Lsn(lsn), Lsn(lsn + 8), 1_000 + lsn, 700 + lsn,
                                 {TABLE: 2}, origin=None, digests={TABLE: f"c2:{lsn:032x}"})
               for lsn in (300, 100, 200, 100)]
    avro = EventCodec()
    pairs = [avro.decode_transaction_body(avro.encode_transaction(r)) for r in records]
    data, header = encode_transaction_body_segment(pairs, codec="zstandard")
    assert (data, header) == encode_transaction_segment(records, codec="zstandard")
    assert list(decode_transaction_segment(data)[1]) == [records[1], records[2], records[0]]


def test_transaction_segment() -> None:
    records = [TransactionRecord(Lsn(lsn), Lsn(lsn + 8), 1_000 + lsn, 700 + lsn,
                                 {TABLE: 2, "public.tables": 1}, origin=None)
               for lsn in (300, 100, 200, 100)]
    data, header = encode_transaction_segment(records, codec="zstandard")
    assert header.key == "transactions/0000000000000064-000000000000012C.seg"
    assert (header.kind, header.table, header.rows, header.ops, header.wedding_ids) == (
        SegmentKind.TRANSACTIONS, "", 3, {}, ())
    assert (header.min_commit_ts_us, header.max_commit_ts_us) == (1_100, 1_300)
    decoded_header, decoded = decode_transaction_segment(data)
    assert decoded_header == header == verify_segment(data)
    assert list(decoded) == [records[1], records[2], records[0]]
    with pytest.raises(SegmentError, match="transactions segment, not a changes one"):
        decode_segment(data)
    avro = EventCodec()
    as_kafka = [avro.decode_transaction(avro.encode_transaction(r)) for r in records]
    data, from_kafka = encode_transaction_segment(as_kafka, codec="deflate")
    assert from_kafka == dataclasses.replace(header, codec="deflate")
    assert list(decode_transaction_segment(data)[1]) == [records[1], records[2], records[0]]


# --- the header ------------------------------------------------------------------------------


def test_header_says_what_the_content_holds() -> None:
    events = [
        change(0x30, 1, ts=5_000, op=Op.UPDATE, wedding="w-b"),
        change(0x10, 0, ts=9_000, wedding="w-b"),
        change(0x30, 0, ts=4_000, op=Op.DELETE, wedding=None, after=None, before={"id": 0}),
        change(0x20, 0, ts=7_000, wedding="w-a"),
        change(0x10, 0, ts=9_000, wedding="w-b"),  # redelivered: kept once
    ]
    data, header = encode_segment(events, table=TABLE, column_types=None, codec="deflate")
    assert header.max_block_bytes is not None and 0 < header.max_block_bytes < 1000
    assert dataclasses.replace(header, max_block_bytes=None) == SegmentHeader(
        kind=SegmentKind.CHANGES, table=TABLE,
        first=ChangePosition(Lsn(0x10), 0), last=ChangePosition(Lsn(0x30), 1),
        min_commit_ts_us=4_000, max_commit_ts_us=9_000, rows=4,
        ops={"c": 2, "d": 1, "u": 1}, wedding_ids=("w-a", "w-b"),
        schema_fingerprint=EventCodec().event_fingerprint.hex(), codec="deflate",
        unknown_deletes=1, delete_key_bloom=header.delete_key_bloom)
    # The delete's wedding is unknown (a key-only image): the header says which key it removes.
    assert header.may_delete_key('{"id":0}') and not header.may_delete_key('{"id":1}')
    assert header.key == "segments/public.guests/0000000000000010-0000000000000030.seg"
    assert read_header(data[:HEADER_PREFIX_SIZE]) == header == verify_segment(data)
    _, decoded = decode_segment(data)
    assert [e.position for e in decoded] == sorted({e.position for e in events})
    assert header.may_hold_wedding("w-a") and not header.may_hold_wedding("w-c")


def test_read_header_needs_the_whole_header() -> None:
    data, _ = encode_segment([change(1, 0)], table=TABLE, column_types=None, codec="deflate")
    with pytest.raises(SegmentHeaderIncomplete, match="within the first 100 bytes"):
        read_header(data[:100])
    with pytest.raises(SegmentCorrupt, match="not an Avro object container file"):
        read_header(b"WSE1" + data[4:])


def test_many_weddings_are_flagged_not_listed() -> None:
    ids = [str(UUID(int=i)) for i in range(MAX_WEDDING_IDS)]
    events = [change(1, i, wedding=wedding) for i, wedding in enumerate(ids)]
    data, header = encode_segment(events, table=TABLE, column_types=None, codec="zstandard")
    assert header.wedding_ids == tuple(sorted(ids))
    header_size = data.index(data[-16:]) + 16  # the header ends with the sync marker
    assert 36 * MAX_WEDDING_IDS < header_size < HEADER_PREFIX_SIZE  # the full list still fits
    assert read_header(data[:header_size]) == header

    events.append(change(2, 0, wedding="one-too-many"))
    data, header = encode_segment(events, table=TABLE, column_types=None, codec="zstandard")
    assert header.wedding_ids is None and header.metadata()["wedsync.wedding_ids"] == "many"
    # The ids are in a Bloom filter instead: every one of them may be there, others mostly not.
    assert all(header.may_hold_wedding(w) for w in [*ids, "one-too-many"])
    assert sum(header.may_hold_wedding(f"stranger-{i}") for i in range(1000)) < 50
    header_size = data.index(data[-16:]) + 16
    assert header_size < HEADER_PREFIX_SIZE
    assert verify_segment(data) == header

    long_ids = [f"wedding-{i:04d}-" + "x" * 100 for i in range(500)]  # few, but too many bytes
    events = [change(1, i, wedding=wedding) for i, wedding in enumerate(long_ids)]
    assert encode_segment(events, table=TABLE, column_types=None,
                          codec="deflate")[1].wedding_ids is None


def rewrite(data: bytes, records: Iterable[dict[str, Any]],
            meta: dict[str, str] | None = None) -> bytes:
    """A segment with *data*'s schema and header but other records (or other metadata)."""
    reader = fastavro.reader(io.BytesIO(data), return_record_name=True)
    # Without the block size: the forged content's blocks are not the original's.
    metadata = {k: v for k, v in reader.metadata.items()
                if k.startswith("wedsync.") and k != "wedsync.max_block_bytes"}
    buffer = io.BytesIO()
    fastavro.writer(buffer, reader.writer_schema, records, codec="deflate",
                    metadata={**metadata, **(meta or {})})
    return buffer.getvalue()


def records_of(data: bytes) -> list[dict[str, Any]]:
    reader = fastavro.reader(io.BytesIO(data), return_record_name=True)
    return [record for record in reader if isinstance(record, dict)]


@pytest.mark.parametrize(
    ("change_records", "message"),
    [
        (lambda rs: rs[:-1],
         r"header does not match the content \(last, max_commit_ts_us, rows, ops\)"),
        (lambda rs: rs[1:], r"header does not match the content \(first, .*rows"),
        (lambda rs: [rs[1], rs[0], *rs[2:]], "not in position order"),
        (lambda rs: [rs[0], rs[0], *rs[1:]], "not in position order"),
        (lambda rs: [], "holds no records"),
        (lambda rs: [{**rs[0], "wedding_id": "w-9"}, *rs[1:]],
         r"does not match the content \(wedding_ids\)"),
        (lambda rs: [{**rs[0], "source": {**rs[0]["source"], "ts_us": 1}}, *rs[1:]],
         r"does not match the content \(min_commit_ts_us\)"),
        (lambda rs: [{**rs[0], "source": {**rs[0]["source"], "table": "vendors"}}, *rs[1:]],
         "a segment of public.guests holds a record of public.vendors"),
    ],
)
def test_content_that_contradicts_the_header_is_corrupt(change_records: Any,
                                                        message: str) -> None:
    events = [change(1, 0), change(1, 1, wedding="w-2"), change(2, 0, op=Op.UPDATE)]
    data, _ = encode_segment(events, table=TABLE, column_types=None, codec="deflate")
    forged = rewrite(data, change_records(records_of(data)))
    with pytest.raises(SegmentCorrupt, match=message):
        verify_segment(forged)


@pytest.mark.parametrize(
    ("meta", "error", "message"),
    [
        ({"wedsync.rows": "three"}, SegmentCorrupt, "wedsync.rows is missing or not valid"),
        ({"wedsync.first_lsn": "16-B3"}, SegmentCorrupt, "wedsync.first_lsn is missing or not"),
        ({"wedsync.schema_fingerprint": "0000000000000000"}, SegmentCorrupt,
         "header says schema 0000000000000000"),
        ({"wedsync.format": "2"}, SegmentError, "segment format 2 is newer"),
    ],
)
def test_unreadable_headers(meta: dict[str, str], error: type[Exception], message: str) -> None:
    data, _ = encode_segment([change(1, 0)], table=TABLE, column_types=None, codec="deflate")
    with pytest.raises(error, match=message):
        read_header(rewrite(data, records_of(data), meta))


def test_corrupted_and_foreign_bytes() -> None:
    data, _ = encode_segment([change(1, i) for i in range(50)], table=TABLE, column_types=None,
                             codec="zstandard")
    damaged = data[:-40] + bytes(b ^ 0xFF for b in data[-40:-20]) + data[-20:]
    with pytest.raises(SegmentCorrupt, match="is corrupt after 0 records"):
        verify_segment(damaged)
    with pytest.raises(SegmentCorrupt, match="ends inside its header"):
        verify_segment(data[:50])
    plain = io.BytesIO()
    fastavro.writer(plain, {"type": "record", "name": "x", "fields": []}, [{}])
    with pytest.raises(SegmentCorrupt, match="not a wedsync segment"):
        verify_segment(plain.getvalue())


def test_refused_input() -> None:
    with pytest.raises(SegmentError, match="at least one record"):
        encode_segment([], table=TABLE, column_types=None, codec="deflate")
    with pytest.raises(SegmentError, match=r"cannot put a record of public\.guests \(0/1#0\) "
                                           r"in a segment of public\.vendors"):
        encode_segment([change(1, 0)], table="public.vendors", column_types=None, codec="deflate")
    with pytest.raises(SegmentError, match="unknown segment codec 'snappy'"):
        encode_segment([change(1, 0)], table=TABLE, column_types=None, codec="snappy")


# --- names -----------------------------------------------------------------------------------


def test_names_sort_by_position() -> None:
    ranges = [("9/0", "9/FF"), ("A/0", "F/0"), ("10/0", "10/0"), ("FFFFFFFF/FFFFFFFF",) * 2,
              ("0/1", "0/8")]
    lsns = [(Lsn.parse(a), Lsn.parse(b)) for a, b in ranges]
    keys = [segment_key(TABLE, a, b) for a, b in lsns]
    assert sorted(keys) == [segment_key(TABLE, a, b) for a, b in sorted(lsns)]
    assert sorted(transactions_key(a, b) for a, b in lsns) \
        == [transactions_key(a, b) for a, b in sorted(lsns)]
    assert keys[2] == "segments/public.guests/0000001000000000-0000001000000000.seg"


def test_keys_parse_back() -> None:
    first, last = Lsn.parse("16/B374D848"), Lsn.parse("16/B3750000")
    key = segment_key(TABLE, first, last)
    assert parse_segment_key(key) == SegmentKey(SegmentKind.CHANGES, TABLE, first, last)
    assert parse_segment_key(f"backups/prod/{key}") == parse_segment_key(key)
    odd = 'public."a/b c%"'
    assert segment_key(odd, first, last).startswith("segments/public.%22a%2Fb%20c%25%22/")
    assert parse_segment_key(segment_key(odd, first, last)).table == odd
    assert parse_segment_key(transactions_key(first, last)) == SegmentKey(
        SegmentKind.TRANSACTIONS, "", first, last)


@pytest.mark.parametrize("key", [
    "segments/public.guests/00000016B374D848-00000016b3750000.seg",  # lower-case hex
    "segments/public.guests/16B374D848-16B3750000.seg",  # not zero-padded
    "segments/public.guests/0000000000000002-0000000000000001.seg",  # backwards
    "segments/public%2eguests/0000000000000001-0000000000000002.seg",  # not canonical
    "snapshots/public.guests/0000000000000001/part-0.seg",
    "transactions/0000000000000001-0000000000000002.avro",
])
def test_foreign_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError):
        parse_segment_key(key)


def test_invalid_ranges_and_tables() -> None:
    with pytest.raises(ValueError, match="ends before it starts"):
        segment_key(TABLE, Lsn(2), Lsn(1))
    for table in ("", ".", ".."):
        with pytest.raises(ValueError, match="invalid table name"):
            segment_key(table, Lsn(1), Lsn(2))


def test_header_metadata_is_json_where_structured() -> None:
    _, header = encode_segment([change(1, 0, wedding="Zoë")], table=TABLE, column_types=None,
                               codec="deflate")
    meta = header.metadata()
    assert json.loads(meta["wedsync.wedding_ids"]) == ["Zoë"]
    assert json.loads(meta["wedsync.ops"]) == {"c": 1}
    assert meta["wedsync.first_lsn"] == "0/1" and meta["wedsync.format"] == "1"


def test_the_same_records_give_the_same_bytes() -> None:
    """A repeated flush after a crash writes an identical object (same name, same digest)."""
    from replicator.archive.segment import encode_transaction_segment
    from replicator.events import TransactionRecord
    from replicator.position import Lsn

    records = [TransactionRecord(Lsn(10 * i), Lsn(10 * i + 5), i, i, {"public.t": 1})
               for i in range(1, 4)]
    first, _ = encode_transaction_segment(records, codec="deflate")
    again, _ = encode_transaction_segment(list(reversed(records)), codec="deflate")
    assert first == again


def test_many_weddings_and_deletes_go_in_bloom_filters() -> None:
    weddings = [f"w-{i}" for i in range(1500)]  # above MAX_WEDDING_IDS: no list
    events = [change(0x10 + i, 0, wedding=w) for i, w in enumerate(weddings)]
    events += [change(0x1000 + i, 0, op=Op.DELETE, wedding=None, after=None, key={"id": i},
                      before={"id": i}) for i in range(300)]
    data, header = encode_segment(events, table=TABLE, column_types=None, codec="deflate")
    assert header.wedding_ids is None and header.wedding_bloom is not None
    assert all(header.may_hold_wedding(w) for w in weddings)
    strangers = [f"x-{i}" for i in range(2000)]
    assert sum(header.may_hold_wedding(w) for w in strangers) < 100  # about 1%
    assert header.unknown_deletes == 300
    assert all(header.may_delete_key(f'{{"id":{i}}}') for i in range(300))
    assert sum(header.may_delete_key(f'{{"id":{i}}}') for i in range(1000, 3000)) < 100
    assert len(data) > 0 and read_header(data[:HEADER_PREFIX_SIZE]) == header
    assert verify_segment(data) == header


def test_a_header_without_the_later_fields_still_reads_and_verifies() -> None:
    events = [change(0x10, 0), change(0x20, 0, op=Op.DELETE, wedding=None, after=None)]
    _, header = encode_segment(events, table=TABLE, column_types=None, codec="deflate")
    old = dataclasses.replace(header, unknown_deletes=None, delete_key_bloom=None)
    records = [EventCodec().event_datum(e) for e in sorted(events, key=lambda e: e.position)]
    buffer = io.BytesIO()
    fastavro.writer(buffer, EventCodec().parsed_event_schema, records, codec="deflate",
                    metadata=old.metadata())
    data = buffer.getvalue()
    assert "wedsync.unknown_deletes" not in old.metadata()
    assert read_header(data) == old == verify_segment(data)
    assert old.may_delete_key('{"id":5}')  # unknown: a wedding restore reads the segment


@pytest.mark.parametrize("codec", CODECS)
def test_reading_after_a_position_passes_over_whole_blocks_only(codec: str) -> None:
    # Records of about 1 KB: a 256 KiB block holds a few hundred; 3,000 make several blocks.
    note = "x" * 1000
    events = [change(lsn, seq, after={"id": seq, "name": note})
              for lsn in range(1, 301) for seq in range(10)]
    data, _ = encode_segment(events, table=TABLE, column_types=None, codec=codec)
    for after in (0, 1, 57, 150, 299, 300):
        _, records = decode_record_segment(io.BytesIO(data), after)
        got = [(r["source"]["lsn"], r["source"]["seq"]) for r in records]
        wanted = [(int(e.position[0]), e.position[1]) for e in events]
        # Every record past the point, in order; before it, only the tail of one block.
        assert got == wanted[len(wanted) - len(got):]
        assert all(p in got for p in wanted if p[0] > after)
        if after >= 150:
            assert len(got) < len(wanted) - 1000
    # The records read are still checked: a last position other than the header's is corrupt.
    forged = rewrite(data, records_of(data)[:-1])
    with pytest.raises(SegmentCorrupt, match="its last record is at"):
        list(decode_record_segment(io.BytesIO(forged), 150)[1])
