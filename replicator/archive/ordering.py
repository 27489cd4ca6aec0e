"""Records of a segment in position order, each once (`ordered`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import TypeVar

__all__ = ["ordered"]

_T = TypeVar("_T")


def ordered(items: Iterable[_T], position: Callable[[_T], tuple[int, int]],
             identity: Callable[[_T], object] | None = None) -> list[_T]:
    """Sorted by position (then identity), a repeated identity kept once (its first
    occurrence). The identity is the position, except for transaction records: a snapshot's
    records (xid 0) share their LSN, one per table."""
    ident = identity or position
    keyed = sorted([(position(item), n, item) for n, item in enumerate(items)],
                   key=itemgetter(0, 1))
    out: list[_T] = []
    i, count = 0, len(keyed)
    while i < count:
        here = keyed[i][0]
        j = i + 1
        while j < count and keyed[j][0] == here:
            j += 1
        if j == i + 1:  # the usual case: a position of its own
            out.append(keyed[i][2])
        else:  # items sharing a position: in the order of their identity, each once
            seen: set[object] = set()
            for _, _, item in sorted(keyed[i:j], key=lambda k: repr(ident(k[2]))):
                key = ident(item)
                if key not in seen:
                    seen.add(key)
                    out.append(item)
        i = j
    return out
