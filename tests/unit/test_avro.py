"""Avro envelope: every Postgres value survives the round trip, framing follows the specs
(Avro single-object encoding, Confluent wire format), keys are canonical, and the registry
client speaks the Confluent REST API."""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given
from hypothesis import strategies as st

from replicator.events import ChangeEvent, Op, Tier, TransactionRecord
from replicator.keys import Infinity, Interval, canonical_key, message_key
from replicator.position import ChangePosition, Lsn
from replicator.transport.avro import (
    CodecError,
    EncodeError,
    EventCodec,
    UnknownSchemaError,
    event_from_dict,
    load_schema,
    to_python,
    transaction_from_dict,
)
from replicator.transport.avrowrite import Unsupported
from replicator.transport.registry import (
    RegistryClient,
    RegistryError,
    SchemaNotFound,
    adopt_schema_id,
    subject_for,
)

NOW_NS = 1_750_000_000_123_456_789
N = "com.wedsync.replicator."


def tz(hours: int, minutes: int = 0) -> timezone:
    return timezone(timedelta(hours=hours, minutes=minutes))


@pytest.fixture
def codec() -> EventCodec:
    return EventCodec("wedsync", clock=lambda: NOW_NS)


def event(after: dict[str, Any] | None = None, **changes: Any) -> ChangeEvent:
    fields: dict[str, Any] = {
        "op": Op.CREATE,
        "schema": "public",
        "table": "guests",
        "position": ChangePosition(Lsn.parse("16/B374D848"), 3),
        "commit_ts_us": 1_718_000_000_123_456,
        "xid": 4242,
        "key": {"id": 7},
        "after": {"id": 7} if after is None else after,
        "db": "wedsync",
        "tier": Tier.CRITICAL,
        "wedding_id": "w-1",
    }
    fields.update(changes)
    return ChangeEvent(**fields)


def crc64_avro(data: bytes) -> int:
    """The Avro specification's reference fingerprint algorithm, written out independently."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


# --- values ----------------------------------------------------------------------------------

ROUND_TRIP: list[tuple[str, Any, str | None]] = [
    ("null", None, None),
    ("true", True, None),
    ("false", False, None),
    ("int8 min", -(2**63), None),
    ("int8 max", 2**63 - 1, None),
    ("oid", 4294967295, None),
    ("float", 1.1, None),
    ("float inf", math.inf, None),
    ("float -inf", -math.inf, None),
    ("text", "Zoë & Maëlle 💍", None),
    ("empty text", "", None),
    ("bytea", b"\x00\xffwedding\x00", None),
    ("numeric", Decimal("12345678901234567890.123456789012345678901"), None),
    ("numeric tiny", Decimal("0.000000000000000000000000000001"), None),
    ("numeric scale", Decimal("1.500"), None),
    ("numeric inf", Decimal("Infinity"), None),
    ("numeric -inf", Decimal("-Infinity"), None),
    ("timestamp", datetime(2025, 6, 14, 15, 30, 0, 123456), None),
    ("timestamp before 1970", datetime(1969, 12, 31, 23, 59, 59, 999999), None),
    ("timestamp year 1", datetime(1, 1, 1), None),
    ("timestamp year 9999", datetime(9999, 12, 31, 23, 59, 59, 999999), None),
    ("timestamptz", datetime(2025, 6, 14, 15, 30, 0, 5, tzinfo=tz(2)), None),
    ("timestamptz utc", datetime(2025, 6, 14, 13, 30, tzinfo=UTC), None),
    ("date", date(2025, 6, 14), None),
    ("date before 1970", date(1900, 3, 1), None),
    ("time", time(23, 59, 59, 999999), None),
    ("timetz", time(18, 30, tzinfo=tz(5, 30)), None),
    ("timetz west", time(1, 2, 3, 4, tzinfo=tz(-3)), None),
    ("interval", Interval(-14, 3, -14706789000), None),
    ("uuid", UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), None),
    ("json", '{"b": 1, "a": [1.10, null]}', "json"),
    ("jsonb", '{"a": 1.10}', "jsonb"),
    ("array", [1, None, 3], None),
    ("2-D array", [["a", None], ['b"\\', "c"]], None),
    ("empty array", [], None),
    ("json array", ['{"x": 1}', None], "_jsonb"),
    ("date array", [date(2025, 1, 1), Infinity.POSITIVE], "_date"),
    ("numeric array", [[Decimal("1.0")], [Decimal("NaN")]], None),
    ("date infinity", Infinity.POSITIVE, "date"),
    ("date -infinity", Infinity.NEGATIVE, "date"),
    ("timestamp infinity", Infinity.POSITIVE, "timestamp"),
    ("timestamptz -infinity", Infinity.NEGATIVE, "timestamptz"),
    ("interval infinity", Infinity.POSITIVE, "interval"),
    ("interval -infinity", Infinity.NEGATIVE, "interval"),
]


def same(left: Any, right: Any) -> bool:
    """Equality where NaN equals NaN and the types must match (1 is not True, str not Json)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, list):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, Decimal) and left.is_nan():
        return bool(right.is_nan())
    if isinstance(left, float) and math.isnan(left):
        return bool(math.isnan(right))
    if isinstance(left, (datetime, time)):
        return bool(left == right and left.utcoffset() == right.utcoffset())
    return bool(left == right)


@pytest.mark.parametrize(("value", "hint"), [(v, h) for _, v, h in ROUND_TRIP],
                         ids=[name for name, _, _ in ROUND_TRIP])
def test_every_value_kind_round_trips(codec: EventCodec, value: Any, hint: str | None) -> None:
    hints = {"v": hint} if hint else None
    decoded = codec.decode_event(codec.encode_event(event({"id": 7, "v": value}), hints))
    back = to_python(decoded["after"])["v"]
    if isinstance(value, datetime) and value.tzinfo is not None:
        # timestamptz is an instant; Postgres itself does not keep the offset it printed.
        assert back == value and back.utcoffset() == timedelta(0)
    else:
        assert same(back, value), (back, value)


def test_decimal_nan_round_trips(codec: EventCodec) -> None:
    decoded = codec.decode_event(codec.encode_event(event({"v": Decimal("NaN")})))
    assert decoded["after"]["v"] == (N + "Numeric", {"text": "NaN"})
    assert to_python(decoded["after"])["v"].is_nan()


@pytest.mark.parametrize(
    ("value", "hint", "expected"),
    [
        (Decimal("1E-7"), None, (N + "Numeric", {"text": "0.0000001"})),
        (Decimal("1.50"), None, (N + "Numeric", {"text": "1.50"})),
        (datetime(1970, 1, 1, 0, 0, 1), None, (N + "Timestamp", {"micros": 1_000_000})),
        (datetime(1970, 1, 1, 2, tzinfo=tz(2)), None, (N + "TimestampTz", {"micros": 0})),
        (date(1970, 1, 2), None, (N + "Date", {"days": 1})),
        (date(1969, 12, 31), None, (N + "Date", {"days": -1})),
        (time(0, 0, 1, 5), None, (N + "Time", {"micros": 1_000_005})),
        (time(0, 0, 1, tzinfo=tz(5, 30)), None,
         (N + "TimeTz", {"micros": 1_000_000, "offset_s": 19800})),
        (Infinity.POSITIVE, "date", (N + "Date", {"days": 2**31 - 1})),
        (Infinity.NEGATIVE, "timestamptz", (N + "TimestampTz", {"micros": -(2**63)})),
        (Infinity.POSITIVE, "interval",
         (N + "Interval", {"months": 2**31 - 1, "days": 2**31 - 1, "micros": 2**63 - 1})),
        (UUID(int=1), None, (N + "Uuid", {"text": "00000000-0000-0000-0000-000000000001"})),
        ('{"a":1}', "jsonb", (N + "Json", {"text": '{"a":1}'})),
        ('{"a":1}', "text", '{"a":1}'),
        ('{"a":1}', None, '{"a":1}'),
        ([[1, 2], [3, None]], None,
         (N + "Array", {"items": [(N + "Array", {"items": [1, 2]}),
                                  (N + "Array", {"items": [3, None]})]})),
    ],
)
def test_wire_form_of_values(codec: EventCodec, value: Any, hint: str | None,
                             expected: Any) -> None:
    """What a consumer in another language sees: the documented fields, not Python's."""
    hints = {"v": hint} if hint else None
    assert codec.decode_event(codec.encode_event(event({"v": value}), hints))["after"]["v"] \
        == expected


def test_infinity_without_a_type_hint_is_refused(codec: EventCodec) -> None:
    with pytest.raises(EncodeError, match=r"public\.guests at 16/B374D848#3: column ends_on: "
                                          r"infinity needs the column's type"):
        codec.encode_event(event({"ends_on": Infinity.POSITIVE}))


def test_unsupported_python_type_names_the_column_not_the_value(codec: EventCodec) -> None:
    with pytest.raises(EncodeError, match=r"column secret: a set has no Avro Value form") as info:
        codec.encode_event(event({"secret": {"hunter2"}}))
    assert "hunter2" not in str(info.value)


def test_subclasses_encode_like_their_base(codec: EventCodec) -> None:
    decoded = codec.decode_event(codec.encode_event(event({"lsn": Lsn(5), "tier": Tier.HIGH})))
    assert decoded["after"] == {"lsn": 5, "tier": "high"}


# --- the envelope ----------------------------------------------------------------------------


def test_envelope_fields(codec: EventCodec) -> None:
    ev = event({"id": 7, "name": "Ana"}, op=Op.UPDATE, before={"id": 7, "name": "Ann"},
               origin="eu-west")
    decoded = codec.decode_event(codec.encode_event(ev))
    assert decoded == {
        "before": {"id": 7, "name": "Ann"},
        "after": {"id": 7, "name": "Ana"},
        "key": {"id": 7},
        "unchanged": [],
        "op": "u",
        "ts_ms": NOW_NS // 1_000_000,
        "source": {
            "version": "0.1.0",
            "connector": "wedsync-replicator",
            "name": "wedsync",
            "db": "wedsync",
            "schema": "public",
            "table": "guests",
            "lsn": 0x16B374D848,
            "txId": 4242,
            "ts_ms": 1_718_000_000_123,
            "ts_us": 1_718_000_000_123_456,
            "seq": 3,
            "origin": "eu-west",
        },
        "priority": "critical",
        "wedding_id": "w-1",
    }
    assert event_from_dict(decoded) == ev


def test_unchanged_toast_columns_are_listed_and_absent(codec: EventCodec) -> None:
    ev = event({"id": 7, "name": "Ana"}, op=Op.UPDATE, unchanged=("bio", "photo"))
    decoded = codec.decode_event(codec.encode_event(ev))
    assert decoded["unchanged"] == ["bio", "photo"]
    assert "bio" not in decoded["after"] and "photo" not in decoded["after"]
    assert event_from_dict(decoded).unchanged == ("bio", "photo")


@pytest.mark.parametrize("op", list(Op))
def test_every_op_round_trips(codec: EventCodec, op: Op) -> None:
    shapes: dict[Op, dict[str, Any]] = {
        Op.CREATE: {"after": {"id": 1}},
        Op.READ: {"after": {"id": 1}},
        Op.UPDATE: {"after": {"id": 1}, "before": {"id": 1}},
        Op.DELETE: {"after": None, "before": {"id": 1}},
        Op.TRUNCATE: {"after": None, "key": {}},
    }
    ev = event(op=op, **shapes[op])
    assert event_from_dict(codec.decode_event(codec.encode_event(ev))) == ev


def test_transaction_record_round_trips(codec: EventCodec) -> None:
    record = TransactionRecord(Lsn.parse("16/B374D848"), Lsn.parse("16/B374D878"),
                               1_718_000_000_123_456, 4242,
                               {"public.guests": 3, "public.tables": 1}, origin=None)
    decoded = codec.decode_transaction(codec.encode_transaction(record))
    assert decoded["total"] == 4
    assert transaction_from_dict(decoded) == record
    with pytest.raises(CodecError, match=r"holds a com\.wedsync\.replicator\.TransactionRecord"):
        codec.decode_event(codec.encode_transaction(record))


ROW_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False), st.text(), st.binary(),
    st.decimals(allow_nan=False, places=None),
    st.datetimes(), st.datetimes(timezones=st.timezones()).map(lambda d: d.astimezone(UTC)),
    st.dates(), st.times(), st.uuids(),
    st.builds(Interval, st.integers(-(2**31), 2**31 - 2), st.integers(-(2**31), 2**31 - 2),
              st.integers(-(2**63), 2**63 - 2)),
)
VALUES = st.recursive(ROW_VALUES, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@given(st.dictionaries(st.text(min_size=1, max_size=8), VALUES, max_size=8))
def test_any_row_round_trips(row: dict[str, Any]) -> None:
    codec = EventCodec("p")
    back = to_python(codec.decode_event(codec.encode_event(event(row)))["after"])
    assert back.keys() == row.keys()
    for column, value in row.items():
        assert same(back[column], value), column


# --- framing ---------------------------------------------------------------------------------


def test_crc64_matches_the_avro_test_vector() -> None:
    # share/test/data/schema-tests.txt in the Avro repository: "null" -> 7195948357588979594.
    assert crc64_avro(b'"null"') == 7195948357588979594


def test_single_object_encoding_follows_the_spec(codec: EventCodec) -> None:
    data = codec.encode_event(event())
    schema = load_schema("change_event")
    canonical = to_parsing_canonical_form(schema)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == crc64_avro(canonical.encode()).to_bytes(8, "little")
    # The body is plain Avro binary, readable with the .avsc file alone.
    body = schemaless_reader(io.BytesIO(data[10:]), parse_schema(schema), None)
    assert isinstance(body, dict) and body["source"]["table"] == "guests"
    assert codec.event_fingerprint == data[2:10]


def test_unknown_fingerprint_is_named(codec: EventCodec) -> None:
    data = bytearray(codec.encode_event(event()))
    data[2:10] = bytes.fromhex("0102030405060708")
    with pytest.raises(UnknownSchemaError, match="unknown schema fingerprint 0102030405060708"
                       ) as info:
        codec.decode_event(bytes(data))
    assert info.value.fingerprint == bytes.fromhex("0102030405060708")


@pytest.mark.parametrize("data", [b"", b"\x7f{}", b"\xc3\x01\x00"])
def test_unframed_data_is_refused(codec: EventCodec, data: bytes) -> None:
    with pytest.raises(CodecError, match="not an Avro single-object or Confluent"):
        codec.decode_event(data)


def test_truncated_body_is_a_codec_error(codec: EventCodec) -> None:
    data = codec.encode_event(event({"id": 7, "name": "Ana"}))
    with pytest.raises(CodecError, match="corrupt"):
        codec.decode_event(data[:-3])


def test_confluent_wire_format(codec: EventCodec) -> None:
    data = codec.encode_event(event(), schema_id=258)
    assert data[:5] == b"\x00\x00\x00\x01\x02"
    assert data[5:] == codec.encode_event(event())[10:]
    with pytest.raises(UnknownSchemaError, match="unknown schema registry id 258") as info:
        codec.decode_event(data)
    assert info.value.schema_id == 258
    codec.add_writer_schema(codec.event_schema, schema_id=258)
    assert event_from_dict(codec.decode_event(data)) == event()


def test_older_writer_schema_is_resolved_to_ours(codec: EventCodec) -> None:
    """A message from a replicator whose envelope lacked `wedding_id` still reads."""
    older = load_schema("change_event")
    older["fields"] = [f for f in older["fields"] if f["name"] != "wedding_id"]
    parsed = parse_schema(older)
    datum = codec.event_datum(event())
    del datum["wedding_id"]
    buffer = io.BytesIO()
    schemaless_writer(buffer, parsed, datum)
    fp = crc64_avro(to_parsing_canonical_form(older).encode()).to_bytes(8, "little")
    data = b"\xc3\x01" + fp + buffer.getvalue()
    with pytest.raises(UnknownSchemaError):
        codec.decode_event(data)
    codec.add_writer_schema(older)
    decoded = codec.decode_event(data)
    assert decoded["wedding_id"] is None
    assert decoded["after"] == {"id": 7}


def test_the_body_is_the_message_itself_or_encoded_again(codec: EventCodec) -> None:
    """`decode_event_body`: a message of our own schema keeps its bytes; an older writer's,
    a Confluent-framed one or one with trailing bytes gets a body under our schema that
    decodes to the same record."""
    ours = codec.encode_event(event())
    decoded, body = codec.decode_event_body(ours)
    assert body == ours[10:]
    assert schemaless_reader(io.BytesIO(body), codec.parsed_event_schema,
                             return_record_name=True) == decoded
    trailing = codec.decode_event_body(ours + b"\x00junk")
    assert trailing[1] == body and trailing[0] == decoded

    older = load_schema("change_event")
    older["fields"] = [f for f in older["fields"] if f["name"] != "wedding_id"]
    datum = codec.event_datum(event())
    del datum["wedding_id"]
    buffer = io.BytesIO()
    schemaless_writer(buffer, parse_schema(older), datum)
    fp = crc64_avro(to_parsing_canonical_form(older).encode()).to_bytes(8, "little")
    codec.add_writer_schema(older)
    old_decoded, old_body = codec.decode_event_body(b"\xc3\x01" + fp + buffer.getvalue())
    assert old_body != buffer.getvalue()  # resolved to ours: wedding_id is there now
    assert schemaless_reader(io.BytesIO(old_body), codec.parsed_event_schema,
                             return_record_name=True) == old_decoded
    assert old_decoded["wedding_id"] is None


# --- message keys ----------------------------------------------------------------------------


def test_message_key_is_table_nul_sorted_json() -> None:
    ev = event(key={"wedding": UUID(int=10), "id": 42})
    assert message_key(ev) == \
        b'public.guests\x00{"id":42,"wedding":"00000000-0000-0000-0000-00000000000a"}'


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (Decimal("1.50"), Decimal("1.5")),
        (datetime(2025, 1, 1, 12, tzinfo=tz(2)), datetime(2025, 1, 1, 10, tzinfo=UTC)),
        (-0.0, 0.0),
    ],
)
def test_message_key_is_canonical(left: Any, right: Any) -> None:
    assert message_key(event(key={"k": left})) == message_key(event(key={"k": right}))


def test_message_key_of_every_value_kind_is_deterministic() -> None:
    key = {name: value for name, value, _ in ROUND_TRIP}
    assert message_key(event(key=key)) == message_key(event(key=dict(reversed(key.items()))))


# --- schema registry -------------------------------------------------------------------------


@pytest.fixture
async def registry() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A fake Confluent Schema Registry serving the two endpoints the client uses.

    A fake is used only here, because no schema registry can run locally without Docker (the
    Confluent registry is not on Maven Central); it follows the documented REST API: ids are
    global per schema text, registering again returns the same id, unknown ids are 404 with
    error code 40403.
    """
    ids: dict[str, int] = {}
    calls = {"POST": 0, "GET": 0}

    async def register(request: web.Request) -> web.Response:
        calls["POST"] += 1
        assert request.content_type == "application/vnd.schemaregistry.v1+json"
        body = await request.json()
        try:
            json.loads(body["schema"])
        except ValueError:
            return web.json_response({"error_code": 42201, "message": "Invalid schema"},
                                     status=422)
        schema_id = ids.setdefault(body["schema"], len(ids) + 1)
        return web.json_response({"id": schema_id})

    async def fetch(request: web.Request) -> web.Response:
        calls["GET"] += 1
        wanted = int(request.match_info["id"])
        for text, schema_id in ids.items():
            if schema_id == wanted:
                return web.json_response({"schema": text})
        return web.json_response({"error_code": 40403, "message": "Schema not found"},
                                 status=404)

    app = web.Application()
    app.router.add_post("/subjects/{subject}/versions", register)
    app.router.add_get("/schemas/ids/{id}", fetch)
    async with TestServer(app) as server:
        yield str(server.make_url("")), calls


async def test_registry_registers_and_fetches_with_cache(
    registry: tuple[str, dict[str, int]], codec: EventCodec
) -> None:
    url, calls = registry
    async with RegistryClient(url) as client:
        first = await client.register(subject_for("p.critical"), codec.event_schema)
        again = await client.register(subject_for("p.critical"), codec.event_schema)
        other = await client.register(subject_for("p.transactions"), codec.transaction_schema)
        assert first == again != other
        assert calls["POST"] == 2  # the second registration came from the cache
        assert await client.schema(first) == codec.event_schema
        assert calls["GET"] == 0  # known from registering

    async with RegistryClient(url) as reader_client:
        reader = EventCodec("p")
        data = codec.encode_event(event(), schema_id=first)
        with pytest.raises(UnknownSchemaError) as info:
            reader.decode_event(data)
        assert info.value.schema_id is not None
        await adopt_schema_id(reader_client, reader, info.value.schema_id)
        assert calls["GET"] == 1
        assert event_from_dict(reader.decode_event(data)) == event()


async def test_registry_errors_are_mapped(registry: tuple[str, dict[str, int]]) -> None:
    url, _ = registry
    async with RegistryClient(url) as client:
        with pytest.raises(SchemaNotFound, match=r"HTTP 404 \(40403\)") as info:
            await client.schema(999)
        assert info.value.status == 404 and info.value.error_code == 40403
        with pytest.raises(RegistryError, match=r"HTTP 422 \(42201\): Invalid schema"):
            await client.register("s-value", "{not json")


async def test_unreachable_registry_is_a_registry_error() -> None:
    async with RegistryClient("http://127.0.0.1:9", timeout_s=2) as client:
        with pytest.raises(RegistryError, match="unreachable") as info:
            await client.schema(1)
        assert info.value.status is None


def test_records_written_with_an_older_schema_version_stay_readable() -> None:
    """Transaction records from before `tier_counts` existed (schemas/history/) decode, with
    the new field at its default."""
    import io

    from fastavro import parse_schema, schemaless_writer
    from fastavro.schema import fingerprint, to_parsing_canonical_form

    from replicator.transport.avro import SCHEMA_DIR, SINGLE_OBJECT_MARKER

    old = json.loads((SCHEMA_DIR / "history" / "transaction.1.avsc").read_text())
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(old), {
        "commit_lsn": 10, "end_lsn": 11, "commit_ts_us": 5, "xid": 7, "origin": None,
        "counts": {"public.guests": 2}, "total": 2})
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(old), "CRC-64-AVRO"))
    message = SINGLE_OBJECT_MARKER + fp + body.getvalue()
    decoded = EventCodec().decode_transaction(message)
    assert decoded["counts"] == {"public.guests": 2} and decoded["tier_counts"] == {}
    assert decoded["digests"] == {}
    # ... and from before `digests` existed.
    old = json.loads((SCHEMA_DIR / "history" / "transaction.2.avsc").read_text())
    body = io.BytesIO()
    schemaless_writer(body, parse_schema(old), {
        "commit_lsn": 10, "end_lsn": 11, "commit_ts_us": 5, "xid": 7, "origin": None,
        "counts": {"public.guests": 2}, "total": 2, "tier_counts": {"low": 2}})
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(old), "CRC-64-AVRO"))
    decoded = EventCodec().decode_transaction(SINGLE_OBJECT_MARKER + fp + body.getvalue())
    assert decoded["tier_counts"] == {"low": 2} and decoded["digests"] == {}


def test_content_digests_cover_the_avro_body_not_the_framing() -> None:
    # The same change framed for the registry or as a single object has one digest; another
    # change has another; transaction records carry the sums per table.
    from replicator.transport.avro import body_digest, digest_text, transaction_from_dict

    codec = EventCodec(clock=lambda: 1_700_000_000_000_000_000)
    event = ChangeEvent(op=Op.UPDATE, schema="public", table="guests",
                        position=ChangePosition(Lsn(0x10), 0), commit_ts_us=1, xid=7,
                        key={"id": 1}, after={"id": 1, "name": "Ana"}, tier=Tier.LOW)
    single = codec.encode_event(event)
    confluent = codec.encode_event(event, schema_id=42)
    assert single != confluent and body_digest(single) == body_digest(confluent)
    event.after = {"id": 1, "name": "Anna"}
    other = body_digest(codec.encode_event(event))
    assert other != body_digest(single)
    total = digest_text(body_digest(single) + other, content=False)
    assert len(total) == 32 and digest_text((1 << 128) + 5, content=False) == f"{5:032x}"
    assert digest_text(5) == f"c2:{5:032x}"
    record = TransactionRecord(Lsn(0x10), Lsn(0x18), 1, 7, {"public.guests": 2},
                               digests={"public.guests": total})
    decoded = codec.decode_transaction(codec.encode_transaction(record))
    assert transaction_from_dict(decoded).digests == {"public.guests": total}


def test_a_change_sent_again_has_the_same_content_digest() -> None:
    """The content digest leaves out ts_ms (the processing time), so a change sent again
    after a reconnect has the digest of its first send; the fast writer and fastavro's
    fallback (a value the fast writer does not take) agree, and any other field counts."""
    from replicator.transport.avro import content_digest

    first = EventCodec(clock=lambda: 1_700_000_000_000_000_000)
    again = EventCodec(clock=lambda: 1_700_000_123_456_000_000)
    change = ChangeEvent(op=Op.UPDATE, schema="public", table="guests",
                         position=ChangePosition(Lsn(0x10), 0), commit_ts_us=1, xid=7,
                         key={"id": 1}, after={"id": 1, "name": "Ana"}, tier=Tier.LOW)
    one, digest_one = first.encode_event_digested(change)
    two, digest_two = again.encode_event_digested(change, schema_id=9)
    assert one[10:] != two[5:] and digest_one == digest_two
    assert one == first.encode_event(change)
    body = one[10:]
    assert content_digest(body, (0, 0)) != digest_one  # where ts_ms is matters
    zeroed = io.BytesIO()
    schemaless_writer(zeroed, first.parsed_event_schema,
                      first.decode_event(one) | {"ts_ms": 0})
    assert int.from_bytes(hashlib.blake2b(zeroed.getvalue(), digest_size=16).digest(),
                          "big") == digest_one

    def unsupported(*_: Any) -> tuple[int, int]:
        raise Unsupported("as for a value the fast writer does not take")

    again._fast.write = unsupported  # type: ignore[method-assign,assignment]
    assert again.encode_event_digested(change)[1] == digest_one  # fastavro's path
    changed = ChangeEvent(op=Op.UPDATE, schema="public", table="guests",
                          position=ChangePosition(Lsn(0x10), 0), commit_ts_us=1, xid=7,
                          key={"id": 1}, after={"id": 1, "name": "Anna"}, tier=Tier.LOW)
    assert first.encode_event_digested(changed)[1] != digest_one


@given(st.text(min_size=1, max_size=20),
       st.one_of(st.integers(), st.booleans(), st.text(max_size=10), st.none()))
def test_key_text_of_one_column_is_the_canonical_json(name: str, value: Any) -> None:
    # One integer column takes a short path: it gives what the general one gives.
    assert canonical_key({name: value}) == json.dumps({name: value}, sort_keys=True,
                                                 separators=(",", ":"), ensure_ascii=False)
