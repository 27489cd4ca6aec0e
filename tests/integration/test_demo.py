"""`replicator demo`, the README's main job, runs end to end and is safe to run twice: capture
and archive under a live workload, one wedding restored as of a moment in the past and equal
to the source then, verify against the live database PASSED."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql
from psycopg.conninfo import make_conninfo

from replicator.cli import main
from replicator.devstack.stack import Stack
from tests.conftest import unique

EXAMPLE = Path(__file__).parents[2] / "examples" / "local.toml"


def config_text(dsn: str, slot: str, prefix: str, kafka: str) -> str:
    text = (EXAMPLE.read_text()
            .replace('dsn = "postgresql://postgres@127.0.0.1:15432/wedsync"', f'dsn = "{dsn}"')
            .replace('topic_prefix = "wedsync"', f'topic_prefix = "{prefix}"')
            .replace('slot = "wedsync_replicator"', f'slot = "{slot}"')
            .replace('bootstrap_servers = "127.0.0.1:19092"', f'bootstrap_servers = "{kafka}"'))
    assert dsn in text and prefix in text and slot in text and kafka in text
    return text


@pytest.fixture
def demo_config(dev_stack: Stack, tmp_path: Path, topic_prefix: str) -> Iterator[Path]:
    """The example configuration on a database, slot and topics of this test's own."""
    server = dev_stack.services["pg15"].address()
    dbname = unique("demo_")
    path = tmp_path / "demo.toml"
    path.write_text(config_text(make_conninfo(server, dbname=dbname), dbname, topic_prefix,
                                dev_stack.services["kafka"].address()))
    yield path
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                      "WHERE database = %s", (dbname,))
        for name in (dbname, f"{dbname}_restore"):
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def run_demo(config: Path, state_dir: Path, **env: str) -> Result:
    # A state directory of the test's own: the archive folder, its key and its marker must
    # not be the developer's `.replicator-dev/archive` (another database would write into it).
    return CliRunner().invoke(main, ["demo", "--config", str(config), "--seconds", "3"],
                              env={"REPLICATOR_DEV_DIR": str(state_dir), **env})


# "0 rows", not the end of "270 rows": the first snapshot's size varies with the live workload.
NO_SNAPSHOT = re.compile(r"(?<![0-9])0 rows \(first run only\)")


def summary(output: str) -> str:
    assert "Summary (" in output, output
    return output[output.index("Summary ("):]


def test_demo_runs_twice(demo_config: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = run_demo(demo_config, state)
    assert first.exit_code == 0, first.output
    assert "sample database" in first.output and "created" in first.output
    assert "critical:" in first.output and "snapshot" in first.output
    end = summary(first.output)
    assert "restored  wedding 2 as of" in end and "identical to the source" in end, end
    assert "verify    PASSED" in end, end
    assert (state / "archive" / "checkpoints" / "local").is_dir()
    assert (state / "archive.source").exists()

    second = run_demo(demo_config, state)
    assert second.exit_code == 0, second.output
    assert "reused" in second.output
    assert NO_SNAPSHOT.search(second.output), second.output  # resumed, no second snapshot
    assert "start over" not in second.output
    end = summary(second.output)
    assert "identical to the source" in end and "verify    PASSED" in end, end

    # The archive folder lost: folder and slot start over (new slot, new snapshot), and the
    # restore and verify work again.
    shutil.rmtree(state / "archive")
    third = run_demo(demo_config, state)
    assert third.exit_code == 0, third.output
    assert "start over" in third.output
    assert not NO_SNAPSHOT.search(third.output), third.output
    end = summary(third.output)
    assert "identical to the source" in end and "verify    PASSED" in end, end


def test_demo_says_when_the_stack_is_not_up(tmp_path: Path) -> None:
    path = tmp_path / "down.toml"
    path.write_text(config_text("postgresql://postgres@127.0.0.1:1/wedsync", "demo_down",
                                "demo_down", "127.0.0.1:1"))
    # A local stack configured on port 1, where nothing listens: the demo's own services,
    # so its guard lets it through to the check that they are up.
    result = run_demo(path, tmp_path / "state", REPLICATOR_DEV_PG15_PORT="1",
                      REPLICATOR_DEV_PG18_PORT="2", REPLICATOR_DEV_KAFKA_PORT="1")
    assert result.exit_code == 1, result.output
    assert "the local stack is not up" in result.output
    assert "PostgreSQL at 127.0.0.1:1" in result.output and "Kafka at 127.0.0.1:1" in result.output
    assert "replicator dev up" in result.output
