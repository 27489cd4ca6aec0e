"""The `replicator` command. Only this package turns errors into exit codes and messages, in
one place: `cli.errors.ReplicatorGroup`."""

from __future__ import annotations

import click

from replicator import __version__
from replicator.cli.compact import compact
from replicator.cli.demo import demo
from replicator.cli.dev import dev
from replicator.cli.errors import ReplicatorGroup
from replicator.cli.impact import impact
from replicator.cli.replay import replay, verify
from replicator.cli.retention import retention
from replicator.cli.rollback import rollback
from replicator.cli.run import run
from replicator.cli.snapshot import snapshot
from replicator.cli.status import status
from replicator.cli.usage import usage


@click.group(cls=ReplicatorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="replicator")
def main() -> None:
    """Change-data-capture replicator and point-in-time backup for WedSync."""


main.add_command(compact)
main.add_command(demo)
main.add_command(dev)
main.add_command(impact)
main.add_command(replay)
main.add_command(retention)
main.add_command(rollback)
main.add_command(run)
main.add_command(snapshot)
main.add_command(status)
main.add_command(usage)
main.add_command(verify)
