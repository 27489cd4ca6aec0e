"""The `replicator` command's entry point: before anything heavy is imported, a stop asked for
(SIGTERM, SIGINT) is recorded rather than killing the process, so that `replicator run`,
stopped while it is still starting, stops cleanly once it can (`cli.run`)."""

from __future__ import annotations

import signal
import sys
from types import FrameType

#: Signals received before `replicator run` handles them itself.
EARLY: list[int] = []


def _record(signum: int, frame: FrameType | None) -> None:
    EARLY.append(signum)


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _record)
    from replicator.cli import main as cli

    if sys.argv[1:2] != ["run"]:
        # Every other command stops at once on a signal, as usual.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if EARLY:
            raise SystemExit(128 + EARLY[0])
    cli()
