"""The CLI maps our errors to exit codes in one place: an operator's error exits 2, any
other of ours 1, both as one `error:` line without a traceback; a bug keeps its traceback."""

from __future__ import annotations

import asyncio

import click
import pytest
from click.testing import CliRunner

from replicator.cli.errors import CommandFailed, ReplicatorGroup, failing_as
from replicator.config import ConfigError
from replicator.errors import OperatorError, ReplicatorError, TransientError, exit_code
from replicator.replay.plan import ReplayRefused


def _cli(exc: BaseException) -> click.Group:
    @click.group(cls=ReplicatorGroup)
    def main() -> None: ...

    @main.command()
    def boom() -> None:
        raise exc

    return main


@pytest.mark.parametrize(("exc", "code"), [
    (ConfigError("destinations[0].url: unknown scheme 'ftp'"), 2),
    (ReplayRefused("LSN 0/10 is past the destination's durable checkpoint"), 2),
    (ReplicatorError("object segments/x is corrupt"), 1),
    (TransientError("Kafka did not answer"), 1),
])
def test_our_errors_exit_with_their_class_code_and_one_line(exc: BaseException,
                                                            code: int) -> None:
    result = CliRunner().invoke(_cli(exc), ["boom"])
    assert result.exit_code == code
    assert result.output.strip() == f"error: {exc}"
    assert "Traceback" not in result.output


def test_a_task_group_of_our_errors_prints_each_and_exits_with_the_gravest() -> None:
    group = ExceptionGroup("stopped", [ReplicatorError("sink s3 failed"),
                                       OperatorError("slot lost")])
    result = CliRunner().invoke(_cli(group), ["boom"])
    assert result.exit_code == 2
    assert "error: sink s3 failed" in result.output and "error: slot lost" in result.output


def test_a_bug_keeps_its_traceback() -> None:
    result = CliRunner().invoke(_cli(KeyError("x")), ["boom"])
    assert isinstance(result.exception, KeyError)
    bugs = CliRunner().invoke(_cli(ExceptionGroup("g", [KeyError("y")])), ["boom"])
    assert isinstance(bugs.exception, ExceptionGroup)


def test_failing_as_names_what_failed_and_leaves_operator_errors_alone() -> None:
    with pytest.raises(CommandFailed, match=r"^replay stopped: object x is missing$"), \
            failing_as("replay stopped"):
        raise ReplicatorError("object x is missing")
    with pytest.raises(CommandFailed, match=r"^verify could not run: connection refused$"), \
            failing_as("verify could not run", (OSError,)):
        raise OSError("connection refused\nmore detail")
    with pytest.raises(ReplayRefused), failing_as("replay stopped"):
        raise ReplayRefused("no such table")
    with pytest.raises(asyncio.CancelledError), failing_as("x", (OSError,)):
        raise asyncio.CancelledError
    assert exit_code(CommandFailed("x")) == 1


def test_failing_as_takes_the_named_services_errors_as_failures_first() -> None:
    # `replicator compact` names the store's errors: a store it cannot use is a failed run
    # (the service counts it), even where the store's error is an operator's elsewhere.
    from connectors.errors import Fatal

    with pytest.raises(CommandFailed, match=r"^compaction stopped: no such directory"), \
            failing_as("compaction stopped", (Fatal, OSError)):
        raise Fatal("no such directory", url="file:///nothing")


def test_store_sdks_do_not_log_each_request() -> None:
    """The Azure SDK logs every request at INFO: `run`'s logging keeps the stores' client
    libraries at WARNING, and ours at the level asked for."""
    import logging

    from replicator.cli.run import setup_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        root.handlers[:] = []  # as in a fresh process (basicConfig does nothing otherwise)
        setup_logging("info")
        sdk = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
        assert not sdk.isEnabledFor(logging.INFO)
        assert sdk.isEnabledFor(logging.WARNING)
        assert not logging.getLogger("botocore.endpoint").isEnabledFor(logging.INFO)
        assert logging.getLogger("replicator.sink.worker").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], root.level = handlers, level
