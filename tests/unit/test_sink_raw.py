"""The raw sink path's reading of headers (sink/raw.py): what it takes, and what it leaves to
the decoding path."""

from __future__ import annotations

from replicator.sink.raw import raw_change
from replicator.transport.avro import EventCodec

CODEC = EventCodec()
BODY = b"\x02abc"
VALUE = b"\xc3\x01" + CODEC.event_fingerprint + BODY
GOOD = [("table", b"public.guests"), ("op", b"u"), ("lsn", b"16/B374D848"), ("seq", b"3"),
        ("tier", b"critical"), ("ts_us", b"1765000000123456"), ("wedding", b"42")]


def with_(headers: list[tuple[str, bytes]], **changes: bytes | None) -> list[tuple[str, bytes]]:
    out = [(k, changes.get(k, v)) for k, v in headers]
    return [(k, v) for k, v in out if v is not None]


def test_facts_and_body_from_headers() -> None:
    found = raw_change(GOOD, VALUE, CODEC.own_event_body)
    assert found is not None
    facts, body = found
    assert facts == ("public.guests", ((0x16 << 32) | 0xB374D848, 3), 1765000000123456, "u",
                     "42", None)
    assert body == BODY


def test_no_wedding_is_none_except_for_deletes() -> None:
    found = raw_change(with_(GOOD, wedding=None), VALUE, CODEC.own_event_body)
    assert found is not None and found[0][4] is None
    assert raw_change(with_(GOOD, wedding=None, op=b"d"), VALUE, CODEC.own_event_body) is None


def test_decoded_instead() -> None:
    cases = [
        with_(GOOD, ts_us=None),  # an older capture
        with_(GOOD, op=b"r"),  # a snapshot row: parts need its values
        with_(GOOD, op=b"t"),
        with_(GOOD, lsn=b"not an lsn"),
        with_(GOOD, seq=b"x"),
        with_(GOOD, ts_us=b"soon"),
        with_(GOOD, table=b"\xff\xfe"),
        with_(GOOD, wedding=b"\xff"),
    ]
    for headers in cases:
        assert raw_change(headers, VALUE, CODEC.own_event_body) is None, headers
    # A value under another writer schema, an unknown one, or not Avro at all.
    for value in (b"\xc3\x01" + b"\x00" * 8 + BODY, b"\x00\x00\x00\x00\x07" + BODY, b"junk"):
        assert raw_change(GOOD, value, CODEC.own_event_body) is None


def test_registry_framing_of_our_own_schema() -> None:
    codec = EventCodec()
    codec.add_writer_schema(codec.event_schema, schema_id=7)
    found = raw_change(GOOD, b"\x00\x00\x00\x00\x07" + BODY, codec.own_event_body)
    assert found is not None and found[1] == BODY


TX_VALUE = b"\xc3\x01" + CODEC.transaction_fingerprint + BODY
TX = [("lsn", b"16/B374D848"), ("end_lsn", b"16/B374D900"), ("ts_us", b"1765000000123456"),
      ("xid", b"912"), ("counts", b'{"public.guests":2}'), ("tiers", b'{"critical":2}')]


def test_transaction_facts_from_headers() -> None:
    from replicator.sink.raw import raw_transaction
    from replicator.transport.avrovalues import transaction_from_dict

    found = raw_transaction(TX, TX_VALUE, CODEC.own_transaction_body)
    assert found is not None
    record, body = found
    assert body == BODY
    tx = transaction_from_dict(record)
    assert (tx.commit_lsn, tx.end_lsn, tx.commit_ts_us, tx.xid, tx.counts, tx.tier_counts) == (
        (0x16 << 32) | 0xB374D848, (0x16 << 32) | 0xB374D900, 1765000000123456, 912,
        {"public.guests": 2}, {"critical": 2})


def test_transaction_decoded_instead() -> None:
    from replicator.sink.raw import raw_transaction

    cases = [
        with_(TX, counts=None),  # an older capture, or too many tables
        with_(TX, counts=b"[1, 2]"),
        with_(TX, counts=b'{"t": "2"}'),
        with_(TX, tiers=b"{not json"),
        with_(TX, xid=b"-"),
        with_(TX, end_lsn=b"0-0"),
    ]
    for headers in cases:
        assert raw_transaction(headers, TX_VALUE, CODEC.own_transaction_body) is None, headers
    # A change's value is not a transaction record's.
    assert raw_transaction(TX, VALUE, CODEC.own_transaction_body) is None


def test_lsn_headers_parsed_strictly() -> None:
    from replicator.position import Lsn
    from replicator.sink.raw import _parse_lsn

    for text in ("0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "a/b"):
        parsed = _parse_lsn(text.encode())
        assert type(parsed) is Lsn and parsed == Lsn.parse(text.upper()), text
    for bad in (b"", b"/", b"16/", b"/1", b"1-2", b"123456789/0", b"0/123456789", b"+1/2",
                b"1/ 2", b"1_0/2", b"g/0", b"1/2/3"):
        try:
            _parse_lsn(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} parsed")


def test_transaction_header_dicts_are_copied_out() -> None:
    """The parsed `counts` are shared between records with the same header text: a
    record built from one owns its dicts."""
    from replicator.sink.raw import raw_transaction
    from replicator.transport.avrovalues import transaction_from_dict

    first = raw_transaction(TX, TX_VALUE, CODEC.own_transaction_body)
    second = raw_transaction(TX, TX_VALUE, CODEC.own_transaction_body)
    assert first is not None and second is not None
    tx = transaction_from_dict(first[0])
    tx.counts["public.other"] = 1
    assert transaction_from_dict(second[0]).counts == {"public.guests": 2}
