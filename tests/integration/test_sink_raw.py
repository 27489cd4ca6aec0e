"""The raw sink path against real Kafka: changes whose headers carry their facts go into
segments without being decoded, and those segments hold the same records, with the same
headers, as the decoding path writes; any Avro reader reads them."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import fastavro
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from connectors.registry import open_store
from replicator.archive import reader
from replicator.archive.layout import segments_prefix
from replicator.config import DestinationConfig, KafkaConfig
from replicator.crypto import decrypt
from replicator.events import ChangeEvent, Op, Tier, TransactionRecord
from replicator.ops.metrics import PipelineCollector
from replicator.position import ChangePosition, Lsn
from replicator.sink import worker as worker_module
from replicator.sink.worker import SinkWorker
from replicator.transport.avro import EventCodec
from replicator.transport.kafka import EventProducer, ensure_topics
from tests.integration import archive_readers as archive
from tests.integration.archive_helpers import FAST, keyring, sink_environ
from tests.integration.sink_helpers import NO_COMPACTION, covered, running

TS = 1_700_000_000_000_000
LONG_WEDDING = "w" * 200  # longer than the wedding header takes: decoded


def events(lsn: int) -> list[ChangeEvent]:
    """One transaction: inserts and updates with weddings, a delete with and one without its
    wedding, an insert without a wedding, one with a very long wedding id."""
    out = []
    seq = 0

    def add(op: Op, ident: int, wedding: str | None, name: str = "x") -> None:
        nonlocal seq
        after = None if op is Op.DELETE else {"id": ident, "name": name}
        before = {"id": ident} if op is Op.DELETE else None
        out.append(ChangeEvent(op, "public", "guests", ChangePosition(Lsn(lsn), seq),
                               TS + seq, 9, {"id": ident}, before, after,
                               tier=Tier.CRITICAL, wedding_id=wedding))
        seq += 1

    for i in range(40):
        add(Op.CREATE, i, str(i % 7), name=f"guest {i} \u00e9")
    for i in range(10):
        add(Op.UPDATE, i, str(i % 7), name="moved")
    add(Op.DELETE, 3, "3")
    add(Op.DELETE, 4, None)  # key-only, no wedding: its key goes into the delete filter
    add(Op.CREATE, 100, None)
    add(Op.CREATE, 101, LONG_WEDDING)
    return out


async def archive_once(kafka: KafkaConfig, root: Path, name: str, end: int
                       ) -> tuple[SinkWorker, list[tuple[Any, list[dict[str, Any]]]]]:
    root.mkdir()  # noqa: ASYNC240 - a test's folder, once
    dest = DestinationConfig(name=name, url=f"file://{root}", flush=FAST,
                             compaction=NO_COMPACTION, compression="deflate")
    store = open_store(dest.url, sink_environ())
    worker = SinkWorker(dest, kafka, store, keyring())
    async with running(worker):
        await covered(store, name, end)
    segments = []
    async for info in store.list(segments_prefix(None)):
        header, records = await archive.read_segment(store, info.key, keyring())
        segments.append((header, records))
        # Any Avro reader: the decrypted object is an Avro object container file.
        plain = decrypt(await store.get(info.key), info.key, keyring())
        assert list(fastavro.reader(io.BytesIO(plain))) == records
    assert await reader.checkpoint(store, name, keyring=keyring()) >= end
    return worker, segments


async def test_raw_path_writes_what_decoding_writes(kafka_bootstrap: str, topic_prefix: str,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix,
                        partitions=2)
    await ensure_topics(kafka_bootstrap, topic_prefix, 2, 1)
    lsn = 0x5000
    sent = events(lsn)
    async with EventProducer(kafka, EventCodec()) as producer:
        for event in sent:
            await producer.send_event(event)
        await producer.send_transaction(TransactionRecord(
            Lsn(lsn), Lsn(lsn + 0x10), TS, 9, {"public.guests": len(sent)}, None,
            {Tier.CRITICAL.value: len(sent)}))
        await producer.flush()
    end = lsn + 0x10

    raw_worker, raw = await archive_once(kafka, tmp_path / "raw", "raw", end)
    # Every change but the key-only delete and the long wedding id went the raw way, and
    # the transaction record too.
    assert raw_worker.stats.raw_changes == len(sent) - 2
    assert raw_worker.stats.raw_transactions == 1
    registry = CollectorRegistry()
    registry.register(PipelineCollector(lambda: None, lambda: {"raw": raw_worker.stats}))
    exposed = generate_latest(registry).decode()
    assert (f'wedsync_sink_raw_records_total{{destination="raw",kind="change"}} '
            f'{float(len(sent) - 2)}') in exposed

    with monkeypatch.context() as patch:  # the decoding path, for the same messages
        patch.setattr(worker_module, "raw_change", lambda *args: None)
        patch.setattr(worker_module, "raw_transaction", lambda *args: None)
        decoded_worker, decoded = await archive_once(kafka, tmp_path / "decoded", "decoded",
                                                     end)
    assert decoded_worker.stats.raw_changes == 0
    assert decoded_worker.stats.raw_transactions == 0
    # The transaction records archived are the same, digests included (from the body).
    stores = [open_store(f"file://{tmp_path / n}", sink_environ()) for n in ("raw", "decoded")]
    transactions = [[r async for r in archive.transaction_records(st, keyring())]
                    for st in stores]
    assert transactions[0] == transactions[1] and len(transactions[0]) == 1
    assert transactions[0][0].counts == {"public.guests": len(sent)}

    def records(segments: list[tuple[Any, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
        found = [r for _, rs in segments for r in rs]
        return sorted(found, key=lambda r: (r["source"]["lsn"], r["source"]["seq"]))

    assert len(records(raw)) == len(sent)
    assert records(raw) == records(decoded)
    assert [r["wedding_id"] for r in records(raw)] == [e.wedding_id for e in sent]

    def headers(segments: list[tuple[Any, list[dict[str, Any]]]]) -> list[Any]:
        return sorted(((h.first, h.last, h.rows, dict(h.ops), h.wedding_ids,
                        h.min_commit_ts_us, h.max_commit_ts_us, h.unknown_deletes,
                        h.delete_key_bloom, h.wedding_bloom) for h, _ in segments), key=str)

    assert headers(raw) == headers(decoded)
    raw_ids = {w for h, _ in raw for w in (h.wedding_ids or ())}
    assert LONG_WEDDING in raw_ids and "3" in raw_ids
