"""The compiled envelope writer writes exactly the bytes fastavro writes for the same change:
the capture's content digests, verify's re-encoding (fastavro) and every consumer depend on
it. Whatever the fast writer does not take, fastavro writes."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
from fastavro import schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.events import ChangeEvent, Op, Tier
from replicator.position import ChangePosition, Lsn
from replicator.transport.avro import EncodeError, EventCodec
from replicator.transport.avrowrite import Unsupported, compile_writer, write_long
from tests.unit.test_avro import NOW_NS, ROUND_TRIP, VALUES, event

HINTS = st.sampled_from([None, "json", "jsonb", "_jsonb", "date", "timestamp", "timestamptz",
                         "interval", "_date", "int8", "text"])


def fastavro_bytes(codec: EventCodec, change: ChangeEvent,
                   hints: dict[str, str] | None) -> bytes:
    body = io.BytesIO()
    body.write(codec._header_event)
    schemaless_writer(body, codec.parsed_event_schema, codec.event_datum(change, hints))
    return body.getvalue()


def fast_bytes(codec: EventCodec, change: ChangeEvent, hints: dict[str, str] | None) -> bytes:
    out = bytearray(codec._header_event)
    codec._fast.write(out, change, hints or None, codec._clock() // 1_000_000)
    return bytes(out)


@pytest.fixture
def codec() -> EventCodec:
    return EventCodec("wedsync", clock=lambda: NOW_NS)


@pytest.mark.parametrize(("value", "hint"), [(v, h) for _, v, h in ROUND_TRIP],
                         ids=[name for name, _, _ in ROUND_TRIP])
def test_every_value_kind_is_written_as_fastavro_writes_it(codec: EventCodec, value: Any,
                                                            hint: str | None) -> None:
    change = event({"id": 7, "v": value})
    hints = {"v": hint} if hint else None
    want = fastavro_bytes(codec, change, hints)
    assert fast_bytes(codec, change, hints) == want  # every kind takes the fast path
    assert codec.encode_event(change, hints) == want


@settings(max_examples=400)
@given(
    before=st.none() | st.dictionaries(st.text(min_size=1, max_size=8), VALUES, max_size=6),
    after=st.none() | st.dictionaries(st.text(min_size=1, max_size=8), VALUES, max_size=6),
    key=st.dictionaries(st.text(min_size=1, max_size=4), VALUES, min_size=1, max_size=2),
    unchanged=st.lists(st.text(max_size=6), max_size=3).map(tuple),
    op=st.sampled_from(list(Op)),
    tier=st.sampled_from(list(Tier)),
    lsn=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**40),
    commit_us=st.integers(-(2**62), 2**62),
    xid=st.integers(0, 2**32 - 1),
    origin=st.none() | st.text(max_size=10),
    wedding=st.none() | st.text(max_size=10),
    db=st.text(max_size=8),
    schema=st.text(min_size=1, max_size=8),
    table=st.text(min_size=1, max_size=8),
    hint=HINTS,
)
def test_any_change_is_written_as_fastavro_writes_it(
        before: dict[str, Any] | None, after: dict[str, Any] | None, key: dict[str, Any],
        unchanged: tuple[str, ...], op: Op, tier: Tier, lsn: int, seq: int, commit_us: int,
        xid: int, origin: str | None, wedding: str | None, db: str, schema: str, table: str,
        hint: str | None) -> None:
    codec = EventCodec("p-" + schema, clock=lambda: NOW_NS)
    change = ChangeEvent(op=op, schema=schema, table=table,
                         position=ChangePosition(Lsn(lsn), seq), commit_ts_us=commit_us,
                         xid=xid, key=key, before=before, after=after, unchanged=unchanged,
                         origin=origin, db=db, tier=tier, wedding_id=wedding)
    columns = set(before or ()) | set(after or ()) | set(key)
    hints = {c: hint for c in columns} if hint else None
    try:
        want = fastavro_bytes(codec, change, hints)
    except (EncodeError, ValueError, TypeError, OverflowError):
        with pytest.raises((EncodeError, Unsupported, ValueError, TypeError, OverflowError)):
            fast_bytes(codec, change, hints)
        return
    with contextlib.suppress(Unsupported):  # fastavro writes it; encode_event stays exact
        assert fast_bytes(codec, change, hints) == want
    assert codec.encode_event(change, hints) == want


@given(st.integers(-(2**63), 2**63 - 1))
def test_longs_are_zigzag_varints(n: int) -> None:
    out = bytearray()
    write_long(out, n)
    body = io.BytesIO()
    schemaless_writer(body, {"type": "long"}, n)
    assert bytes(out) == body.getvalue()


def test_what_it_does_not_take_is_unsupported() -> None:
    write = compile_writer({"type": "record", "name": "r", "fields": [
        {"name": "n", "type": "long"}, {"name": "u", "type": ["null", "long", "double"]}]})
    for datum in ({"n": True, "u": None}, {"n": 2**63, "u": None}, {"n": 1, "u": 5},
                  {"n": 1, "u": ("float", 1.0)}, {"n": 1.0, "u": None}):
        with pytest.raises(Unsupported):
            write(bytearray(), datum)
    out = bytearray()
    write(out, {"n": 1, "u": ("double", 0.5)})
    body = io.BytesIO()
    schemaless_writer(body, {"type": "record", "name": "r", "fields": [
        {"name": "n", "type": "long"}, {"name": "u", "type": ["null", "long", "double"]}]},
        {"n": 1, "u": ("double", 0.5)})
    assert bytes(out) == body.getvalue()


def test_an_unencodable_value_is_still_named(codec: EventCodec) -> None:
    with pytest.raises(EncodeError, match="column secret: a set has no Avro Value form"):
        codec.encode_event(event({"id": 1, "secret": {1, 2}}))


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2),
                          st.integers(0, 5)), min_size=1, max_size=30))
def test_a_run_of_changes_is_written_as_fastavro_writes_each(
        steps: list[tuple[int, int, int, int]]) -> None:
    # The writer keeps the encoding of the last commit and millisecond: a change of another
    # transaction, or in another millisecond, must not reuse it.
    now = [NOW_NS]
    codec = EventCodec("wedsync", clock=lambda: now[0])
    for lsn, xid, ms, seq in steps:
        now[0] = NOW_NS + ms * 1_000_000
        change = event({"id": seq}, position=ChangePosition(Lsn(1_000 + lsn), seq),
                       xid=xid, commit_ts_us=1_718_000_000_000_000 + lsn * 7_000)
        assert codec.encode_event(change) == fastavro_bytes(codec, change, None)


TEXT = st.text(max_size=30)
COUNTS = st.dictionaries(TEXT, st.integers(min_value=0, max_value=(1 << 63) - 1), max_size=5)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=(1 << 64) - 1), st.integers(min_value=0),
       st.integers(min_value=-(1 << 62), max_value=(1 << 62)),
       st.integers(min_value=0, max_value=(1 << 32) - 1), st.one_of(st.none(), TEXT),
       COUNTS, COUNTS, st.dictionaries(TEXT, TEXT, max_size=5))
def test_transaction_records_are_written_as_fastavro_writes_them(
        commit: int, end: int, ts: int, xid: int, origin: str | None, counts: dict[str, int],
        tiers: dict[str, int], digests: dict[str, str]) -> None:
    from replicator.events import TransactionRecord

    codec = EventCodec()
    counts = {k: v % (1 << 40) for k, v in counts.items()}  # their total is a long too
    record = TransactionRecord(Lsn(commit), Lsn(end % (1 << 63)), ts, xid, counts, origin,
                               tiers, digests)
    body = io.BytesIO()
    body.write(codec._header_transaction)
    try:
        schemaless_writer(body, codec.parsed_transaction_schema,
                          codec.transaction_datum(record))
    except (ValueError, OverflowError):  # fastavro refuses it: so must the codec
        with pytest.raises(EncodeError):
            codec.encode_transaction(record)
        return
    assert codec.encode_transaction(record) == body.getvalue()
    assert codec.encode_transaction(record, schema_id=9)[5:] == body.getvalue()[10:]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**63 - 2), st.integers(0, 2**63 - 1),
       st.integers(-(2**62), 2**62), st.integers(0, 2**32 - 1),
       st.dictionaries(st.text(max_size=12), st.integers(0, 2**40), max_size=3),
       st.booleans())
def test_a_transaction_after_its_changes_is_written_as_fastavro_writes_it(
        lsn: int, end: int, commit_us: int, xid: int, counts: dict[str, int],
        same_commit: bool) -> None:
    # The record reuses the longs its changes' envelopes were written with: only when the
    # commit is the same one.
    from replicator.events import TransactionRecord

    codec = EventCodec("wedsync", clock=lambda: NOW_NS)
    change = event({"id": 1}, position=ChangePosition(Lsn(lsn), 0), xid=xid,
                   commit_ts_us=commit_us)
    codec.encode_event_digested(change)
    record = TransactionRecord(Lsn(lsn if same_commit else lsn ^ 1), Lsn(end), commit_us, xid,
                               counts, None, {"critical": len(counts)}, {"public.t": "c2:00"})
    body = io.BytesIO()
    body.write(codec._header_transaction)
    schemaless_writer(body, codec.parsed_transaction_schema, codec.transaction_datum(record))
    assert codec.encode_transaction(record) == body.getvalue()
