"""`replicator impact`: the counting, the window, the segments chosen, the order and the
report's forms; and the whole command over a small archive in an in-process store."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from connectors.memory import MemoryStore
from replicator.archive.layout import (
    checkpoint_key,
    schema_key,
    segment_key,
    segments_prefix,
    transactions_key,
)
from replicator.archive.reader import ReplayFailed, Timeline, checkpoint_document
from replicator.archive.segment import (
    decode_record_segment,
    encode_segment,
    encode_transaction_segment,
)
from replicator.config import ImpactConfig, PriorityConfig, VendorLink
from replicator.crypto import Keyring, encrypt
from replicator.events import ChangeEvent, Op, Tier, TransactionRecord
from replicator.position import ChangePosition, Lsn
from replicator.replay.impact import (
    CSV_HEADER,
    Counts,
    ImpactReport,
    Tally,
    WeddingImpact,
    as_date,
    impact,
    ordered,
    segments_for,
    window_commits,
)
from replicator.replay.plan import ReplayRefused
from replicator.transport.avro import DATE, TIMESTAMP

T0 = 1_780_000_000_000_000  # µs since the epoch
SECOND = 1_000_000


def record(lsn: int, seq: int, op: str, wedding: str | None, ts: int = T0) -> dict[str, Any]:
    return {"source": {"lsn": lsn, "seq": seq, "ts_us": ts}, "op": op, "wedding_id": wedding}


def txn(lsn: int, ts: int, counts: dict[str, int], xid: int = 7) -> TransactionRecord:
    return TransactionRecord(Lsn(lsn), Lsn(lsn + 8), ts, xid, counts)


# --- pure logic ------------------------------------------------------------------------------


def test_counts_by_op_and_truncates_only_when_any() -> None:
    counts = Counts()
    for op in "cuuddr":
        counts.add(op)
    assert counts.to_dict() == {"inserts": 1, "updates": 2, "deletes": 2}
    counts.add("t")
    assert counts.to_dict()["truncates"] == 1 and counts.total == 6


def test_window_commits_per_table_from_the_transaction_records() -> None:
    records = [
        txn(100, T0 - 5 * SECOND, {"public.guests": 10}, xid=0),  # a snapshot: never
        txn(200, T0 - SECOND, {"public.guests": 1}),  # before the window
        txn(300, T0, {"public.guests": 2, "public.bookings": 1}),  # at since: in
        txn(300, T0, {"public.guests": 2, "public.bookings": 1}),  # redelivered
        txn(400, T0 + SECOND, {"public.payments": 1, "public.weddings": 0}),
        txn(500, T0 + 2 * SECOND, {}),  # a heartbeat
        txn(600, T0 + 2 * SECOND, {"public.guests": 1}),  # at until: in
        txn(700, T0 + 3 * SECOND, {"public.guests": 1}),  # after
    ]
    window = window_commits(records, T0, T0 + 2 * SECOND,
                            ["public.guests", "public.bookings", "public.weddings"])
    assert window == {"public.bookings": [300], "public.guests": [300, 600]}


def test_segments_chosen_by_the_lsn_range_in_their_names() -> None:
    def seg(table: str, first: int, last: int) -> str:
        return segment_key(table, Lsn(first), Lsn(last), "abcd")

    listing = [seg("public.guests", 100, 250), seg("public.guests", 260, 299),
               seg("public.guests", 300, 300), seg("public.guests", 310, 700),
               seg("public.bookings", 100, 299), seg("public.weddings", 300, 300)]
    window = {"public.guests": [300, 600], "public.bookings": [300]}
    chosen = segments_for(listing, window)
    assert [(key, table) for key, table, _ in chosen] == [
        (seg("public.guests", 300, 300), "public.guests"),
        (seg("public.guests", 310, 700), "public.guests")]
    with pytest.raises(ReplayRefused, match="not a valid segment name"):
        segments_for(["segments/public.guests/nonsense.seg"], window)


def test_tally_counts_each_position_once_per_wedding_and_apart_when_unknown() -> None:
    tally = Tally({"public.guests": [300, 600], "public.payments": [300]})
    guests = [record(300, 0, "d", "2", T0), record(300, 1, "d", "2", T0),
              record(300, 1, "d", "2", T0),  # the same position again: one change
              record(250, 0, "u", "2", T0 - 1),  # a commit outside the window
              record(600, 0, "c", "1", T0 + 5), record(600, 1, "u", "1", T0 + 5),
              record(600, 2, "r", "1", T0 + 5)]  # a snapshot row is no change
    for r in guests:
        tally.add("public.guests", r)
    tally.add("public.payments", record(300, 0, "d", None))
    tally.add("public.payments", record(300, 1, "t", None))
    tally.add("public.bookings", record(300, 0, "u", "3"))  # not a table of the window
    assert tally.duplicates == 1
    assert sorted(tally.weddings) == ["1", "2"]
    two = tally.weddings["2"]
    assert two.tables["public.guests"].to_dict() == {"inserts": 0, "updates": 0, "deletes": 2}
    assert two.first_us == two.last_us == T0
    one = tally.weddings["1"]
    assert one.tables["public.guests"].to_dict() == {"inserts": 1, "updates": 1, "deletes": 0}
    assert tally.unresolved["public.payments"].to_dict() == {
        "inserts": 0, "updates": 0, "deletes": 1, "truncates": 1}

    # Completeness: the transaction at 300 announced 2 guests changes (found), at 600 four
    # (three found: the snapshot row counts as a position, as replay counts them).
    timeline = Timeline.of([txn(300, T0, {"public.guests": 2, "public.payments": 2}),
                            txn(600, T0 + 5, {"public.guests": 4})])
    with pytest.raises(ReplayFailed, match=r"announced 4 change\(s\) and the archive holds 3"):
        tally.check(timeline)
    Tally({"public.guests": [300]}).check(Timeline.of([txn(300, T0, {"public.guests": 0})]))


def test_tally_of_one_wedding_leaves_the_others_and_the_unknown_out() -> None:
    tally = Tally({"public.guests": [300]}, wedding="2")
    tally.add("public.guests", record(300, 0, "d", "2"))
    tally.add("public.guests", record(300, 1, "d", "5"))
    tally.add("public.guests", record(300, 2, "d", None))
    assert list(tally.weddings) == ["2"] and tally.unresolved == {}


def test_nearest_wedding_first_undated_last_ids_as_numbers() -> None:
    weddings = [WeddingImpact("10", wedding_date=date(2026, 6, 13)),
                WeddingImpact("9", wedding_date=date(2026, 6, 13)),
                WeddingImpact("3"), WeddingImpact("abc"),
                WeddingImpact("7", wedding_date=date(2026, 6, 1))]
    assert [w.wedding_id for w in ordered(weddings)] == ["7", "9", "10", "3", "abc"]


def test_wedding_dates_from_archived_values() -> None:
    assert as_date((DATE, {"days": 0})) == date(1970, 1, 1)
    assert as_date("2026-06-13") == date(2026, 6, 13)
    assert as_date((TIMESTAMP, {"micros": 86_400_000_000 + 5})) == date(1970, 1, 2)
    assert as_date((DATE, {"days": 2**31 - 1})) is None  # infinity
    assert as_date(None) is None


def test_report_forms() -> None:
    wedding = WeddingImpact("2", wedding_date=date(2026, 6, 13), tier=Tier.CRITICAL,
                            vendors=["Florist Ltd", "Venue Ltd"])
    wedding.add("public.guests", "d", T0)
    wedding.add("public.guests", "d", T0 + SECOND)
    wedding.add("public.bookings", "u", T0 + 2 * SECOND)
    report = ImpactReport(T0, T0 + 10 * SECOND, "local", weddings=[wedding],
                          unresolved={"public.payments": Counts(deletes=1)})
    doc = report.to_dict()
    assert {"since", "until", "weddings", "unresolved", "objects_read", "bytes_read",
            "seconds"} <= set(doc)
    entry = doc["weddings"][0]
    assert set(entry) == {"wedding_id", "wedding_date", "tier", "tables", "vendors",
                          "first_change", "last_change"}
    assert entry["wedding_date"] == "2026-06-13" and entry["tier"] == "critical"
    assert entry["first_change"] == "2026-05-28T20:26:40+00:00"
    assert entry["last_change"] == "2026-05-28T20:26:42+00:00"
    assert entry["tables"]["public.guests"] == {"inserts": 0, "updates": 0, "deletes": 2}
    assert doc["unresolved"] == {"public.payments": {"inserts": 0, "updates": 0, "deletes": 1}}
    rows = report.csv_rows()
    assert len(CSV_HEADER) == len(rows[0])
    assert rows == [
        ["2", "2026-06-13", "critical", "public.bookings", "0", "1", "0",
         "2026-05-28T20:26:40+00:00", "2026-05-28T20:26:42+00:00", "Florist Ltd;Venue Ltd"],
        ["2", "2026-06-13", "critical", "public.guests", "0", "0", "2",
         "2026-05-28T20:26:40+00:00", "2026-05-28T20:26:42+00:00", "Florist Ltd;Venue Ltd"],
        ["", "", "", "public.payments", "0", "0", "1", "", "", ""]]


def test_the_vendor_link_configuration() -> None:
    assert ImpactConfig().vendors is None
    link = ImpactConfig.model_validate(
        {"vendors": {"table": "bookings", "column": "vendor"}}).vendors
    assert link == VendorLink(table="public.bookings", column="vendor",
                              wedding_column="wedding_id")
    bad: dict[str, Any]
    for bad in ({"vendors": {"table": "public.bookings"}},
                {"vendors": {"table": "", "column": "vendor"}},
                {"vendors": {"table": "public.bookings", "column": "vendor", "other": 1}},
                {"vendor": {}}):
        with pytest.raises(ValueError):
            ImpactConfig.model_validate(bad)


# --- the whole command over an in-process archive --------------------------------------------

KEYRING = Keyring({"T": b"k" * 32}, active="T")
TODAY = date(2026, 6, 10)
SNAP = 0x100  # the capture's snapshot
DEST = "local"


def event(table: str, lsn: int, seq: int, op: Op, row: dict[str, Any] | None,
          wedding: str | None, ts: int, before: dict[str, Any] | None = None,
          key: dict[str, Any] | None = None) -> ChangeEvent:
    shown = row if row is not None else before
    return ChangeEvent(op=op, schema="public", table=table, position=ChangePosition(Lsn(lsn), seq),
                       commit_ts_us=ts, xid=0 if op is Op.READ else 7,
                       key=key if key is not None else {"id": (shown or {})["id"]},
                       before=before, after=row, wedding_id=wedding)


class Archive:
    """A small archive: weddings 1-4 (dates), guests, bookings (vendors), payments, a
    snapshot and three transactions (before, in, after the window)."""

    def __init__(self) -> None:
        self.name = "impact-" + uuid.uuid4().hex[:8]
        self.store = MemoryStore(self.name)
        self.segments: dict[str, list[ChangeEvent]] = {}
        self.records: list[TransactionRecord] = []

    async def put(self, key: str, plain: bytes) -> None:
        await self.store.put(key, encrypt(plain, key, KEYRING))

    async def segment(self, table: str, events: Sequence[ChangeEvent]) -> str:
        data, header = encode_segment(list(events), table=f"public.{table}", column_types=None,
                                      codec="deflate")
        key = segment_key(f"public.{table}", header.first.commit_lsn, header.last.commit_lsn,
                          uuid.uuid4().hex[:8])
        await self.put(key, data)
        return key

    async def build(self) -> None:
        snap_ts = T0 - 60 * SECOND
        schemas = {
            "weddings": [("id", "bigint"), ("wedding_date", "date")],
            "guests": [("id", "bigint"), ("wedding_id", "bigint"), ("name", "text")],
            "bookings": [("id", "bigint"), ("wedding_id", "bigint"), ("vendor", "text")],
            "payments": [("id", "bigint"), ("booking_id", "bigint")],
        }
        for table, columns in schemas.items():
            doc = {"table": f"public.{table}", "lsn": SNAP, "primary_key": ["id"],
                   "columns": [{"name": n, "type": t, "not_null": n == "id"}
                               for n, t in columns]}
            await self.put(schema_key(f"public.{table}", Lsn(SNAP)), json.dumps(doc).encode())
        days = {1: 3, 2: 20, 3: 60, 4: 200}
        weddings = [event("weddings", SNAP, n, Op.READ,
                          {"id": w, "wedding_date": TODAY + timedelta(days=d)}, str(w), snap_ts)
                    for n, (w, d) in enumerate(days.items())]
        guests = [event("guests", SNAP, n, Op.READ, {"id": g, "wedding_id": 1 + g % 4,
                                                      "name": f"g{g}"}, str(1 + g % 4), snap_ts)
                  for n, g in enumerate(range(1, 13))]
        bookings = [event("bookings", SNAP, n, Op.READ,
                          {"id": 100 + w, "wedding_id": w, "vendor": f"Vendor {w}"}, str(w),
                          snap_ts) for n, w in enumerate(days)]
        payments = [event("payments", SNAP, 0, Op.READ, {"id": 1, "booking_id": 103}, "3",
                          snap_ts)]
        # Before the window: guest 4 (wedding 1) renamed.
        before = [event("guests", 0x200, 0, Op.UPDATE,
                        {"id": 4, "wedding_id": 1, "name": "x"}, "1", T0 - 10 * SECOND)]
        # In it: guests 2 and 6 of wedding 3 deleted, guest 1 of wedding 2 too; booking 104
        # of wedding 4 gets a new vendor; a payment deleted under the default identity.
        inside_ts = T0 + 5 * SECOND
        inside_guests = [
            event("guests", 0x300, 0, Op.DELETE, None, "3", inside_ts,
                  before={"id": 2, "wedding_id": 3, "name": "g2"}),
            event("guests", 0x300, 1, Op.DELETE, None, "3", inside_ts,
                  before={"id": 6, "wedding_id": 3, "name": "g6"}),
            event("guests", 0x300, 2, Op.DELETE, None, "2", inside_ts,
                  before={"id": 1, "wedding_id": 2, "name": "g1"})]
        inside_bookings = [event("bookings", 0x300, 3, Op.UPDATE,
                                 {"id": 104, "wedding_id": 4, "vendor": "New Vendor"}, "4",
                                 inside_ts)]
        inside_payments = [event("payments", 0x300, 4, Op.DELETE, None, None, inside_ts,
                                 key={"id": 1})]
        # After it: wedding 1's guest 8 deleted.
        after = [event("guests", 0x400, 0, Op.DELETE, None, "1", T0 + 30 * SECOND,
                       before={"id": 8, "wedding_id": 1, "name": "g8"})]
        await self.segment("weddings", weddings)
        await self.segment("guests", guests)
        await self.segment("bookings", bookings)
        await self.segment("payments", payments)
        await self.segment("guests", before)
        await self.segment("guests", inside_guests)
        await self.segment("bookings", inside_bookings)
        await self.segment("payments", inside_payments)
        await self.segment("guests", after)
        self.records = [
            txn(SNAP, snap_ts, {"public.weddings": 4}, xid=0),
            txn(SNAP, snap_ts, {"public.guests": 12}, xid=0),
            txn(SNAP, snap_ts, {"public.bookings": 4}, xid=0),
            txn(SNAP, snap_ts, {"public.payments": 1}, xid=0),
            txn(0x200, T0 - 10 * SECOND, {"public.guests": 1}),
            txn(0x300, inside_ts, {"public.guests": 3, "public.bookings": 1,
                                   "public.payments": 1}),
            txn(0x400, T0 + 30 * SECOND, {"public.guests": 1}),
            txn(0x480, T0 + 31 * SECOND, {}),  # a heartbeat
        ]
        for r in self.records:
            r.end_lsn = Lsn(r.commit_lsn + 8) if r.xid else Lsn(r.commit_lsn - 1)
        data, _ = encode_transaction_segment(self.records, codec="deflate")
        await self.put(transactions_key(Lsn(SNAP), Lsn(0x480), "aaaa"), data)
        await self.put(checkpoint_key(DEST, Lsn(0x500)),
                       checkpoint_document(DEST, Lsn(0x500)))


@pytest.fixture
def archive() -> Iterator[Archive]:
    built = Archive()
    asyncio.run(built.build())
    yield built
    MemoryStore.discard(built.name)


def at(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


BOOKINGS = VendorLink(table="public.bookings", column="vendor")


async def run(archive: Archive, **options: Any) -> ImpactReport:
    options.setdefault("calendar", PriorityConfig())
    return await impact(archive.store, KEYRING, today=lambda: TODAY, **options)


async def test_the_window_touches_three_weddings_and_a_payment_of_unknown_wedding(
        archive: Archive) -> None:
    report = await run(archive, since=at(T0), until=at(T0 + 10 * SECOND), vendors=BOOKINGS)
    doc = report.to_dict()
    assert [w["wedding_id"] for w in doc["weddings"]] == ["2", "3", "4"]  # by date
    two, three, four = doc["weddings"]
    assert two["tables"] == {"public.guests": {"inserts": 0, "updates": 0, "deletes": 1}}
    assert (two["wedding_date"], two["tier"]) == ("2026-06-30", "high")
    assert two["vendors"] == ["Vendor 2"]
    assert three["tables"] == {"public.guests": {"inserts": 0, "updates": 0, "deletes": 2}}
    assert (three["tier"], three["vendors"]) == ("normal", ["Vendor 3"])
    assert four["tables"] == {"public.bookings": {"inserts": 0, "updates": 1, "deletes": 0}}
    assert (four["tier"], four["vendors"]) == ("low", ["New Vendor"])  # as of until
    assert three["first_change"] == three["last_change"] == at(T0 + 5 * SECOND).isoformat()
    assert doc["unresolved"] == {"public.payments": {"inserts": 0, "updates": 0, "deletes": 1}}
    assert doc["since"] == at(T0).isoformat() and doc["warnings"] == []
    # Read: the checkpoint and transaction records (once: the restore's second read is
    # kept), the three segments of the window; for the restore two schemas, the bookings'
    # segment of the window, and the weddings' and bookings' snapshot segments (twice: the
    # restore's two passes).
    assert report.segments == 3 and report.objects_read == 12 and report.headers_read == 0
    assert report.bytes_read > 0


def test_the_command_prints_json_csv_and_tables(archive: Archive, tmp_path: Path) -> None:
    runner = CliRunner()
    from replicator.cli import main

    config = tmp_path / "impact.toml"
    config.write_text('[impact]\nvendors = { table = "public.bookings", column = "vendor" }\n')
    args = ["impact", "--from", f"mem://{archive.name}", "--since", at(T0).isoformat(),
            "--until", at(T0 + 10 * SECOND).isoformat(), "--config", str(config)]
    env = {"REPLICATOR_KEK_T": "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s="}
    done = runner.invoke(main, [*args, "--json"], env=env)
    assert done.exit_code == 0, done.output
    assert [w["wedding_id"] for w in json.loads(done.stdout)["weddings"]] == ["2", "3", "4"]
    done = runner.invoke(main, [*args, "--csv"], env=env)
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[0] == ",".join(CSV_HEADER)
    assert lines[1].startswith("2,") and lines[1].endswith(",Vendor 2")
    assert lines[-1] == ",,,public.payments,0,0,1,,,"
    done = runner.invoke(main, args, env=env)
    assert done.exit_code == 0, done.output
    assert "New Vendor" in done.stdout and "unresolved" in done.stdout
    done = runner.invoke(main, args[:-2], env=env)  # no vendor link
    assert done.exit_code == 0 and "no vendor link is configured: add [impact]" in done.stdout
    done = runner.invoke(main, [*args[:5], "--until", at(T0 - 1).isoformat()], env=env)
    assert done.exit_code == 2 and "is after --until" in done.output
    done = runner.invoke(main, [*args[:4], "yesterday"], env=env)
    assert done.exit_code == 2 and "not an ISO 8601 time" in done.output


async def test_one_wedding_reads_only_the_segments_whose_header_may_hold_it(
        archive: Archive) -> None:
    window = {"since": at(T0), "until": at(T0 + 10 * SECOND), "vendors": BOOKINGS}
    everything = await run(archive, **window)
    one = await run(archive, wedding="4", **window)
    assert [w.wedding_id for w in one.weddings] == ["4"]
    assert one.weddings[0].vendors == ["New Vendor"] and one.weddings[0].tier is Tier.LOW
    assert one.unresolved == {}
    assert one.segments_skipped == 2  # the guests' and the payments' segments of the window
    assert one.objects_read < everything.objects_read

    # A wedding the calendar knows, untouched in the window: nothing, and no error.
    quiet = await run(archive, wedding="1", **window)
    assert quiet.weddings == []
    with pytest.raises(ReplayRefused, match="wedding 99 matches nothing in the archive"):
        await run(archive, wedding="99", **window)


async def test_refusals_and_empty_windows(archive: Archive) -> None:
    with pytest.raises(ReplayRefused, match=r"after the newest archived commit "
                                            r".*LSN 0/480"):
        await run(archive, since=at(T0 + 40 * SECOND))
    with pytest.raises(ReplayRefused, match=r"the archive holds no table vendors; its tables "
                                            r"are: public\.bookings"):
        await run(archive, since=at(T0), tables=["vendors"])
    empty = await run(archive, since=at(T0 + 31 * SECOND))
    assert empty.weddings == [] and empty.unresolved == {} and empty.segments == 0
    # --until defaults to the newest archived commit, and --tables narrows.
    later = await run(archive, since=at(T0 + 6 * SECOND), tables=["guests"])
    assert [w.wedding_id for w in later.weddings] == ["1"]
    assert later.to_dict()["until"] == at(T0 + 31 * SECOND).isoformat()
    # No calendar in the archive: dates and tiers unknown, said in a warning.
    other = PriorityConfig(weddings_table="public.calendar")
    report = await run(archive, since=at(T0), until=at(T0 + 10 * SECOND), calendar=other)
    assert all(w.wedding_date is None and w.tier is None for w in report.weddings)
    assert any("public.calendar is not in the archive" in w for w in report.warnings)


async def test_a_missing_segment_is_named(archive: Archive) -> None:
    names = [info.key async for info in archive.store.list(segments_prefix("public.guests"))]
    (victim,) = [name for name in names if "0000000000000300" in name]
    await archive.store.delete([victim])
    with pytest.raises(ReplayFailed, match=r"announced 3 change\(s\) and the archive holds 0"):
        await run(archive, since=at(T0), until=at(T0 + 10 * SECOND))


def test_segment_records_carry_what_the_tally_reads() -> None:
    data, _ = encode_segment([event("guests", 0x300, 0, Op.DELETE, None, "3", T0,
                                    before={"id": 2, "wedding_id": 3, "name": "g2"})],
                             table="public.guests", column_types=None, codec="deflate")
    _, records = decode_record_segment(data)
    (found,) = list(records)
    assert found["op"] == "d" and found["wedding_id"] == "3"
    assert (found["source"]["lsn"], found["source"]["seq"], found["source"]["ts_us"]) == (
        0x300, 0, T0)


def test_the_readable_form_shows_names_as_they_are() -> None:
    from replicator.cli.impact import readable

    wedding = WeddingImpact("[b]7[/b]", vendors=["[Acme] Ltd"])
    wedding.add("public.guests", "t", T0)
    report = ImpactReport(T0, T0 + SECOND, "local", weddings=[wedding],
                          unresolved={"public.x": Counts(truncates=2)})
    shown = readable(report)
    assert "[b]7[/b]" in shown and "[Acme] Ltd" in shown and "truncates" in shown
    assert "no vendor link is configured" in shown


def test_the_service_configuration_takes_an_impact_section(tmp_path: Path) -> None:
    from replicator.config import ConfigError, load_config

    path = tmp_path / "service.toml"
    path.write_text('[source]\ndsn = "host=db dbname=wedsync"\n')
    assert load_config(path, {}).impact.vendors is None
    path.write_text('[source]\ndsn = "host=db dbname=wedsync"\n[impact]\nvendors = '
                    '{ table = "public.bookings", column = "vendor", wedding_column = '
                    '"wedding_id" }\n')
    assert load_config(path, {}).impact.vendors == VendorLink(
        table="public.bookings", column="vendor")
    path.write_text('[source]\ndsn = "host=db dbname=wedsync"\n[impact]\nvendors = '
                    '{ table = "public.bookings", colum = "vendor" }\n')
    with pytest.raises(ConfigError, match=r"impact\.vendors\.colum: unknown key"):
        load_config(path, {})


async def test_kept_rows_are_the_same_from_copy_text_and_from_values() -> None:
    """The restore hands the keeper COPY text when it can (`write_copy`), values otherwise
    (`write`): both keep the same rows, with the same texts."""
    from replicator.archive.part import row_fields
    from replicator.archive.render import copy_escape
    from replicator.position import Lsn
    from replicator.replay.impact import KeepRows
    from replicator.replay.table import Column, PgText, TableSchema

    schema = TableSchema("public.bookings", (Column("id", "bigint", True),
                                             Column("wedding_id", "text", False),
                                             Column("vendor", "text", False)), ("id",), Lsn(1))
    rows = [["1", "7", "Flowers\tby\\Ann"], ["2", "8", "Cake\nCo"], ["3", None, "x"],
            ["4", "7", None], ["5", "a\tb", "tabbed wedding id"], ["6", "70", "not 7"]]
    text = "".join("\t".join("\\N" if v is None else copy_escape(v) for v in row) + "\n"
                   for row in rows)
    assert [row_fields(line) for line in text.splitlines()] == rows
    kept = []
    for how in ("values", "copy"):
        keep = KeepRows({"public.bookings": {"wedding_id"}}, {"7", "a\tb"})
        async with keep.table(schema) as writer:
            if how == "copy":
                await writer.write_copy(text.encode(), len(rows))  # type: ignore[attr-defined]
            else:
                await writer.write([[None if v is None else PgText(v) for v in row]
                                    for row in rows])
        kept.append(keep.rows["public.bookings"])
    assert kept[0] == kept[1]
    assert [r["id"] for r in kept[0]] == ["1", "4", "5"]
    assert kept[0][0]["vendor"] == "Flowers\tby\\Ann"
