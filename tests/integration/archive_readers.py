"""Test-only readers of an archive: every record of every object, decrypted and checked,
without the planning a restore does (the tests compare what was archived with what was
written)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from connectors.base import ObjectStore
from replicator.archive.layout import (
    TRANSACTIONS,
    is_part_key,
    schemas_prefix,
    segments_prefix,
    snapshots_prefix,
    table_of,
)
from replicator.archive.part import KEY_SEPARATOR, decode_part, key_values, row_fields, split_line
from replicator.archive.reader import checkpoint
from replicator.archive.render import PgText, typed
from replicator.archive.segment import (
    SegmentHeader,
    decode_record_segment,
    decode_transaction_segment,
)
from replicator.crypto import Keyring, decrypt
from replicator.events import TransactionRecord

__all__ = ["change_records", "checkpoint", "part_records", "read_segment", "schemas",
           "table_names", "transaction_records"]


async def schemas(store: ObjectStore, keyring: Keyring, table: str) -> list[dict[str, Any]]:
    """The archived schemas of *table*, oldest first."""
    out = []
    async for info in store.list(schemas_prefix(table)):
        out.append(json.loads(decrypt(await store.get(info.key), info.key, keyring)))
    return out


async def table_names(store: ObjectStore) -> list[str]:
    tables: set[str] = set()
    async for info in store.list(segments_prefix()):
        tables.add(table_of(info.key))
    return sorted(tables)


async def read_segment(store: ObjectStore, key: str, keyring: Keyring
                       ) -> tuple[SegmentHeader, list[dict[str, Any]]]:
    data = decrypt(await store.get(key), key, keyring)
    header, records = decode_record_segment(data)
    return header, list(records)


async def change_records(store: ObjectStore, keyring: Keyring, table: str | None = None
                         ) -> AsyncIterator[dict[str, Any]]:
    """Every archived change record (fastavro dicts), table by table, in name order; then
    the rows of snapshot parts as op `r` records, their values typed by the table's archived
    schema at the part's LSN (`archive.render.typed`)."""
    async for info in store.list(segments_prefix(table)):
        _, records = await read_segment(store, info.key, keyring)
        for record in records:
            yield record
    async for record in part_records(store, keyring, table):
        yield record


async def part_records(store: ObjectStore, keyring: Keyring, table: str | None = None
                       ) -> AsyncIterator[dict[str, Any]]:
    """The rows of the snapshot parts (of *table*), as envelope-like op `r` records."""
    types: dict[str, dict[str, str]] = {}
    async for info in store.list(snapshots_prefix(table)):
        if not is_part_key(info.key):
            continue
        header, batches = decode_part(decrypt(await store.get(info.key), info.key, keyring))
        if header.table not in types:
            history = await schemas(store, keyring, header.table)
            fitting = [s for s in history if s["lsn"] <= header.lsn] or history[:1]
            types[header.table] = {c["name"]: c["type"] for c in
                                   (fitting[-1]["columns"] if fitting else [])}
        kinds = types[header.table]
        schema_name, _, table_name = header.table.partition(".")
        for lines in batches:
            for line in lines:
                seq, wedding, key, row = split_line(line)
                after = {name: None if value is None else typed(PgText(value),
                                                                kinds.get(name, ""))
                         for name, value in zip(header.columns, row_fields(row), strict=True)}
                yield {"op": "r", "before": None, "after": after, "unchanged": [],
                       "key": key_values(key.split(KEY_SEPARATOR), header.key_kinds, header.key),
                       "source": {"lsn": int(header.lsn), "seq": seq, "schema": schema_name,
                                  "table": table_name, "ts_us": header.min_commit_ts_us,
                                  "txId": 0, "origin": None, "db": ""},
                       "priority": header.tier, "wedding_id": wedding}


async def transaction_records(store: ObjectStore, keyring: Keyring
                              ) -> AsyncIterator[TransactionRecord]:
    async for info in store.list(TRANSACTIONS):
        data = decrypt(await store.get(info.key), info.key, keyring)
        _, records = decode_transaction_segment(data)
        for record in records:
            yield record
