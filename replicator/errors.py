"""The project's exceptions: one root, two branches, like httpx's tree.

    ReplicatorError                  a failure: the command exits 1
    ├── OperatorError                only the operator can change it: exit 2, one line, no
    │   │                            traceback (configuration, a request to change, a lost slot)
    │   ├── config.ConfigError
    │   ├── replay.plan.ReplayRefused          a point, table or target the archive cannot give
    │   ├── capture.CaptureFatal               the source needs the operator (lost slot, ...)
    │   ├── source.slot.SourceConfigError, source.snapshot.SnapshotRequestError
    │   ├── sink.service.SinkSetupError, ops.metrics.MetricsError
    │   ├── crypto.KeyringError, crypto.UnknownKey
    │   └── devstack.settings.SettingsError
    ├── TransientError               worth another try: retried under capped, jittered backoff
    │   │                            where it happens; a failure if it outlasts the retries
    │   ├── source.stream.SourceUnavailable, source.stream.StreamClosed
    │   ├── connectors.errors.Retriable
    │   └── transport.kafka.ProducerError (a restart from the slot resends)
    └── everything else that is ours: archive.reader.ReplayFailed (an object a restore could not
        use), crypto.CryptoError (tampered, truncated, wrong key), archive.segment.SegmentError,
        archive.part.PartCorrupt, transport.avro.CodecError, connectors.errors.StoreError, ...

Library code raises these and never exits the process; `replicator.cli` alone turns them into
exit codes and one-line messages (`cli.errors`). An exception that is not a `ReplicatorError`
is a bug, and keeps its traceback.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EXIT_FAILED", "EXIT_OPERATOR", "OperatorError", "ReplicatorError", "TransientError",
           "exit_code"]

EXIT_FAILED: Final = 1
EXIT_OPERATOR: Final = 2


class ReplicatorError(Exception):
    """Something this project knows how to describe went wrong (exit 1)."""


class OperatorError(ReplicatorError):
    """Only the operator can change this: a configuration, a request, a lost slot (exit 2)."""


class TransientError(ReplicatorError):
    """Worth another try after a backoff; a failure when it outlasts the retries."""


def exit_code(exc: BaseException) -> int:
    """The exit code of a command that stopped on *exc*."""
    return EXIT_OPERATOR if isinstance(exc, OperatorError) else EXIT_FAILED
