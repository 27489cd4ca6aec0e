"""The `replicator` command. Only this package turns errors into exit codes and messages, in
one place: `cli.errors.ReplicatorGroup`.

Each subcommand's module is imported only when that subcommand runs (or when `--help` lists
them), so a `replay` or `status` does not carry the capture's and the sinks' libraries in its
memory: `replay --memory-budget` counts the whole process.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from replicator import __version__
from replicator.cli.errors import ReplicatorGroup

# name -> "module:attribute"
COMMANDS = {
    "compact": "replicator.cli.compact:compact",
    "demo": "replicator.cli.demo:demo",
    "dev": "replicator.cli.dev:dev",
    "impact": "replicator.cli.impact:impact",
    "replay": "replicator.cli.replay:replay",
    "retention": "replicator.cli.retention:retention",
    "rollback": "replicator.cli.rollback:rollback",
    "run": "replicator.cli.run:run",
    "snapshot": "replicator.cli.snapshot:snapshot",
    "status": "replicator.cli.status:status",
    "usage": "replicator.cli.usage:usage",
    "verify": "replicator.cli.replay:verify",
}


class LazyGroup(ReplicatorGroup):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        command: Any = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command), target
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="replicator")
def main() -> None:
    """Change-data-capture replicator and point-in-time backup for WedSync."""
