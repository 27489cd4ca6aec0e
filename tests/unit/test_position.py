import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.position import INVALID_LSN, ChangePosition, Lsn

lsns = st.integers(min_value=0, max_value=2**64 - 1).map(Lsn)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/1A", 0x1A),
        ("16/B374D848", 0x16_B374D848),
        ("1/0", 1 << 32),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
    ],
)
def test_parse_and_print_the_postgres_form(text: str, value: int) -> None:
    lsn = Lsn.parse(text)
    assert lsn == value
    assert str(lsn) == text
    assert f"{lsn}" == text
    assert repr(lsn) == f"Lsn('{text}')"


def test_parse_accepts_lower_case_and_padding_like_postgres_but_prints_canonically() -> None:
    assert str(Lsn.parse("16/b374d848")) == "16/B374D848"
    assert str(Lsn.parse("00000016/0000000A")) == "16/A"


@pytest.mark.parametrize(
    "text", ["", "16", "16/", "/1", "G/0", "123456789/0", "0/123456789", " 1/0", "1/0 ", "1//0"]
)
def test_parse_rejects_bad_text_and_names_it(text: str) -> None:
    with pytest.raises(ValueError, match="invalid LSN") as info:
        Lsn.parse(text)
    assert repr(text) in str(info.value)


def test_construction_checks_range_and_type() -> None:
    assert Lsn(5) == 5
    assert Lsn() == INVALID_LSN == 0
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        Lsn(-1)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        Lsn(2**64)
    with pytest.raises(TypeError, match=r"Lsn\.parse"):
        Lsn("1/0")  # type: ignore[arg-type]


def test_hex_key_is_fixed_width_and_reversible() -> None:
    lsn = Lsn.parse("16/B374D848")
    assert lsn.hex_key() == "00000016B374D848"
    assert Lsn.from_key("00000016B374D848") == lsn
    assert Lsn(0).hex_key() == "0" * 16


@pytest.mark.parametrize(
    "key", ["", "16B374D848", "00000016b374d848", "00000016B374D848 ", "X" * 16]
)
def test_from_key_rejects_anything_but_16_upper_case_hex_digits(key: str) -> None:
    with pytest.raises(ValueError, match="invalid LSN key"):
        Lsn.from_key(key)


def test_lsn_is_a_frozen_hashable_value() -> None:
    lsn = Lsn.parse("1/2")
    with pytest.raises(AttributeError):
        lsn.extra = 1  # type: ignore[attr-defined]
    assert {lsn, Lsn(lsn)} == {lsn}
    assert pickle.loads(pickle.dumps(lsn)) == lsn
    assert type(pickle.loads(pickle.dumps(lsn))) is Lsn


def test_difference_is_a_byte_count_not_a_position() -> None:
    lag = Lsn.parse("1/10") - Lsn.parse("1/0")
    assert lag == 16
    assert type(lag) is int


@given(lsns)
def test_text_and_key_round_trip(lsn: Lsn) -> None:
    assert Lsn.parse(str(lsn)) == lsn
    assert Lsn.from_key(lsn.hex_key()) == lsn
    assert len(lsn.hex_key()) == 16


@given(lsns, lsns)
def test_keys_sort_like_positions(a: Lsn, b: Lsn) -> None:
    assert (a < b) == (a.hex_key() < b.hex_key())
    assert (a == b) == (a.hex_key() == b.hex_key())


@given(st.lists(st.tuples(lsns, st.integers(min_value=0, max_value=10_000))))
def test_change_positions_order_by_commit_lsn_then_seq(pairs: list[tuple[Lsn, int]]) -> None:
    positions = sorted(ChangePosition(lsn, seq) for lsn, seq in pairs)
    keys = [(p.commit_lsn.hex_key(), p.seq) for p in positions]
    assert keys == sorted(keys)


def test_change_position_shares_lsn_and_orders_by_seq() -> None:
    lsn = Lsn.parse("16/B374D848")
    first, second = ChangePosition(lsn, 0), ChangePosition(lsn, 1)
    assert first < second < ChangePosition(Lsn(lsn + 1), 0)
    assert str(second) == "16/B374D848#1"
    assert hash(first) == hash(ChangePosition(Lsn.parse("16/B374D848"), 0))
