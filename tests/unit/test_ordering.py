"""`archive.ordering.ordered`: position order, a repeated identity kept once, and items that
share a position in the order of their identity, whatever order they came in."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from replicator.archive.ordering import ordered


def position(item: tuple[int, int, str]) -> tuple[int, int]:
    return item[0], item[1]


def identity(item: tuple[int, int, str]) -> object:
    return item


def reference(items: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for item in sorted(set(items), key=lambda i: (position(i), repr(identity(i)))):
        out.append(item)
    return out


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2), st.sampled_from("abc")),
                max_size=25))
def test_any_order_and_duplicates_give_one_result(items: list[tuple[int, int, str]]) -> None:
    expected = reference(items)
    assert ordered(items, position, identity) == expected
    assert ordered(list(reversed(items)), position, identity) == expected
    assert ordered(items + items, position, identity) == expected


def test_identity_defaults_to_the_position() -> None:
    items = [(2, 0, "late"), (1, 0, "first"), (1, 0, "again"), (0, 1, "x")]
    assert ordered(items, position) == [(0, 1, "x"), (1, 0, "first"), (2, 0, "late")]
    for perm in itertools.permutations(items[:2] + items[3:]):
        assert ordered(list(perm), position) == [(0, 1, "x"), (1, 0, "first"), (2, 0, "late")]
