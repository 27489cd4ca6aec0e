"""The one place errors become exit codes and one-line messages.

Every subcommand runs under `ReplicatorGroup.invoke`, which turns an escaping
`ReplicatorError` (or an exception group of them, from a task group) into `error: <message>`
on stderr and the exit code of its class (`replicator.errors`): 2 for an `OperatorError`, 1
for anything else of ours. An exception that is not ours is a bug and keeps its traceback.

A command adds what it was doing to a failure's message with `failing_as("replay stopped,
nothing was committed")`, which also takes foreign exceptions that mean a service failed
(`OSError`, `psycopg.Error`) as failures of the command rather than bugs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import click

from replicator.errors import EXIT_FAILED, OperatorError, ReplicatorError, exit_code

__all__ = ["CommandFailed", "ReplicatorGroup", "fail", "failing_as", "one_line"]

log = logging.getLogger("replicator")


class CommandFailed(ReplicatorError):
    """A command stopped on a failure; the message says what it was doing (exit 1)."""


def one_line(exc: BaseException) -> str:
    """The first line of *exc*'s message (its class name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print `error: <message>` and exit with *code*."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def failing_as(what: str, foreign: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Inside: one of the *foreign* exceptions (named by the command: the services it talks
    to, even where one of ours would be an operator's error elsewhere) or a failure of ours
    (not an operator's error) becomes a `CommandFailed` saying `<what>: <message>`."""
    try:
        yield
    except foreign as exc:
        log.debug("%s", what, exc_info=True)
        raise CommandFailed(f"{what}: {one_line(exc)}") from exc
    except OperatorError:
        raise
    except ReplicatorError as exc:
        raise CommandFailed(f"{what}: {exc}") from exc


def _ours(group: BaseExceptionGroup[Any]) -> list[ReplicatorError] | None:
    """The leaves of *group* when every one is ours, else None."""
    leaves: list[ReplicatorError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = _ours(exc)
            if inner is None:
                return None
            leaves.extend(inner)
        elif isinstance(exc, ReplicatorError):
            leaves.append(exc)
        else:
            return None
    return leaves


class ReplicatorGroup(click.Group):
    """The `replicator` command group: maps our errors to exit codes (module docstring)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ReplicatorError as exc:
            log.debug("stopped", exc_info=True)
            fail(str(exc), exit_code(exc))
        except BaseExceptionGroup as group:
            leaves = _ours(group)
            if not leaves:
                raise
            for leaf in leaves:
                log.error("stopped: %s", leaf)
                click.echo(f"error: {leaf}", err=True)
            sys.exit(max(exit_code(leaf) for leaf in leaves))
