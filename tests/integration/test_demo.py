"""`replicator demo`, the README's main job, runs end to end and is safe to run twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.conninfo import make_conninfo

from replicator.cli import main
from replicator.devstack.stack import Stack
from tests.conftest import unique


@pytest.fixture
def demo_config(dev_stack: Stack, tmp_path: Path, topic_prefix: str) -> Iterator[Path]:
    server = dev_stack.services["pg15"].address()
    dbname = unique("demo_")
    example = (Path(__file__).parents[2] / "examples" / "local.toml").read_text()
    text = (example
            .replace('dsn = "postgresql://postgres@127.0.0.1:15432/wedsync"',
                     f'dsn = "{make_conninfo(server, dbname=dbname)}"')
            .replace('topic_prefix = "wedsync"', f'topic_prefix = "{topic_prefix}"')
            .replace('slot = "wedsync_replicator"', f'slot = "{dbname}"')
            .replace('bootstrap_servers = "127.0.0.1:19092"',
                     f'bootstrap_servers = "{dev_stack.services["kafka"].address()}"'))
    assert dbname in text and topic_prefix in text
    path = tmp_path / "demo.toml"
    path.write_text(text)
    yield path
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                      "WHERE database = %s", (dbname,))
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(dbname)))


def test_demo_runs_twice(demo_config: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(main, ["demo", "--config", str(demo_config), "--seconds", "2"])
    assert first.exit_code == 0, first.output
    assert "sample database created" in first.output
    assert "critical:" in first.output and "snapshot" in first.output
    second = runner.invoke(main, ["demo", "--config", str(demo_config), "--seconds", "2"])
    assert second.exit_code == 0, second.output
    assert "sample database reused" in second.output
    assert "0 rows (first run only)" in second.output  # resumed, no second snapshot
