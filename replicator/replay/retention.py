"""Retention: delete what no restore point inside the kept window needs.

The window is the last `keep` (e.g. 35 days): every point from `now - keep` to the latest
must stay restorable. The plan of a restore at the window's start `W` (`replay.prepare`)
gives, per table, the base it starts from: the newest complete snapshot at or before `W`
(a compaction snapshot, the capture's snapshot, or the re-snapshot after a recorded gap).
Every point after `W` starts from that base or a later one, and applies only changes after
its base. So these are unneeded, and only these:

- a table's change segments whose last change is below its base at `W`;
- its snapshot objects (the capture's parts, compaction parts and manifests) below that base:
  superseded snapshots;
- transaction-record segments entirely below the lowest base of all tables;
- compaction parts without a manifest (a run cut short) at a point before the window (a run
  under way now is at the latest point, after it);
- nothing else: never an object of the plan at `W` (the newest complete snapshot before the
  window included), never a table's objects when that table is not in the plan at `W`
  (created later, or dropped before), never schemas, gaps, dead letters, audit records,
  rollbacks, claims or checkpoints (the sinks prune their own checkpoints).

Grace (Litestream's race, #224): a restore that planned before a run may still be reading an
object the run finds unneeded. So a run only *marks* its candidates (a sealed
`retention/<destination>/<time>.json`), and deletes those that were already candidates in a
mark at least `grace` old and still are. A restore shorter than the grace is never broken.

Safety: a run that would delete refuses on a Saturday with weddings upcoming and on a
wedding's eve or day (the calendar of `--config`) unless given a reason, which is recorded;
it writes an audit record (`audit/…`) before deleting anything; and an object the store will
not delete (S3 Object Lock, a legal hold, a credential without delete) is reported, not
fatal. A restore at a point before the window is then refused by the planner, naming the
oldest restorable point.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from connectors.base import ObjectInfo, ObjectStore
from connectors.errors import AlreadyExists, NotFound, StoreError
from replicator.archive.layout import (
    SEGMENTS,
    TRANSACTIONS,
    audit_key,
    is_manifest_key,
    is_part_key,
    is_snapshot_key,
    parse_manifest_key,
    parse_part_key,
    parse_segment_key,
    parse_snapshot_key,
    retention_floor_key,
    retention_key,
    retention_prefix,
)
from replicator.crypto import CryptoError, Keyring, decrypt, encrypt
from replicator.position import Lsn
from replicator.replay.plan import ReplayRefused
from replicator.replay.run import find_destination, prepare

log = logging.getLogger(__name__)

__all__ = ["RetentionReport", "parse_duration", "retention", "unneeded"]

DEFAULT_GRACE = timedelta(hours=1)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """`35d`, `12h`, `90m`, `2w`, `3600s`: a positive duration; `ValueError` otherwise."""
    text = text.strip().lower()
    if len(text) < 2 or text[-1] not in _UNITS or not text[:-1].isdigit() \
            or int(text[:-1]) <= 0:
        raise ValueError(f"{text!r} is not a duration like 35d, 12h, 90m or 2w")
    return timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]])


@dataclass
class RetentionReport:
    destination: str
    window_start: str
    keep: str
    grace_s: float
    candidates: int = 0  # unneeded now
    candidate_bytes: int = 0
    due: int = 0  # unneeded for at least the grace: deleted (or would be, in a dry run)
    due_bytes: int = 0
    deleted: list[str] = field(default_factory=list)
    undeletable: dict[str, str] = field(default_factory=dict)  # name -> why
    kept_marked: int = 0  # candidates waiting for their grace
    dry_run: bool = False
    audit: str | None = None
    floor: str | None = None  # the oldest restorable point once the run deleted
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"destination": self.destination, "window_start": self.window_start,
                "keep": self.keep, "grace_s": self.grace_s, "candidates": self.candidates,
                "candidate_bytes": self.candidate_bytes, "due": self.due,
                "due_bytes": self.due_bytes, "deleted": len(self.deleted),
                "undeletable": self.undeletable, "waiting_for_grace": self.kept_marked,
                "dry_run": self.dry_run, "audit": self.audit, "floor": self.floor,
                "note": self.note}


async def unneeded(store: ObjectStore, keyring: Keyring, window_start: datetime,
                   destination: str | None = None) -> tuple[list[ObjectInfo], str, Lsn]:
    """The objects no point from *window_start* on needs (module docstring), a note (why
    nothing is, when nothing is), and the oldest point restorable once they are gone (the
    highest base)."""
    try:
        prepared = await prepare(store, keyring, at=window_start, destination=destination,
                                 allow_stale=True)
    except ReplayRefused as exc:
        return [], f"nothing to delete: the window's start is not restorable yet ({exc})", \
            Lsn(0)
    listing = prepared.facts.listing if prepared.facts else []
    needed = {key for job in prepared.jobs for key in job.segments}
    bases = {job.table: job.base for job in prepared.jobs}
    lowest = min(bases.values(), default=Lsn(0))
    target = prepared.plan.target
    manifests = {(n.table, n.lsn) for n in (parse_manifest_key(i.key) for i in listing
                                            if is_manifest_key(i.key))}
    found: list[ObjectInfo] = []
    for info in listing:
        key = info.key
        if key in needed:
            continue
        try:
            if key.startswith(SEGMENTS):
                seg = parse_segment_key(key)
                if seg.table in bases and seg.last < bases[seg.table]:
                    found.append(info)
            elif key.startswith(TRANSACTIONS):
                if lowest and parse_segment_key(key).last < lowest:
                    found.append(info)
            elif is_part_key(key):
                part = parse_part_key(key)
                if part.table in bases and part.lsn < bases[part.table]:
                    found.append(info)
            elif is_snapshot_key(key) or is_manifest_key(key):
                snap = (parse_snapshot_key(key) if is_snapshot_key(key)
                        else parse_manifest_key(key))
                if snap.table in bases and (snap.lsn < bases[snap.table] or (
                        is_snapshot_key(key) and (snap.table, snap.lsn) not in manifests
                        and snap.lsn < target)):  # a run cut short before the window
                    found.append(info)
        except ValueError:
            continue  # not a name retention knows: never touched
    return found, "", max(bases.values(), default=Lsn(0))


async def _marks(store: ObjectStore, keyring: Keyring, destination: str
                 ) -> list[tuple[int, str, set[str]]]:
    """The marks of earlier runs: (time in us, name, candidate names), oldest first."""
    marks = []
    async for info in store.list(retention_prefix(destination)):
        try:
            doc = json.loads(decrypt(await store.get(info.key), info.key, keyring))
            marks.append((int(doc["at_us"]), info.key, set(doc["candidates"])))
        except (NotFound, CryptoError, ValueError, KeyError, TypeError) as exc:
            log.warning("retention mark %s is not readable (%s): ignored", info.key, exc)
    return sorted(marks)


async def retention(store: ObjectStore, keyring: Keyring, *, keep: timedelta,
                    grace: timedelta = DEFAULT_GRACE, destination: str | None = None,
                    dry_run: bool = False, guard_finding: str | None = None,
                    reason: str | None = None, now: datetime | None = None,
                    keep_text: str | None = None) -> RetentionReport:
    """One retention run (module docstring). *guard_finding*: what the wedding-day guard
    found (None: nothing); with a finding, a run that would delete needs *reason*."""
    now = now or datetime.now(UTC)
    dest = await find_destination(store, destination)
    start = now - keep
    report = RetentionReport(dest, start.isoformat(), keep_text or f"{keep.total_seconds()}s",
                             grace.total_seconds(), dry_run=dry_run)
    found, report.note, floor = await unneeded(store, keyring, start, dest)
    sizes = {info.key: info.size for info in found}
    report.candidates, report.candidate_bytes = len(sizes), sum(sizes.values())
    now_us = int(now.timestamp() * 1_000_000)
    marks = await _marks(store, keyring, dest)
    old = [m for m in marks if m[0] <= now_us - grace.total_seconds() * 1_000_000]
    due = sorted(set(sizes) & old[-1][2]) if old else []
    report.due, report.due_bytes = len(due), sum(sizes[k] for k in due)
    report.kept_marked = len(sizes) - len(due)
    if dry_run:
        return report
    if due and guard_finding:
        if not reason:
            raise ReplayRefused(f"retention of destination {dest} is refused: {guard_finding}."
                                " Run it another day, or give --override-reason '<why>' (it "
                                "is recorded in the archive's audit records)")
        log.warning("wedding-day protection overridden for retention (%s); reason: %s",
                    guard_finding, reason)
    if due:
        ident = uuid.uuid4().hex[:12]
        report.audit = audit_key(now_us, ident)
        record = {"id": ident, "at": now.isoformat(), "user": getpass.getuser(),
                  "operation": "retention", "destination": dest, "keep": report.keep,
                  "window_start": report.window_start, "deleting": len(due),
                  "bytes": report.due_bytes, "reason": reason, "guard": guard_finding}
        await store.put(report.audit, encrypt(json.dumps(record, sort_keys=True).encode(),
                                              report.audit, keyring))
        # Restores below the floor are refused from now on, by name, before anything goes.
        floor_key = retention_floor_key(floor)
        with contextlib.suppress(AlreadyExists):
            await store.put(floor_key, encrypt(b"{}", floor_key, keyring))
        report.floor = str(floor)
        await _delete(store, due, report)
    left = sorted(set(sizes) - set(report.deleted))
    name = retention_key(dest, now_us)
    await store.put(name, encrypt(json.dumps({"at_us": now_us, "candidates": left},
                                             sort_keys=True).encode(), name, keyring))
    # Keep the marks younger than the grace and the newest older one; the rest add nothing.
    stale = [key for _, key, _ in old[:-1]]
    if stale:
        try:
            await store.delete(stale)
        except StoreError as exc:
            log.warning("old retention marks not deleted (%s)", exc)
    return report


async def _delete(store: ObjectStore, keys: Iterable[str], report: RetentionReport,
                  batch: int = 500) -> None:
    """Delete *keys*, a batch at a time, one by one where a batch fails, so that every
    object the store refuses (Object Lock, a legal hold) is reported and the rest go."""
    keys = list(keys)
    for i in range(0, len(keys), batch):
        chunk = keys[i:i + batch]
        try:
            await store.delete(chunk)
            report.deleted.extend(chunk)
            continue
        except StoreError:
            pass
        for key in chunk:
            try:
                await store.delete([key])
                report.deleted.append(key)
            except StoreError as exc:
                report.undeletable[key] = str(exc.reason)[:300]
    if report.undeletable:
        log.warning("retention: %d objects could not be deleted (Object Lock, a legal hold "
                    "or a credential without delete?), e.g. %s", len(report.undeletable),
                    next(iter(report.undeletable)))


def describe(report: RetentionReport) -> str:
    what = "would delete" if report.dry_run else "deleted"
    done = report.due if report.dry_run else len(report.deleted)
    return (f"destination {report.destination}: window from {report.window_start} "
            f"(keep {report.keep}); {report.candidates} objects "
            f"({report.candidate_bytes:,} bytes) no point in it needs; {what} {done} "
            f"unneeded for over {report.grace_s:.0f}s; {report.kept_marked} wait for their "
            f"grace" + (f"; {len(report.undeletable)} could not be deleted"
                        if report.undeletable else "") + (f". {report.note}"
                                                          if report.note else ""))

