"""Positions in the change stream.

Every stage of the pipeline acknowledges, resumes and names objects by position, so a position
is a plain value: comparable, hashable, printable, and never a mutable cursor.

- `Lsn` is a WAL location. It prints the way Postgres prints it (`16/B374D848`), so log lines
  can be pasted into `pg_replication_slots` queries, and it has a fixed-width `hex_key()` form
  for object names, because object stores list names in byte order and the Postgres form does
  not sort (`9/0` > `10/0` as text).
- `ChangePosition` is `(commit_lsn, seq)`: several changes of one transaction share its commit
  LSN, so `seq`, the change's ordinal inside its transaction, keeps them apart and ordered.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["INVALID_LSN", "ChangePosition", "Lsn", "mark_seq"]

_MAX_LSN = (1 << 64) - 1
# Postgres's pg_lsn input accepts 1-8 hex digits on each side of the slash, in either case.
_LSN_TEXT = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
# Keys are written upper-case only: one position must have exactly one object name.
_LSN_KEY = re.compile(r"[0-9A-F]{16}")


class Lsn(int):
    """A WAL location (Postgres `pg_lsn`): an unsigned 64-bit integer.

    It subclasses `int` so that comparing, hashing and subtracting (bytes of lag) cost nothing
    extra; arithmetic results are plain `int`s, which is deliberate, since an offset between two
    locations is not itself a location.
    """

    __slots__ = ()

    def __new__(cls, value: int = 0) -> Lsn:
        # Reject str here: int("16/B374D848") would fail with a confusing message, and
        # int("123") would silently succeed with the wrong meaning.
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(
                f"Lsn() takes an int, not {type(value).__name__}; use Lsn.parse() for text"
            )
        if not 0 <= value <= _MAX_LSN:
            raise ValueError(f"LSN {value} is outside the unsigned 64-bit range")
        return super().__new__(cls, value)

    @classmethod
    def of(cls, value: int) -> Lsn:
        """*value* itself when it already is an Lsn (no checks again, for hot paths), else
        `Lsn(value)`."""
        return value if type(value) is cls else cls(value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse the Postgres form, e.g. `16/B374D848` (as `pg_current_wal_lsn()` prints)."""
        match = _LSN_TEXT.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"invalid LSN {text!r}: expected the Postgres form like '16/B374D848'")
        return cls((int(match[1], 16) << 32) | int(match[2], 16))

    @classmethod
    def from_key(cls, key: str) -> Lsn:
        """Inverse of `hex_key()`, for positions read back from object names."""
        if not isinstance(key, str) or _LSN_KEY.fullmatch(key) is None:
            raise ValueError(f"invalid LSN key {key!r}: expected 16 upper-case hex digits")
        return cls(int(key, 16))

    def hex_key(self) -> str:
        """16 zero-padded upper-case hex digits: sorts as text exactly like the LSN sorts."""
        return f"{int(self):016X}"

    def __str__(self) -> str:
        value = int(self)
        return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"

    def __format__(self, spec: str) -> str:
        # f"{lsn}" must print the Postgres form; explicit specs ("x", "d") keep int meaning.
        return str(self) if not spec else int(self).__format__(spec)


INVALID_LSN = Lsn(0)
"""`0/0`, Postgres's InvalidXLogRecPtr: what Relation messages and unset positions carry."""


class ChangePosition(NamedTuple):
    """The position of one change: its transaction's commit LSN and its ordinal inside it.

    Tuple ordering gives the source database's own order of changes, which is what the
    idempotent apply and the merge rules compare.
    """

    commit_lsn: Lsn
    seq: int

    def __str__(self) -> str:
        return f"{self.commit_lsn}#{self.seq}"


def mark_seq(bits: bytearray, seq: int) -> bool:
    """Set bit *seq* (>= 0) of *bits*, the change ordinals of one transaction seen so far
    (one bit each), growing it as needed; False when it was set already."""
    index, mask = seq >> 3, 1 << (seq & 7)
    if len(bits) <= index:
        bits.extend(bytes(index + 1 - len(bits)))
    if bits[index] & mask:
        return False
    bits[index] |= mask
    return True
