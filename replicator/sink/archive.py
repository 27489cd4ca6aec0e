"""Reading an archive back: segments and transaction records, decrypted and verified.

Names sort by position, so listing a prefix gives a table's segments in order; each object
is decrypted under its own name (a swapped or tampered object fails with a `CryptoError`
naming it) and its content is checked against its header (`SegmentCorrupt`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from connectors.base import ObjectStore
from replicator.crypto import Keyring, decrypt
from replicator.events import TIER_ORDER, Tier, TransactionRecord
from replicator.position import INVALID_LSN, Lsn
from replicator.sink.checkpoint import parse_checkpoint_key
from replicator.sink.segment import (
    SegmentHeader,
    decode_record_segment,
    decode_transaction_segment,
)


def schema_key(table: str, lsn: Lsn) -> str:
    """`schemas/<table>/<lsn>.json`: the table's schema from *lsn* on (JSON, encrypted)."""
    from urllib.parse import quote

    return f"schemas/{quote(table, safe='')}/{lsn.hex_key()}.json"


GAPS_PREFIX = "gaps/"


def gap_key(start: Lsn, end: Lsn) -> str:
    """`gaps/<from>-<to>.json`: changes between these LSNs may be missing (a lost slot replaced
    after the operator confirmed, recorded by the capture); the name is what a replay plans
    with, the content (JSON, encrypted) says why and when."""
    return f"{GAPS_PREFIX}{start.hex_key()}-{end.hex_key()}.json"


def parse_gap_key(key: str) -> tuple[Lsn, Lsn]:
    """Inverse of `gap_key`; ValueError naming *key* when it is not one."""
    name = key.removeprefix(GAPS_PREFIX).removesuffix(".json")
    start, dash, end = name.partition("-")
    try:
        if not (key.startswith(GAPS_PREFIX) and key.endswith(".json") and dash):
            raise ValueError(key)
        return Lsn.from_key(start), Lsn.from_key(end)
    except ValueError:
        raise ValueError(f"object {key} is not a gap record name "
                         "(gaps/<16 hex digits>-<16 hex digits>.json)") from None


async def recorded_gaps(store: ObjectStore) -> list[tuple[Lsn, Lsn]]:
    """The gaps the destination has archived, sorted."""
    return sorted([parse_gap_key(info.key) async for info in store.list(GAPS_PREFIX)])


async def schemas(store: ObjectStore, keyring: Keyring, table: str) -> list[dict[str, Any]]:
    """The archived schemas of *table*, oldest first."""
    import json
    from urllib.parse import quote

    out = []
    async for info in store.list(f"schemas/{quote(table, safe='')}/"):
        out.append(json.loads(decrypt(await store.get(info.key), info.key, keyring)))
    return out


async def table_names(store: ObjectStore) -> list[str]:
    from urllib.parse import unquote

    tables: set[str] = set()
    async for info in store.list("segments/"):
        tables.add(unquote(info.key.split("/")[1]))
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
    schema at the part's LSN (`replay.render.typed`)."""
    from urllib.parse import quote

    prefix = f"segments/{quote(table, safe='')}/" if table else "segments/"
    async for info in store.list(prefix):
        _, records = await read_segment(store, info.key, keyring)
        for record in records:
            yield record
    async for record in part_records(store, keyring, table):
        yield record


async def part_records(store: ObjectStore, keyring: Keyring, table: str | None = None
                       ) -> AsyncIterator[dict[str, Any]]:
    """The rows of the snapshot parts (of *table*), as envelope-like op `r` records."""
    from urllib.parse import quote

    from replicator.replay.render import PgText, typed
    from replicator.sink.part import (
        KEY_SEPARATOR,
        decode_part,
        is_part_key,
        key_values,
        row_fields,
        split_line,
    )

    prefix = f"snapshots/{quote(table, safe='')}/" if table else "snapshots/"
    types: dict[str, dict[str, str]] = {}
    async for info in store.list(prefix):
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
    async for info in store.list("transactions/"):
        data = decrypt(await store.get(info.key), info.key, keyring)
        _, records = decode_transaction_segment(data)
        for record in records:
            yield record


async def checkpoint(store: ObjectStore, destination: str, tier: Tier | None = None) -> Lsn:
    """The destination's newest checkpoint (overall, or of one tier)."""
    prefix = f"checkpoints/{destination}/" + (f"{tier.value}/" if tier else "")
    latest = INVALID_LSN
    async for info in store.list(prefix):
        rest = info.key[len(prefix):]
        if "/" not in rest and rest not in {t.value for t in TIER_ORDER}:
            latest = max(latest, parse_checkpoint_key(info.key))
    return latest
