"""The one text form of a table's name: `schema.table`, or both parts quoted as SQL
identifiers when either holds a dot or a double quote."""

from __future__ import annotations

import pytest

from replicator.config import PriorityConfig, SourceConfig, WeddingLink
from replicator.events import join_qualified, split_qualified
from replicator.source.snapshot import SnapshotRequestError, qualified_name

PAIRS = [
    (("public", "guests"), "public.guests"),
    (("public", "v1.2"), '"public"."v1.2"'),
    (("my.schema", "v1.2"), '"my.schema"."v1.2"'),
    (("my", "schema.v1.2"), '"my"."schema.v1.2"'),
    (("public", 'we"ird'), '"public"."we""ird"'),
    (("public", "Guest List"), "public.Guest List"),
    (('qu"ote', "Mariée Ünïcode"), '"qu""ote"."Mariée Ünïcode"'),
    (('"', "."), '""""' + "." + '"."'),
]


@pytest.mark.parametrize(("pair", "text"), PAIRS)
def test_every_pair_has_one_text_that_splits_back(pair: tuple[str, str], text: str) -> None:
    assert join_qualified(*pair) == text
    assert split_qualified(text) == pair


def test_lenient_forms_and_the_default_schema() -> None:
    assert split_qualified('public."guests"') == ("public", "guests")
    assert split_qualified('"public".guests') == ("public", "guests")
    assert split_qualified("guests", "public") == ("public", "guests")
    assert split_qualified('"v1.2"', "public") == ("public", "v1.2")


@pytest.mark.parametrize("text", ["a.b.c", "", ".x", "x.", '"a', '"a"b.c', "guests",
                                  'a."b"c'])
def test_texts_naming_no_pair_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a table name like 'public\.guests'"):
        split_qualified(text)


def test_configuration_and_requests_take_the_text_form() -> None:
    source = SourceConfig(dsn="", tables=("guests", '"my.schema".x', '"my.schema"."v1.2"',
                                          "public.Guest List"))
    assert source.tables == ("public.guests", '"my.schema"."x"', '"my.schema"."v1.2"',
                             "public.Guest List")
    priority = PriorityConfig(weddings_table='"odd.schema".weddings',
                              tables={'public."v1.2"': WeddingLink(column="w")})
    assert priority.weddings_table == '"odd.schema"."weddings"'
    assert list(priority.tables) == ['"public"."v1.2"']
    assert qualified_name(' public."v1.2" ') == '"public"."v1.2"'
    with pytest.raises(SnapshotRequestError, match=r"'a\.b\.c' is not a table name"):
        qualified_name("a.b.c")
