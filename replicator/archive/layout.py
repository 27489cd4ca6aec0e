"""Every object name of the archive, built and parsed here and nowhere else.

A destination's objects live under its store's root and namespace:

    segments/<table>/<first>-<last>[-<digest>].seg         changes of one table (Avro OCF)
    transactions/<first>-<last>[-<digest>].seg             transaction boundary records
    snapshots/<table>/<lsn>/rows-<first seq>-<last seq>-<digest>.part
                                                           a capture snapshot's rows (COPY text)
    snapshots/<table>/<lsn>/part-<n>.snap                  a compaction snapshot's part
    snapshots/<table>/<lsn>/manifest-<parts>.json          written last: that snapshot is whole
    schemas/<table>/<lsn>.json                             the table's schema from <lsn> on
    gaps/<from>-<to>.json                                  changes between may be missing
    checkpoints/<destination>/<lsn>                        everything <= lsn is durable here
    checkpoints/<destination>/<tier>/<lsn>                 ... of that wedding tier
    audit/<time>-<id>.json                                 an operator's override of a guard
    deadletters/<topic>/<partition>-<offset>.json          a record a sink could not decode
    conflicts/<table>/<time>-<digest>.json                 a cross-origin conflict a sink saw

and in the claims store (`kafka.claims_url`, by default the first destination's store):

    claims/<commit lsn>-<seq>-<digest>.avro                one change too large for Kafka

Rules every name keeps:
- LSNs are written as `Lsn.hex_key()` (16 upper-case hex digits) and sequence numbers as ten
  decimal digits, so names sort by position and one LIST is enough to plan a restore.
- `<table>` is the qualified table name percent-encoded with `quote(table, safe="")`
  (`public.guests` stays as it is; a `/` in a quoted identifier becomes `%2F`), so any
  Postgres identifier is one path segment. Parsing is strict: a name that is not the
  canonical spelling of what it parses to is refused, so two names never mean one object.
- `<digest>` (lower-case hex, a hash of the object's bytes) keeps names unique when two
  flushes cover the same position range with different content; an existing name under a
  create-only write then means the same bytes were already written.
- Parsers raise `ValueError` naming the object and the expected form.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Final, NamedTuple
from urllib.parse import quote, unquote

from replicator.events import TIER_ORDER, Tier
from replicator.position import Lsn

__all__ = [
    "AUDIT",
    "CHECKPOINTS",
    "CONFLICTS",
    "DEAD_LETTERS",
    "GAPS",
    "ROLLBACKS",
    "SCHEMAS",
    "SEGMENTS",
    "SNAPSHOTS",
    "TRANSACTIONS",
    "PartKey",
    "SegmentKey",
    "SegmentKind",
    "SnapshotName",
    "audit_key",
    "checkpoint_key",
    "checkpoints_prefix",
    "claim_key",
    "conflict_key",
    "conflicts_prefix",
    "dead_letter_key",
    "destination_of",
    "gap_key",
    "is_checkpoint_key",
    "is_manifest_key",
    "is_part_key",
    "is_snapshot_key",
    "manifest_key",
    "parse_audit_key",
    "parse_checkpoint_key",
    "parse_conflict_key",
    "parse_dead_letter_key",
    "parse_gap_key",
    "parse_manifest_key",
    "parse_part_key",
    "parse_segment_key",
    "parse_snapshot_key",
    "part_key",
    "rollback_key",
    "schema_key",
    "schemas_prefix",
    "segment_key",
    "segments_prefix",
    "snapshots_prefix",
    "table_of",
    "transactions_key",
    "without_digest",
]

# The top-level prefixes (each ends with "/": a LIST of one never returns another's objects).
SEGMENTS: Final = "segments/"
TRANSACTIONS: Final = "transactions/"
SNAPSHOTS: Final = "snapshots/"
SCHEMAS: Final = "schemas/"
GAPS: Final = "gaps/"
CHECKPOINTS: Final = "checkpoints/"
AUDIT: Final = "audit/"
ROLLBACKS: Final = "rollbacks/"
DEAD_LETTERS: Final = "deadletters/"
CLAIMS: Final = "claims/"
PROGRESS: Final = "progress/"
RETENTION: Final = "retention/"
EVES: Final = "eves/"
INCIDENTS: Final = "incidents/"
RETENTION_FLOORS: Final = "retention/floor/"
CONFLICTS: Final = "conflicts/"

_HEX16: Final = "[0-9A-F]{16}"
_DIGEST: Final = re.compile(r"[0-9a-f]{1,64}")
_SEGMENT: Final = re.compile(
    rf"(?:.*/)?(?:segments/(?P<table>[^/]+)|(?P<tx>transactions))"
    rf"/(?P<first>{_HEX16})-(?P<last>{_HEX16})(?:-(?P<digest>[0-9a-f]{{1,64}}))?\.seg")
_PART: Final = re.compile(
    rf"snapshots/(?P<table>[^/]+)/(?P<lsn>{_HEX16})/rows-(?P<first>[0-9]{{10}})-"
    r"(?P<last>[0-9]{10})-(?P<digest>[0-9a-f]{1,64})\.part")
_SNAPSHOT: Final = re.compile(
    rf"snapshots/(?P<table>[^/]+)/(?P<lsn>{_HEX16})/part-(?P<n>0|[1-9][0-9]{{0,8}})\.snap")
_MANIFEST: Final = re.compile(
    rf"snapshots/(?P<table>[^/]+)/(?P<lsn>{_HEX16})/manifest-(?P<n>[1-9][0-9]{{0,8}})\.json")
_GAP: Final = re.compile(rf"gaps/(?P<start>{_HEX16})-(?P<end>{_HEX16})\.json")
_DEAD_LETTER: Final = re.compile(
    r"deadletters/(?P<topic>[^/]+)/(?P<partition>[0-9]{10})-(?P<offset>[0-9]{20})\.json")
_TIERS: Final = frozenset(t.value for t in TIER_ORDER)


def _table(table: str, what: str) -> str:
    """*table* as one path segment; `ValueError` for a name no table can have."""
    if not table or table in (".", ".."):
        raise ValueError(f"invalid table name {table!r} for {what}")
    return quote(table, safe="")


def _unquoted(text: str) -> str:
    return unquote(text, errors="strict")


# --- segments and transaction records --------------------------------------------------------


class SegmentKind(enum.StrEnum):
    CHANGES = "changes"
    TRANSACTIONS = "transactions"


class SegmentKey(NamedTuple):
    """What a segment's name says: kind, table (empty for transactions), LSN range."""

    kind: SegmentKind
    table: str
    first: Lsn
    last: Lsn
    digest: str = ""


def _check_range(first: Lsn, last: Lsn) -> None:
    if last < first:
        raise ValueError(f"segment range {first}-{last} ends before it starts")


def _suffix(digest: str) -> str:
    if digest and not _DIGEST.fullmatch(digest):
        raise ValueError(f"invalid segment digest {digest!r}: lower-case hex expected")
    return f"-{digest}" if digest else ""


def segments_prefix(table: str | None = None) -> str:
    """`segments/`, or `segments/<table>/`: a LIST of it gives the segments in order."""
    return SEGMENTS if table is None else f"{SEGMENTS}{_table(table, 'a segment')}/"


def segment_key(table: str, first_lsn: Lsn, last_lsn: Lsn, digest: str = "") -> str:
    """`segments/<table>/<first>-<last>[-<digest>].seg`, relative to the namespace root."""
    _check_range(first_lsn, last_lsn)
    return (f"{segments_prefix(table)}{first_lsn.hex_key()}-{last_lsn.hex_key()}"
            f"{_suffix(digest)}.seg")


def transactions_key(first_lsn: Lsn, last_lsn: Lsn, digest: str = "") -> str:
    """`transactions/<first>-<last>[-<digest>].seg`, relative to the namespace root."""
    _check_range(first_lsn, last_lsn)
    return f"{TRANSACTIONS}{first_lsn.hex_key()}-{last_lsn.hex_key()}{_suffix(digest)}.seg"


def parse_segment_key(key: str) -> SegmentKey:
    """The inverse of `segment_key` and `transactions_key`; a leading `<root>/<namespace>/`
    is allowed. `ValueError` for any other name, including a non-canonical one."""
    match = _SEGMENT.fullmatch(key)
    if match is None:
        raise ValueError(f"{key!r} is not a segment name (segments/<table>/<16 hex>-<16 hex>.seg "
                         "or transactions/<16 hex>-<16 hex>.seg)")
    first, last = Lsn.from_key(match["first"]), Lsn.from_key(match["last"])
    digest = match["digest"] or ""
    if match["tx"]:
        _check_range(first, last)
        return SegmentKey(SegmentKind.TRANSACTIONS, "", first, last, digest)
    table = _unquoted(match["table"])
    if segment_key(table, first, last, digest) != key[match.start("table") - len(SEGMENTS):]:
        raise ValueError(f"{key!r} is not the canonical segment name of its table")
    return SegmentKey(SegmentKind.CHANGES, table, first, last, digest)


def without_digest(key: str) -> str:
    """A segment's name without its `-<digest>` (the name its header records)."""
    parsed = parse_segment_key(key)
    if not parsed.digest:
        return key
    return key[: -len(".seg")].rsplit("-", 1)[0] + ".seg"


def table_of(key: str) -> str:
    """The table a `segments/` or `snapshots/` object belongs to."""
    return _unquoted(key.split("/")[1])


# --- snapshots: the capture's parts, compaction's parts and manifests ------------------------


class PartKey(NamedTuple):
    """What a capture snapshot part's name says."""

    table: str
    lsn: Lsn
    first_seq: int
    last_seq: int
    digest: str


class SnapshotName(NamedTuple):
    """What a compaction snapshot part's or manifest's name says."""

    table: str
    lsn: Lsn
    number: int  # a part's number, or a manifest's count of parts


def snapshots_prefix(table: str | None = None) -> str:
    """`snapshots/`, or `snapshots/<table>/`."""
    return SNAPSHOTS if table is None else f"{SNAPSHOTS}{_table(table, 'a snapshot')}/"


def snapshot_prefix(table: str, lsn: Lsn) -> str:
    """`snapshots/<table>/<lsn>/`: every object of the table's snapshot at *lsn*."""
    return f"{snapshots_prefix(table)}{lsn.hex_key()}/"


def part_key(table: str, lsn: Lsn, first_seq: int, last_seq: int, digest: str) -> str:
    """`snapshots/<table>/<lsn>/rows-<first seq>-<last seq>-<digest>.part`."""
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"invalid snapshot part digest {digest!r}: lower-case hex expected")
    return (f"{snapshot_prefix(table, lsn)}rows-{first_seq:010d}-"
            f"{last_seq:010d}-{digest}.part")


def is_part_key(key: str) -> bool:
    return key.endswith(".part") and key.startswith(SNAPSHOTS)


def parse_part_key(key: str) -> PartKey:
    """The inverse of `part_key`; `ValueError` for any other name."""
    match = _PART.fullmatch(key)
    if match is None:
        raise ValueError(f"{key!r} is not a snapshot part name "
                         "(snapshots/<table>/<16 hex>/rows-<seq>-<seq>-<digest>.part)")
    name = PartKey(_unquoted(match["table"]), Lsn.from_key(match["lsn"]), int(match["first"]),
                   int(match["last"]), match["digest"])
    if name.table in ("", ".", "..") or part_key(*name) != key:
        raise ValueError(f"{key!r} is not the canonical snapshot part name of its table")
    return name


def snapshot_key(table: str, lsn: Lsn, part: int) -> str:
    """`snapshots/<table>/<16 hex>/part-<n>.snap`: the part number in decimal without leading
    zeros, from 0."""
    if not 0 <= part < 10**9:
        raise ValueError(f"invalid snapshot part number {part}")
    return f"{snapshot_prefix(table, lsn)}part-{part}.snap"


def manifest_key(table: str, lsn: Lsn, parts: int) -> str:
    """`snapshots/<table>/<16 hex>/manifest-<parts>.json`: the part count is in the name, so
    a missing part is seen from a listing alone."""
    if not 0 < parts < 10**9:
        raise ValueError(f"invalid snapshot part count {parts}")
    return f"{snapshot_prefix(table, lsn)}manifest-{parts}.json"


def _parse_snapshot(key: str, pattern: re.Pattern[str], what: str,
                    canonical: Callable[[str, Lsn, int], str]) -> SnapshotName:
    match = pattern.fullmatch(key)
    if match is None:
        raise ValueError(f"{key!r} is not a {what}")
    table = _unquoted(match["table"])
    name = SnapshotName(table, Lsn.from_key(match["lsn"]), int(match["n"]))
    if table in ("", ".", "..") or canonical(table, name.lsn, name.number) != key:
        raise ValueError(f"{key!r} is not the canonical {what} of its table")
    return name


def parse_snapshot_key(key: str) -> SnapshotName:
    """The inverse of `snapshot_key`; `ValueError` for any other name."""
    return _parse_snapshot(key, _SNAPSHOT, "snapshot part name "
                           "(snapshots/<table>/<16 hex>/part-<n>.snap)", snapshot_key)


def parse_manifest_key(key: str) -> SnapshotName:
    """The inverse of `manifest_key`; `ValueError` for any other name."""
    return _parse_snapshot(key, _MANIFEST, "snapshot manifest name "
                           "(snapshots/<table>/<16 hex>/manifest-<parts>.json)", manifest_key)


def is_snapshot_key(key: str) -> bool:
    return key.startswith(SNAPSHOTS) and key.endswith(".snap")


def is_manifest_key(key: str) -> bool:
    return key.startswith(SNAPSHOTS) and "/manifest-" in key and key.endswith(".json")


# --- schemas and gaps ------------------------------------------------------------------------


def schemas_prefix(table: str) -> str:
    return f"{SCHEMAS}{_table(table, 'a schema')}/"


def schema_key(table: str, lsn: Lsn) -> str:
    """`schemas/<table>/<lsn>.json`: the table's schema from *lsn* on (JSON, encrypted)."""
    return f"{schemas_prefix(table)}{lsn.hex_key()}.json"


def parse_schema_key(key: str) -> Lsn:
    """The LSN a schema's name records; `ValueError` naming *key* when it is not one."""
    table, _, name = key.removeprefix(SCHEMAS).rpartition("/")
    if not key.startswith(SCHEMAS) or not name.endswith(".json") or "/" in table:
        raise ValueError(f"{key!r} is not a schema name (schemas/<table>/<16 hex digits>.json)")
    return Lsn.from_key(name.removesuffix(".json"))


def gap_key(start: Lsn, end: Lsn) -> str:
    """`gaps/<from>-<to>.json`: changes between these LSNs may be missing (a lost slot replaced
    after the operator confirmed); the name is what a replay plans with, the content (JSON,
    encrypted) says why and when."""
    return f"{GAPS}{start.hex_key()}-{end.hex_key()}.json"


def parse_gap_key(key: str) -> tuple[Lsn, Lsn]:
    """Inverse of `gap_key`; `ValueError` naming *key* when it is not one."""
    match = _GAP.fullmatch(key)
    if match is None:
        raise ValueError(f"object {key} is not a gap record name "
                         "(gaps/<16 hex digits>-<16 hex digits>.json)")
    return Lsn.from_key(match["start"]), Lsn.from_key(match["end"])


def claim_key(commit_lsn: Lsn, seq: int, digest: str) -> str:
    """`claims/<commit lsn>-<seq>-<digest>.avro`: the message value of one change too large
    for a Kafka message (the claim check; the topic holds a reference to this name)."""
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"invalid claim digest {digest!r}: lower-case hex expected")
    return f"{CLAIMS}{Lsn(commit_lsn).hex_key()}-{seq:010d}-{digest}.avro"


_AUDIT: Final = re.compile(rf"audit/(?P<at>{_HEX16})-(?P<id>[0-9a-f]{{1,32}})\.json")


def audit_key(at_us: int, ident: str) -> str:
    """`audit/<time>-<id>.json`: an operator's override of a guard (JSON, encrypted); the time
    is the UTC microseconds since the epoch as 16 upper-case hex digits, so names sort by
    time; *ident* is lower-case hex."""
    if not re.fullmatch(r"[0-9a-f]{1,32}", ident) or not 0 <= at_us < 1 << 64:
        raise ValueError(f"invalid audit record name parts {at_us!r}, {ident!r}")
    return f"{AUDIT}{at_us:016X}-{ident}.json"


def rollback_key(at_us: int, ident: str) -> str:
    """`rollbacks/<time>-<id>.json`: a rollback's emergency snapshot of the wedding's live
    rows (JSON, encrypted), named like `audit_key`."""
    return ROLLBACKS + audit_key(at_us, ident).removeprefix(AUDIT)


def parse_audit_key(key: str) -> tuple[int, str]:
    """Inverse of `audit_key`; `ValueError` naming *key* when it is not one."""
    match = _AUDIT.fullmatch(key)
    if match is None:
        raise ValueError(f"object {key} is not an audit record name "
                         "(audit/<16 hex digits>-<hex id>.json)")
    return int(match["at"], 16), match["id"]


# --- conflicts -------------------------------------------------------------------------------

_CONFLICT: Final = re.compile(
    rf"conflicts/(?P<table>[^/]+)/(?P<at>{_HEX16})-(?P<digest>[0-9a-f]{{16,64}})\.json")


def conflicts_prefix(table: str | None = None) -> str:
    """`conflicts/`, or `conflicts/<table>/`: a LIST of it gives the conflicts by time."""
    return CONFLICTS if table is None else f"{CONFLICTS}{_table(table, 'a conflict')}/"


def conflict_key(table: str, at_us: int, digest: str) -> str:
    """`conflicts/<table>/<time>-<digest>.json`: one cross-origin conflict (JSON, encrypted).
    The time is the later of the two versions' commit times (UTC microseconds as 16 hex
    digits, so names sort by time); *digest* (lower-case hex, 16 to 64 digits) names the
    decision, so the same conflict seen twice is one object."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", digest) or not 0 <= at_us < 1 << 64:
        raise ValueError(f"invalid conflict record name parts {at_us!r}, {digest!r}")
    return f"{conflicts_prefix(table)}{at_us:016X}-{digest}.json"


def parse_conflict_key(key: str) -> tuple[str, int]:
    """Inverse of `conflict_key`: the table and the time; `ValueError` naming *key*."""
    match = _CONFLICT.fullmatch(key)
    if match is None or conflict_key(table := _unquoted(match["table"]), int(match["at"], 16),
                                     match["digest"]) != key:
        raise ValueError(f"object {key} is not a conflict record name "
                         "(conflicts/<table>/<16 hex digits>-<hex digest>.json)")
    return table, int(match["at"], 16)


# --- checkpoints -----------------------------------------------------------------------------


def checkpoints_prefix(destination: str | None = None, tier: Tier | None = None) -> str:
    """`checkpoints/`, `checkpoints/<destination>/` or `checkpoints/<destination>/<tier>/`."""
    if destination is None:
        return CHECKPOINTS
    middle = f"{tier.value}/" if tier is not None else ""
    return f"{CHECKPOINTS}{quote(destination, safe='')}/{middle}"


def checkpoint_key(destination: str, lsn: Lsn, tier: Tier | None = None) -> str:
    """`checkpoints/<destination>/[<tier>/]<lsn>`: every transaction at or below *lsn* (of
    *tier*) is durable in the destination. Empty and create-only; the newest sorts last."""
    return f"{checkpoints_prefix(destination, tier)}{lsn.hex_key()}"


def is_checkpoint_key(key: str, destination: str, tier: Tier | None = None) -> bool:
    """Whether *key* is a checkpoint of exactly this destination and tier (a tier's
    checkpoints sit one level below the overall ones, under the same prefix)."""
    prefix = checkpoints_prefix(destination, tier)
    rest = key[len(prefix):]
    return key.startswith(prefix) and "/" not in rest and rest not in _TIERS


def parse_checkpoint_key(key: str) -> Lsn:
    """The LSN a checkpoint's name records; `ValueError` naming *key* when it is not one."""
    if not key.startswith(CHECKPOINTS):
        raise ValueError(f"{key!r} is not a checkpoint name (checkpoints/<destination>/<lsn>)")
    try:
        return Lsn.from_key(key.rsplit("/", 1)[-1])
    except ValueError:
        raise ValueError(f"{key!r} is not a checkpoint name "
                         "(checkpoints/<destination>/[<tier>/]<16 hex digits>)") from None


def destination_of(key: str) -> str:
    """The destination a checkpoint object belongs to."""
    return _unquoted(key[len(CHECKPOINTS):].split("/", 1)[0])


# --- dead letters ----------------------------------------------------------------------------


def dead_letter_key(topic: str, partition: int, offset: int) -> str:
    """`deadletters/<topic>/<partition>-<offset>.json`: a record a sink could not decode
    (encrypted JSON: the raw bytes and the error). Partition and offset in ten and twenty
    decimal digits, so names sort by position in the topic."""
    if not topic or topic in (".", "..") or partition < 0 or offset < 0:
        raise ValueError(f"invalid dead letter position {topic!r}/{partition}@{offset}")
    return f"{DEAD_LETTERS}{quote(topic, safe='')}/{partition:010d}-{offset:020d}.json"


def parse_dead_letter_key(key: str) -> tuple[str, int, int]:
    """Inverse of `dead_letter_key`: (topic, partition, offset); `ValueError` naming *key*."""
    match = _DEAD_LETTER.fullmatch(key)
    if match is None:
        raise ValueError(f"object {key} is not a dead letter name "
                         "(deadletters/<topic>/<10 digits>-<20 digits>.json)")
    found = (_unquoted(match["topic"]), int(match["partition"]), int(match["offset"]))
    if dead_letter_key(*found) != key:
        raise ValueError(f"{key!r} is not the canonical dead letter name")
    return found


def progress_prefix(destination: str) -> str:
    """`progress/<destination>/`."""
    return f"{PROGRESS}{quote(destination, safe='')}/"


def progress_key(destination: str, member: str, number: int) -> str:
    """`progress/<destination>/<member>/<number, 20 digits>.json`."""
    return f"{progress_prefix(destination)}{member}/{number:020d}.json"


def retention_prefix(destination: str) -> str:
    """`retention/<destination>/marks/`."""
    return f"{RETENTION}{quote(destination, safe='')}/marks/"


def retention_key(destination: str, at_us: int) -> str:
    """`retention/<destination>/marks/<time>.json`: a retention run's mark of the objects it
    found unneeded (sealed JSON; `replay.retention`), the time in UTC microseconds, 16 hex."""
    return f"{retention_prefix(destination)}{at_us:016X}.json"


def retention_floor_key(lsn: Lsn) -> str:
    """`retention/floor/<lsn>`: retention deleted what points below *lsn* needed, so no
    restore below it is possible (written before it deletes; the highest counts)."""
    return f"{RETENTION_FLOORS}{lsn.hex_key()}"


def parse_retention_floor(key: str) -> Lsn | None:
    """The LSN of a `retention_floor_key`, or None for any other name."""
    match = re.fullmatch(rf"retention/floor/({_HEX16})", key)
    return Lsn(int(match[1], 16)) if match else None


def eve_key(wedding: str, day: str) -> str:
    """`eves/<wedding>/<date>.json`: the eve snapshot of that wedding was taken (JSON,
    encrypted: rows, when; `replicator.eve`)."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day) or not wedding:
        raise ValueError(f"invalid eve record name parts {wedding!r}, {day!r}")
    return f"{EVES}{quote(wedding, safe='')}/{day}.json"


def incident_key(ident: str, part: str | None = None) -> str:
    """`incidents/<id>.json` (the record), `incidents/<id>-<part>.json` (e.g. its impact
    report); JSON, encrypted (`ops.incidents`)."""
    if not re.fullmatch(r"[0-9a-f]{1,32}", ident) or (
            part is not None and not re.fullmatch(r"[a-z]{1,16}", part)):
        raise ValueError(f"invalid incident record name parts {ident!r}, {part!r}")
    return f"{INCIDENTS}{ident}" + (f"-{part}" if part else "") + ".json"
