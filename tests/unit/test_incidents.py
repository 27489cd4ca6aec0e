"""The incident rule (ops/incidents.py) on fed observations, and a webhook URL's display."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator.config import ConfigError, NotifyConfig, load_config
from replicator.ops.incidents import IncidentDetector


def detector() -> IncidentDetector:
    return IncidentDetector(window_s=60, min_rows=10, cooldown_s=600)


def test_distinct_rows_touched_in_the_window() -> None:
    d = detector()
    for n in range(30):  # the same three rows, again and again: never a candidate
        d.observe("1", "critical", "public.guests", b"%d" % (n % 3), b"u", 100.0 + n)
    assert d.candidates(130.0) == {}
    for n in range(40):  # busy but ordinary: one or two rows per transaction
        d.observe("1", "critical", "public.guests", b"o%d" % n, b"d", 120.0, b"tx%d" % (n // 2))
    assert d.candidates(130.0) == {}
    for n in range(12):  # one transaction deleting twelve rows: a bulk change
        d.observe("1", "critical", "public.guests", b"k%d" % n, b"d", 131.0, b"bulk")
    d.observe("1", "critical", "public.guests", b"x", b"c", 131.0, b"bulk")  # inserts: no
    assert d.candidates(131.0) == {"1": (12, 12, {"public.guests": 12})}
    assert d.tier_of("1") == "critical"
    d.raised("1", 131.0)
    assert d.candidates(132.0) == {}  # cooldown
    assert d.candidates(131.0 + 601) == {}  # and the window has moved past them


def test_old_observations_leave_the_window() -> None:
    d = detector()
    for n in range(10):
        d.observe("2", "high", "public.guests", b"%d" % n, b"d", 0.0, b"tx")
    assert "2" in d.candidates(59.0)
    assert d.candidates(61.0) == {}


def test_webhook_urls_are_shown_without_their_secrets(tmp_path: Path) -> None:
    hook = NotifyConfig(url="https://user:pw@hooks.example.com/services/T0/B0/XyZ?token=abc")
    assert hook.display == "https://hooks.example.com/..."
    config = tmp_path / "bad.toml"
    config.write_text('[source]\ndsn = "postgresql://h/db"\n\n'
                      '[[notify]]\nurl = "ftp://user:pw@example.com/x?token=abc"\n')
    with pytest.raises(ConfigError) as refused:
        load_config(config, {})
    assert "notify" in str(refused.value)
    assert "pw" not in str(refused.value) and "abc" not in str(refused.value)
