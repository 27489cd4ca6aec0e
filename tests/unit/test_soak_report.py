"""The soak's verdict: a table verify could not restore (a store it could not read) is listed
as unverified and fails the run, never counted as lost rows; a table that differs is."""

from __future__ import annotations

from benchmarks.soak import rows_differing, unverified

UNREADABLE = {"ok": False, "problems": [
    "restore failed: cannot read object segments/public.guests/0-1.seg: Azure unreachable"]}


def test_an_unreadable_table_is_unverified_not_lost() -> None:
    report = {"ok": False, "tables": {"public.guests": UNREADABLE,
                                      "public.vendors": {"ok": True, "rows": 5,
                                                         "live_rows": 5}}}
    assert rows_differing(report) == 0
    assert unverified(report) == ["public.guests"]


def test_rows_that_differ_are_lost_and_a_verify_that_did_not_run_is_unverified() -> None:
    report = {"ok": False, "tables": {"public.guests": {"ok": False, "rows": 7,
                                                        "live_rows": 9, "problems": []}}}
    assert rows_differing(report) == 2 and unverified(report) == []
    assert unverified({"ok": False, "error": "cannot connect"}) == ["(verify did not run)"]
    assert unverified({"ok": True, "tables": {}}) == []
