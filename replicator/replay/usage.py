"""`replicator usage`: what a destination's archive holds, and what retention would free.

From one listing of the store and the archived transaction records (no object is read):

- objects and bytes per object kind (change segments, transaction records, the capture's
  snapshot parts, compaction snapshots, schemas, checkpoints, dead letters, claims, audit
  and rollback records, progress and retention objects, anything else);
- per table (segments and snapshot objects, by the table in their names);
- per tier: no object records its tier (a segment holds one tier's changes of one table,
  but neither its name nor its header says which), so the transaction records' changes per
  tier are counted, and the change segments' bytes are shared out in proportion to them
  (`bytes_estimated`);
- growth per day over the last `days` days: the bytes of change segments and compaction
  snapshots by the day their last change committed (from the transaction records, which
  map an LSN to its commit time; objects not placed, e.g. those older than the records
  kept, count as "earlier");
- with `keep`, what a retention run with that window would free now (`replay.retention`).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from connectors.base import ObjectInfo, ObjectStore
from replicator.archive.layout import (
    AUDIT,
    CHECKPOINTS,
    CLAIMS,
    CONFLICTS,
    DEAD_LETTERS,
    GAPS,
    PROGRESS,
    RETENTION,
    ROLLBACKS,
    SCHEMAS,
    SEGMENTS,
    TRANSACTIONS,
    is_manifest_key,
    is_part_key,
    is_snapshot_key,
    parse_manifest_key,
    parse_part_key,
    parse_segment_key,
    parse_snapshot_key,
)
from replicator.archive.reader import Archive
from replicator.crypto import Keyring
from replicator.replay.retention import unneeded
from replicator.replay.run import find_destination

__all__ = ["Usage", "usage"]

_KINDS = ((SEGMENTS, "change segments"), (TRANSACTIONS, "transaction records"),
          (SCHEMAS, "schemas"), (CHECKPOINTS, "checkpoints"), (DEAD_LETTERS, "dead letters"),
          (CLAIMS, "claims"), (AUDIT, "audit records"), (ROLLBACKS, "rollbacks"),
          (PROGRESS, "progress"), (GAPS, "gaps"), (RETENTION, "retention"),
          (CONFLICTS, "conflicts"))


def kind_of(key: str) -> str:
    if is_part_key(key):
        return "capture snapshot parts"
    if is_snapshot_key(key) or is_manifest_key(key):
        return "compaction snapshots"
    for prefix, kind in _KINDS:
        if key.startswith(prefix):
            return kind
    return "other"


def table_of(key: str) -> str | None:
    try:
        if key.startswith(SEGMENTS):
            return parse_segment_key(key).table or None
        if is_part_key(key):
            return parse_part_key(key).table
        if is_snapshot_key(key):
            return parse_snapshot_key(key).table
        if is_manifest_key(key):
            return parse_manifest_key(key).table
    except ValueError:
        return None
    return None


def _last_lsn(key: str) -> int | None:
    try:
        if key.startswith(SEGMENTS):
            return int(parse_segment_key(key).last)
        if is_snapshot_key(key):
            return int(parse_snapshot_key(key).lsn)
        if is_part_key(key):
            return int(parse_part_key(key).lsn)
    except ValueError:
        return None
    return None


@dataclass
class Usage:
    destination: str
    objects: int = 0
    bytes: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    by_table: dict[str, dict[str, int]] = field(default_factory=dict)
    by_day: dict[str, int] = field(default_factory=dict)  # YYYY-MM-DD -> bytes, "earlier"
    by_tier: dict[str, dict[str, int]] = field(default_factory=dict)
    retention: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "objects": self.objects,
                "bytes": self.bytes, "by_kind": self.by_kind, "by_table": self.by_table,
                "by_tier": self.by_tier,
                "growth_per_day": self.by_day, "retention_would_free": self.retention}


def _add(table: dict[str, dict[str, int]], key: str, size: int) -> None:
    row = table.setdefault(key, {"objects": 0, "bytes": 0})
    row["objects"] += 1
    row["bytes"] += size


async def usage(store: ObjectStore, keyring: Keyring, *, days: int = 30,
                keep: timedelta | None = None, destination: str | None = None,
                now: datetime | None = None) -> Usage:
    now = now or datetime.now(UTC)
    dest = await find_destination(store, destination)
    report = Usage(dest)
    listing: list[ObjectInfo] = [info async for info in store.list("")]
    archive = Archive(store, keyring)
    timeline = await archive.read_timeline()
    changes: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for record in await archive.transactions():
        if record.xid and record.commit_lsn not in seen:  # snapshots have no tier counts
            seen.add(record.commit_lsn)
            for tier, n in record.tier_counts.items():
                changes[tier] += n
    points = list(timeline.points)
    lsns = [p.commit_lsn for p in points]
    first_day = (now - timedelta(days=days)).date()
    growth: dict[str, int] = defaultdict(int)
    for info in listing:
        report.objects += 1
        report.bytes += info.size
        _add(report.by_kind, kind_of(info.key), info.size)
        table = table_of(info.key)
        if table is not None:
            _add(report.by_table, table, info.size)
        last = _last_lsn(info.key)
        if last is None:
            continue
        i = bisect.bisect_right(lsns, last) - 1
        day = (datetime.fromtimestamp(points[i].commit_ts_us / 1e6, UTC).date()
               if i >= 0 else None)
        growth[day.isoformat() if day is not None and day >= first_day else "earlier"] += (
            info.size)
    report.by_day = dict(sorted(growth.items()))
    segment_bytes = report.by_kind.get("change segments", {}).get("bytes", 0)
    total = sum(changes.values())
    report.by_tier = {tier: {"changes": n, "bytes_estimated": round(segment_bytes * n / total)}
                      for tier, n in sorted(changes.items())} if total else {}
    if keep is not None:
        found, note, floor = await unneeded(store, keyring, now - keep, dest)
        report.retention = {"keep_s": keep.total_seconds(), "objects": len(found),
                            "bytes": sum(i.size for i in found), "note": note,
                            "oldest_restorable_after": str(floor) if found else None}
    return report
