"""The service's compaction schedule: every `compaction.check_every_s`, each destination's
tables with enough changes since their last snapshot get a new one (`replicator compact`,
docs/ARCHITECTURE.md, "Compaction").

A burst does not wait for the next check. Once the destination's sink has written
`min_changes` rows since the last check began, the next one begins at once, though no sooner
than `min_interval_s` after the last: the tail a restore reads stays near the policy, and a
steady high rate costs at most one run per `min_interval_s`. A check that finds no table over
the thresholds costs a LIST and the transaction records; the child decides per table.

Each run is a child process (`python -m replicator compact --from <url> --destination <name>
--min-changes N --min-changes-ratio R --json`) at a lower CPU priority: it decodes and merges
as much as a restore does, and must neither hold the sinks' event loop nor take the core the
sinks need to keep the critical tier's recovery point short. Its stores' credentials and keys
come from the service's environment (and the configured keyring file), as for the sinks, but
the child gets only what it needs of that environment (`child_environment`): the credentials
of its own store's kind, the `REPLICATOR_KEK_*` keys, and the process basics (PATH, HOME,
locale, temporary directory, proxies and CA bundles, Python's own variables); never the
source's password (`REPLICATOR_SOURCE_PASSWORD`, `..._FILE`, `PG*`) or any other secret the
service was started with.
Stopping the service stops a run under way; a snapshot without its manifest is never read,
and the next run compacts at a later point.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from replicator.config import ConflictRule, DestinationConfig

EXIT_NEEDS_OPERATOR = 2  # `replicator compact` refused: nothing it can do at this point

log = logging.getLogger(__name__)

NICENESS = 10

#: What `replicator compact` may see of the service's environment (module docstring).
_CHILD_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP",
    "TMP", "VIRTUAL_ENV", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
    "no_proxy", "XDG_RUNTIME_DIR", "SYSTEMROOT"})
_CHILD_PREFIXES = ("LC_", "PYTHON", "REPLICATOR_KEK_")
#: A store's credentials and settings, by URL scheme (`connectors.registry`).
_STORE_PREFIXES = {"s3": ("AWS_",), "az": ("AZURE_STORAGE_",),
                   "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
                          "STORAGE_EMULATOR_HOST")}
POLL_S = 1.0  # how often the rows written are looked at, between checks


@dataclass(slots=True)
class CompactionStats:
    runs: int = 0
    failures: int = 0
    tables_compacted: int = 0
    last_success_at: float = 0.0  # wall clock (time.time())
    last_seconds: float = 0.0
    retention_runs: int = 0
    retention_failures: int = 0
    retention_deleted: int = 0  # objects
    # What the archive holds, by object kind (`replicator usage`, after each compaction):
    # kind -> {"objects": n, "bytes": n}
    usage: dict[str, dict[str, int]] = field(default_factory=dict)


class Compactor:
    """One destination's compaction schedule."""

    def __init__(self, destination: DestinationConfig, environ: Mapping[str, str],
                 keyring_file: Path | None = None, *,
                 written: Callable[[], int] | None = None,
                 leader: Callable[[], bool] | None = None,
                 wedding_day: Callable[[], Awaitable[str | None]] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 conflicts: Mapping[str, ConflictRule] | None = None) -> None:
        self.destination = destination
        # `[conflicts]`: compaction folds rows written by several origins as restores do.
        self.conflicts = dict(conflicts or {})
        self.environ = child_environment(environ, destination.url)
        self.keyring_file = keyring_file
        self.stats = CompactionStats()
        self._written = written  # rows the destination's sink has written so far
        # Whether this process runs the destination's compaction: of several sink processes
        # for one destination (sink/members.py), only the checkpointer does.
        self._leader = leader
        self._wedding_day = wedding_day  # the calendar's finding, for retention
        self._clock = clock
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    def command(self) -> list[str]:
        settings = self.destination.compaction
        command = [sys.executable, "-m", "replicator", "compact",
                   "--from", self.destination.url, "--destination", self.destination.name,
                   "--min-changes", str(settings.min_changes),
                   "--min-changes-ratio", repr(settings.min_changes_ratio),
                   "--nice", str(NICENESS), "--json"]
        if self.keyring_file is not None:
            command += ["--keyring", str(self.keyring_file)]
        if self.conflicts:
            command += ["--conflicts", json.dumps(
                {table: rule.model_dump(mode="json") for table, rule in self.conflicts.items()},
                sort_keys=True)]
        return command

    def due(self, now: float, last_started: float, written_then: int) -> bool:
        """Whether the next check begins now: *check_every_s* after the last one began, or
        earlier for a burst (module docstring)."""
        settings = self.destination.compaction
        if self._leader is not None and not self._leader():
            return False
        since = now - last_started
        if since >= settings.check_every_s:
            return True
        if self._written is None or settings.min_changes <= 0 \
                or since < settings.min_interval_s:
            return False
        return self._written() - written_then >= settings.min_changes

    async def run(self) -> None:
        last_started = self._clock()
        written_then = self._written() if self._written is not None else 0
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), POLL_S)
            if self._stopping.is_set():
                return
            if not self.due(self._clock(), last_started, written_then):
                continue
            last_started = self._clock()
            written_then = self._written() if self._written is not None else 0
            await self.run_once()
            await self.run_retention()
            await self.run_usage()

    async def _child(self, command: list[str], what: str
                     ) -> tuple[int | None, bytes, bytes] | None:
        """Run *command*; its exit code and output, or None when the service stopped first."""
        child = await asyncio.create_subprocess_exec(
            *command, env=self.environ, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        waiting = asyncio.ensure_future(child.communicate())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await _end(child, waiting)
            raise
        finally:
            stopping.cancel()
        if not waiting.done():
            await _end(child, waiting)
            log.info("%s of destination %s stopped with the service", what,
                     self.destination.name)
            return None
        out, err = waiting.result()
        return child.returncode, out, err

    async def run_retention(self) -> bool:
        """One retention run (`replicator retention`, `[destinations.retention]`), skipped
        on a wedding day (a scheduled run never overrides the guard) or when the calendar
        cannot be read; whether it ran and succeeded."""
        settings, name = self.destination.retention, self.destination.name
        if settings.keep is None:
            return False
        try:
            finding = await self._wedding_day() if self._wedding_day is not None else None
        except Exception as exc:  # the calendar cannot be read: do not delete today
            log.warning("retention of destination %s skipped: the wedding calendar cannot be "
                        "read (%s)", name, type(exc).__name__)
            return False
        if finding:
            log.info("retention of destination %s skipped: %s", name, finding)
            return False
        command = [sys.executable, "-m", "replicator", "retention", "--from",
                   self.destination.url, "--destination", name, "--keep", settings.keep,
                   "--grace", settings.grace, "--nice", str(NICENESS), "--json"]
        if self.keyring_file is not None:
            command += ["--keyring", str(self.keyring_file)]
        done = await self._child(command, "retention")
        if done is None:
            return False
        code, out, err = done
        self.stats.retention_runs += 1
        if code != 0:
            self.stats.retention_failures += 1
            lines = err.decode(errors="replace").strip().splitlines()
            log.warning("retention of destination %s failed (exit %s): %s", name, code,
                        lines[-1] if lines else "no message")
            return False
        with contextlib.suppress(ValueError, IndexError):
            report = json.loads(out.decode().strip().splitlines()[-1])
            self.stats.retention_deleted += int(report.get("deleted", 0))
            if report.get("deleted") or report.get("undeletable"):
                log.info("retention of destination %s: %s objects deleted, %s not deletable",
                         name, report.get("deleted"), len(report.get("undeletable") or {}))
        return True

    async def run_usage(self) -> None:
        """Refresh `stats.usage` (`replicator usage --json`); a failure is only logged."""
        command = [sys.executable, "-m", "replicator", "usage", "--from",
                   self.destination.url, "--destination", self.destination.name, "--json"]
        if self.keyring_file is not None:
            command += ["--keyring", str(self.keyring_file)]
        done = await self._child(command, "usage")
        if done is None:
            return
        code, out, err = done
        try:
            if code != 0:
                raise ValueError(err.decode(errors="replace").strip()[-300:])
            self.stats.usage = json.loads(out.decode().strip().splitlines()[-1])["by_kind"]
        except (ValueError, IndexError, KeyError) as exc:
            log.warning("usage of destination %s not refreshed: %s", self.destination.name,
                        exc)

    async def run_once(self) -> bool:
        """One compaction run; whether it succeeded. Failures are logged and counted (the
        schedule goes on: a store down now may be back at the next check)."""
        name = self.destination.name
        started = time.monotonic()
        self.stats.runs += 1
        done = await self._child(self.command(), "compaction")
        if done is None:
            return False
        returncode, out, err = done
        seconds = time.monotonic() - started
        message = err.decode(errors="replace").strip().splitlines()
        last = message[-1] if message else "no message"
        if returncode == EXIT_NEEDS_OPERATOR:
            # A refusal: nothing to compact yet (no checkpoint or no snapshot in the
            # archive yet, as after a first start); not a failure.
            log.info("compaction of destination %s: nothing to do now: %s", name, last)
            return True
        if returncode != 0:
            self.stats.failures += 1
            log.warning("compaction of destination %s failed (exit %s): %s", name,
                        returncode, last)
            return False
        try:
            summary = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.stats.failures += 1
            log.warning("compaction of destination %s printed no summary", name)
            return False
        tables = [t for t, s in summary.get("tables", {}).items() if s.get("done")]
        self.stats.tables_compacted += len(tables)
        self.stats.last_success_at = time.time()
        self.stats.last_seconds = seconds
        if tables:
            log.info("compacted %s of destination %s at %s in %.1f s", ", ".join(tables),
                     name, summary.get("target"), seconds)
        return True


def child_environment(environ: Mapping[str, str], url: str) -> dict[str, str]:
    """What the compaction child of the destination at *url* may see of *environ*."""
    scheme = url.partition("://")[0].lower()
    prefixes = _CHILD_PREFIXES + _STORE_PREFIXES.get(scheme, ())
    return {name: value for name, value in environ.items()
            if name in _CHILD_NAMES or name.startswith(prefixes)}


async def _end(child: asyncio.subprocess.Process,
               waiting: asyncio.Future[tuple[bytes, bytes]]) -> None:
    with contextlib.suppress(ProcessLookupError):
        child.terminate()
    with contextlib.suppress(Exception):
        await waiting
