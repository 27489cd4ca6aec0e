"""The archived transaction records, reduced to what a restore asks of them, in compact form.

An hour at 2,000 commits/s is 7 million transaction records. Held as records (a dataclass
with two dicts each) and as dicts keyed by LSN, they took 4 to 7 GB, and `verify` of such an
archive was killed for memory. `Timeline` keeps each fact in sorted parallel arrays instead
(`LsnColumn`): 8 bytes per commit for its LSN and 8 for its time, per table 8 + 8 for each
commit that touched it, and 17 bytes for its content digest. `TimelineBuilder` takes records
one segment at a time (`Archive.read_timeline`), so the records are never all held at once.

Records repeat when segments overlap after a redelivery: a repeated LSN keeps the largest
count (a redelivered record repeats the same counts; a snapshot has one boundary record per
table) and the first time and digest seen.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from replicator.events import TransactionRecord
from replicator.position import Lsn

__all__ = ["DigestColumn", "LsnColumn", "Point", "Timeline", "TimelineBuilder"]

_DIGEST_HEX = 32  # `transport.avro.digest_text`: an optional prefix, then 32 hex digits


def _find(keys: array[int], lsn: int) -> int:
    """The index of *lsn* in the sorted *keys*, or -1."""
    i = bisect.bisect_left(keys, lsn)
    return i if i < len(keys) and keys[i] == lsn else -1


def _span(keys: array[int], low: int, high: int) -> range:
    """The indexes of the sorted *keys* with low <= key <= high."""
    return range(bisect.bisect_left(keys, low), bisect.bisect_right(keys, high))


class Point(NamedTuple):
    """One archived commit (or snapshot boundary): what `plan.resolve_time` reads."""

    commit_lsn: int
    commit_ts_us: int


class LsnColumn(Mapping[int, int]):
    """A read-only mapping commit LSN -> integer, as two sorted parallel arrays."""

    __slots__ = ("_keys", "_values")

    def __init__(self, keys: array[int] | None = None, values: array[int] | None = None
                 ) -> None:
        self._keys: array[int] = keys if keys is not None else array("Q")
        self._values: array[int] = values if values is not None else array("q")

    def __getitem__(self, lsn: int) -> int:
        i = _find(self._keys, lsn)
        if i < 0:
            raise KeyError(lsn)
        return self._values[i]

    def __contains__(self, lsn: object) -> bool:
        return isinstance(lsn, int) and _find(self._keys, lsn) >= 0

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def between(self, low: int, high: int) -> Iterator[tuple[int, int]]:
        """The (LSN, value) pairs with low <= LSN <= high, in LSN order."""
        span = _span(self._keys, low, high)
        return zip(self._keys[span.start:span.stop], self._values[span.start:span.stop],
                   strict=True)


class DigestColumn(Mapping[int, str]):
    """A read-only mapping commit LSN -> digest text (`transport.avro.digest_text`), each
    kept as a prefix number and 16 bytes; a text of another form is kept as it is."""

    __slots__ = ("_keys", "_names", "_other", "_prefixes", "_sums")

    def __init__(self) -> None:
        self._keys: array[int] = array("Q")
        self._prefixes = bytearray()
        self._sums = bytearray()
        self._names: list[str] = []  # prefix number -> prefix text
        self._other: dict[int, str] = {}  # row index -> a text of another form

    def _append(self, lsn: int, text: str) -> None:
        index = len(self._keys)
        self._keys.append(lsn)
        prefix, digits = text[:-_DIGEST_HEX], text[-_DIGEST_HEX:]
        try:
            value = bytes.fromhex(digits) if len(digits) == _DIGEST_HEX else None
        except ValueError:
            value = None
        if value is None or value.hex() != digits:
            self._other[index] = text
            value = bytes(16)
        if prefix not in self._names:
            self._names.append(prefix)
        self._prefixes.append(self._names.index(prefix))
        self._sums += value

    def _text(self, i: int) -> str:
        other = self._other.get(i)
        if other is not None:
            return other
        return self._names[self._prefixes[i]] + self._sums[16 * i:16 * i + 16].hex()

    def __getitem__(self, lsn: int) -> str:
        i = _find(self._keys, lsn)
        if i < 0:
            raise KeyError(lsn)
        return self._text(i)

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def between(self, low: int, high: int) -> Iterator[tuple[int, str]]:
        """The (LSN, digest text) pairs with low <= LSN <= high, in LSN order."""
        return ((self._keys[k], self._text(k)) for k in _span(self._keys, low, high))


class _Points:
    """Every (commit LSN, commit time), re-iterable: `plan.resolve_time`'s input."""

    __slots__ = ("_times",)

    def __init__(self, times: LsnColumn) -> None:
        self._times = times

    def __iter__(self) -> Iterator[Point]:
        return map(Point, self._times._keys, self._times._values)


@dataclass(slots=True)
class Timeline:
    """The archived transaction records, reduced to what replay asks of them."""

    commits: array[int] = field(default_factory=lambda: array("Q"))  # sorted commit LSNs
    times: LsnColumn = field(default_factory=LsnColumn)  # commit LSN -> commit time (us)
    # table -> LSNs of its snapshot boundary records, sorted
    snapshots: dict[str, list[int]] = field(default_factory=dict)
    # table -> commit LSN -> changes announced
    counts: dict[str, LsnColumn] = field(default_factory=dict)
    # table -> commit LSN -> content digest of its changes, where the capture recorded one
    digests: dict[str, DigestColumn] = field(default_factory=dict)
    oldest: int = 0  # set by the caller: the oldest point any plan accepts

    @classmethod
    def of(cls, records: Iterable[TransactionRecord]) -> Timeline:
        builder = TimelineBuilder()
        builder.add(records)
        return builder.build()

    @property
    def points(self) -> Iterable[Point]:
        """Every archived commit and snapshot boundary with its time, in LSN order."""
        return _Points(self.times)

    def before(self, lsn: int) -> Lsn | None:
        """The newest commit strictly below *lsn* that is restorable (`None` if none)."""
        i = bisect.bisect_left(self.commits, lsn)
        if i == 0:
            return None
        point = Lsn(self.commits[i - 1])
        return point if point >= self.oldest else None

    def base(self, table: str, *, at_or_after: int, target: int) -> Lsn | None:
        """The table's snapshot to start from: the oldest boundary in range."""
        for lsn in self.snapshots.get(table, ()):
            if at_or_after <= lsn <= target:
                return Lsn(lsn)
        return None


class _Rows:
    """Appended (LSN, value) rows of one column while the timeline is built."""

    __slots__ = ("keys", "ordered", "values")

    def __init__(self, typecode: str = "q") -> None:
        self.keys: array[int] = array("Q")
        self.values: array[int] = array(typecode)
        self.ordered = True

    def add(self, lsn: int, value: int) -> None:
        if self.keys and lsn <= self.keys[-1]:
            self.ordered = False
        self.keys.append(lsn)
        self.values.append(value)

    def column(self, *, largest: bool) -> LsnColumn:
        """Sorted, one row per LSN: the largest value (*largest*) or the first one seen."""
        keys, values = self.keys, self.values
        if self.ordered:
            return LsnColumn(keys, values)
        order = sorted(range(len(keys)), key=keys.__getitem__)  # stable: first seen first
        out_keys: array[int] = array("Q")
        out_values: array[int] = array(values.typecode)
        for i in order:
            lsn, value = keys[i], values[i]
            if out_keys and out_keys[-1] == lsn:
                if largest and value > out_values[-1]:
                    out_values[-1] = value
                continue
            out_keys.append(lsn)
            out_values.append(value)
        return LsnColumn(out_keys, out_values)


class TimelineBuilder:
    """Builds a `Timeline` from records given a batch (a segment) at a time."""

    def __init__(self) -> None:
        self._times = _Rows()
        self._commits: array[int] = array("Q")
        self._snapshots: dict[str, set[int]] = {}
        self._counts: dict[str, _Rows] = {}
        self._digests: dict[str, list[tuple[int, str]] | DigestColumn] = {}

    def add(self, records: Iterable[TransactionRecord]) -> None:
        for record in records:
            lsn = int(record.commit_lsn)
            self._times.add(lsn, record.commit_ts_us)
            if record.xid == 0:
                for table in record.counts:
                    self._snapshots.setdefault(table, set()).add(lsn)
            else:
                self._commits.append(lsn)
            for table, n in record.counts.items():
                rows = self._counts.get(table)
                if rows is None:
                    rows = self._counts[table] = _Rows()
                rows.add(lsn, n)
            for table, digest in record.digests.items():
                self._add_digest(table, lsn, digest)

    def _add_digest(self, table: str, lsn: int, digest: str) -> None:
        column = self._digests.get(table)
        if column is None:
            column = self._digests[table] = DigestColumn()
        if isinstance(column, DigestColumn):
            keys = column._keys
            if not keys or lsn > keys[-1]:
                column._append(lsn, digest)
                return
            # Out of order (overlapping segments): keep pairs, sorted at the end.
            column = self._digests[table] = [(k, column[k]) for k in keys]
        column.append((lsn, digest))

    def build(self) -> Timeline:
        timeline = Timeline()
        timeline.times = self._times.column(largest=False)
        snapshots = {table: sorted(lsns) for table, lsns in self._snapshots.items()}
        timeline.snapshots = snapshots
        commits = self._commits
        for lsns in snapshots.values():
            commits.extend(lsns)
        timeline.commits = array("Q", sorted(set(commits)))
        timeline.counts = {table: rows.column(largest=True)
                           for table, rows in self._counts.items()}
        for table, column in self._digests.items():
            if isinstance(column, list):
                ordered = DigestColumn()
                last: int | None = None
                for lsn, digest in sorted(column, key=lambda pair: pair[0]):
                    if lsn != last:
                        ordered._append(lsn, digest)
                        last = lsn
                column = ordered
            timeline.digests[table] = column
        return timeline
