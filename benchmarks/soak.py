"""Soak: the service under sustained load, DDL and injected faults for an hour.

What runs: `replicator run --only capture` and `replicator run --only sinks`, two real
processes as an operator deploys them, capturing a fresh database (the sample schema of
`benchmarks.rpo`: 400 weddings, 100 per tier, 64 guests each) into Kafka and archiving it into
three destinations: a local folder, S3 (the local stack's moto) and Azure Blob (Azurite). The
source and both remote stores are reached through Toxiproxy proxies of the local stack, so
faults are real network faults.

Load: `benchmarks.rpo`'s server-side writers, about `--rate` commits/s (default 2,000) in
windows of a minute, each commit updating one or two guests of one wedding, the tiers taking
turns. Every `--ddl-every` seconds (default 300; `--quick` 120) a DDL statement runs under the
load (`ALTER TABLE guests ADD COLUMN soak_<n> int DEFAULT <n>`, and every other time a
`DROP COLUMN` of the previous one). Faults, one per window, in turn: 300 ms latency on S3 for
20 s; connection resets on Azure for 10 s; a 30 s S3 outage (proxy disabled); the source's
connection cut for 5 s.

Measured:
- RSS of each process at the start (after the first window) and at the end: it must stay flat;
- RPO per tier: for each commit, the first time every destination's checkpoint of its tier
  (from the sinks' `/metrics`, polled every second) passes the WAL position read inside the
  transaction, minus its commit time; p99 per tier (the worst destination), and per
  destination beside it; `drain_s`, how long after the load every commit was durable;
- changes lost: commits never durable in some destination by the end of the drain (which
  lasts while some checkpoint still advances, until none moved for the flush interval plus
  180 s, and at most that plus the load's length), plus rows that differ between each
  destination's restore and the source (`replicator verify --against`, after the load):
  both must be 0. A table verify could not restore (a store it could not read even after
  its retries) is not counted as lost but listed in `unverified`, and fails the run too.

`--json` prints one JSON object on the last line: `minutes`, `lost`, `rss_mb_start` and
`rss_mb_end` (per process), `rpo_p99_s` (per tier), and details beside them (`windows`: per
window the RSS of each process and what each destination's sink holds, `wedsync_sink_held`).

    .venv/bin/python -m benchmarks.soak [--minutes 60] [--quick] [--rate 2000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from benchmarks import rpo
from benchmarks.capture import delete_topics
from replicator.devstack.objectstores import azurite_connection_string
from replicator.devstack.settings import S3_REGION, StackSettings
from replicator.devstack.stack import Stack
from replicator.events import TIER_ORDER
from tests.integration.archive_helpers import sink_environ

TIERS = tuple(t.value for t in TIER_ORDER)
QUICK_FLUSH = rpo.QUICK_FLUSH
WINDOW_S = 60.0
POLL_S = 1.0
_METRIC = re.compile(r'^wedsync_sink_checkpoint_lsn\{destination="([^"]+)",tier="([^"]+)"\} '
                     r'([0-9.e+]+)$')


# --- Toxiproxy ---------------------------------------------------------------------------------


class Toxiproxy:
    """A few calls of Toxiproxy's HTTP API."""

    def __init__(self, api: str) -> None:
        self.api = api.rstrip("/")
        self.names: list[str] = []

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        async with aiohttp.ClientSession() as session, session.request(
                method, f"{self.api}{path}", json=body) as response:
            if response.status >= 300:
                raise RuntimeError(f"toxiproxy {method} {path}: HTTP {response.status} "
                                   f"{(await response.text())[:200]}")
            return await response.json(content_type=None) if response.status != 204 else None

    async def proxy(self, name: str, upstream: str) -> int:
        """A proxy to *upstream* on a free port of 127.0.0.1; its port."""
        port = free_port()
        # One left by a soak that was killed: replaced (a soak runs alone on its stack).
        with contextlib.suppress(RuntimeError):
            await self._call("DELETE", f"/proxies/{name}")
        await self._call("POST", "/proxies", {"name": name, "listen": f"127.0.0.1:{port}",
                                              "upstream": upstream, "enabled": True})
        self.names.append(name)
        return port

    async def enabled(self, name: str, on: bool) -> None:
        await self._call("POST", f"/proxies/{name}", {"enabled": on})

    async def toxic(self, name: str, kind: str, attributes: dict[str, Any]) -> str:
        toxic = f"{name}_{kind}"
        await self._call("POST", f"/proxies/{name}/toxics",
                         {"name": toxic, "type": kind, "stream": "downstream",
                          "toxicity": 1.0, "attributes": attributes})
        return toxic

    async def remove_toxic(self, name: str, toxic: str) -> None:
        await self._call("DELETE", f"/proxies/{name}/toxics/{toxic}")

    async def close(self) -> None:
        for name in self.names:
            with contextlib.suppress(RuntimeError, aiohttp.ClientError):
                await self._call("DELETE", f"/proxies/{name}")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- the service's processes -------------------------------------------------------------------


@dataclass
class Service:
    role: str  # "capture" or "sinks"
    config: Path
    metrics_port: int
    environ: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "replicator", "run", "--config", str(self.config),
             "--only", self.role], env=self.environ, stdout=out, stderr=out,
            cwd=rpo.PROJECT_ROOT)

    def rss_mb(self) -> float:
        assert self.process is not None
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def ready(self, within: float) -> None:
        deadline = time.monotonic() + within
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.role} exited: {self.tail()}")
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.role} not ready within {within:.0f} s: {self.tail()}")

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])
        except OSError:
            return ""

    def tracebacks(self) -> int:
        try:
            return self.log.read_text(errors="replace").count("Traceback")
        except OSError:
            return 0


def config_text(dsn: str, bootstrap: str, prefix: str, name: str, metrics_port: int,
                dests: Sequence[tuple[str, str]], flush: dict[str, float]) -> str:
    flush_lines = "".join(f"{tier}_s = {seconds}\n" for tier, seconds in flush.items())
    out = [f'[source]\ndsn = "{dsn}"\nslot = "{name}"\npublication = "{name}"\n'
           'snapshot = "initial"\nheartbeat_interval_s = 2\n',
           '[priority.tables."public.guests"]\ncolumn = "wedding_id"\n',
           f'[kafka]\nbootstrap_servers = "{bootstrap}"\ntopic_prefix = "{prefix}"\n'
           'partitions = 2\n',
           f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n']
    for dest, url in dests:
        out.append(f'[[destinations]]\nname = "{dest}"\nurl = "{url}"\n'
                   f'[destinations.flush]\n{flush_lines}')
    return "\n".join(out)


# --- measurement ---------------------------------------------------------------------------


@dataclass
class Checkpoints:
    """When each destination's tier checkpoints were first seen at each value."""

    seen: dict[tuple[str, str], list[tuple[float, int]]] = field(default_factory=dict)
    polls: int = 0

    async def poll_forever(self, port: int, stop: asyncio.Event) -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while not stop.is_set():
                try:
                    async with session.get(url) as response:
                        text = await response.text()
                except (aiohttp.ClientError, TimeoutError):
                    text = ""
                now = time.time()
                self.polls += 1
                for line in text.splitlines():
                    match = _METRIC.match(line)
                    if match is None:
                        continue
                    key, value = (match[1], match[2]), int(float(match[3]))
                    history = self.seen.setdefault(key, [])
                    if not history or value > history[-1][1]:
                        history.append((now, value))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_S)

    def progress(self) -> int:
        """How many checkpoint advances were seen, over every destination and tier."""
        return sum(len(history) for history in self.seen.values())

    def durable_at(self, dest: str, tier: str, lsn: int) -> float | None:
        """The first time the checkpoint of (*dest*, *tier*) was past *lsn* (a binary search:
        the values only grow, and an hour's run asks this for millions of commits)."""
        history = self.seen.get((dest, tier), [])
        n = bisect.bisect_right(history, lsn, key=lambda entry: entry[1])
        return history[n][0] if n < len(history) else None


_HELD = re.compile(r'^wedsync_sink_held\{destination="([^"]+)",what="([^"]+)"\} (\S+)$')


async def held_now(port: int) -> dict[str, dict[str, int]]:
    """What each destination's sink holds in memory now (`wedsync_sink_held`), from the
    sinks' /metrics; empty when it does not answer."""
    held: dict[str, dict[str, int]] = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
                session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return held
    for line in text.splitlines():
        if (match := _HELD.match(line)) is not None:
            held.setdefault(match[1], {})[match[2]] = int(float(match[3]))
    return held


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)


# --- the run -----------------------------------------------------------------------------------


FAULTS = ("s3 latency", "azure resets", "s3 outage", "source cut")


async def inject(tox: Toxiproxy, fault: str) -> None:
    if fault == "s3 latency":
        toxic = await tox.toxic("soak_s3", "latency", {"latency": 300, "jitter": 50})
        await asyncio.sleep(20)
        await tox.remove_toxic("soak_s3", toxic)
    elif fault == "azure resets":
        toxic = await tox.toxic("soak_azure", "reset_peer", {"timeout": 500})
        await asyncio.sleep(10)
        await tox.remove_toxic("soak_azure", toxic)
    elif fault == "s3 outage":
        await tox.enabled("soak_s3", False)
        await asyncio.sleep(30)
        await tox.enabled("soak_s3", True)
    elif fault == "source cut":
        await tox.enabled("soak_pg", False)
        await asyncio.sleep(5)
        await tox.enabled("soak_pg", True)


async def ddl(dsn: str, n: int) -> str:
    import psycopg

    statement = f"ALTER TABLE guests ADD COLUMN soak_{n} int DEFAULT {n}"
    if n % 2 == 0 and n > 0:
        statement = f"ALTER TABLE guests DROP COLUMN soak_{n - 1}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET lock_timeout = '10s'")
        await conn.execute(statement)
    return statement


async def verify_against(url: str, dsn: str, environ: dict[str, str]) -> dict[str, Any]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replicator", "verify", "--from", url, "--against", dsn,
        "--json", "--wait", "180", env=environ, cwd=rpo.PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await child.communicate()
    try:
        doc: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        doc = {"ok": False, "error": err.decode(errors="replace").strip()[-300:]}
    doc["exit"] = child.returncode
    return doc


def _unreadable(table: dict[str, Any]) -> bool:
    """A table verify could not restore (a store it could not read): not checked, not lost."""
    problems = table.get("problems") or []
    return bool(problems) and all(str(p).startswith("restore failed") for p in problems)


def rows_differing(report: dict[str, Any]) -> int:
    return sum(abs((t.get("live_rows") or 0) - (t.get("rows") or 0)) or (0 if t.get("ok") else 1)
               for t in report.get("tables", {}).values() if not _unreadable(t))


def unverified(report: dict[str, Any]) -> list[str]:
    """The tables verify could not restore, or every table when it did not run."""
    tables = report.get("tables")
    if not tables:
        return [] if report.get("ok") else ["(verify did not run)"]
    return sorted(name for name, t in tables.items() if _unreadable(t))


async def run(minutes: float, rate: float, quick: bool, ddl_every: float, say: Any
              ) -> dict[str, Any]:
    stack = Stack(StackSettings.from_env(os.environ))
    await stack.up(["pg15", "kafka", "s3", "azure", "toxiproxy"])
    admin_dsn = stack.services["pg15"].address()
    bootstrap = stack.services["kafka"].address()
    name = "soak" + uuid.uuid4().hex[:10]
    work = Path(tempfile.mkdtemp(prefix="wedsync-soak-"))
    tox = Toxiproxy(stack.services["toxiproxy"].address())
    s3_endpoint = stack.services["s3"].address()
    az_endpoint = stack.services["azure"].address()
    services: list[Service] = []
    stop = asyncio.Event()
    result: dict[str, Any] = {"minutes": minutes, "rate": rate, "quick": quick}
    try:
        dsn = await rpo.setup_database(admin_dsn, name)
        params = conninfo_to_dict(admin_dsn)
        pg_port = await tox.proxy("soak_pg", f"{params.get('host') or '127.0.0.1'}:"
                                             f"{params.get('port') or 5432}")
        s3_port = await tox.proxy("soak_s3", s3_endpoint.split("://", 1)[1].rstrip("/"))
        az_port = await tox.proxy("soak_azure", az_endpoint.split("://", 1)[1].split("/")[0])
        await rpo.create_bucket(s3_endpoint, name)
        await rpo.create_container(az_endpoint, name)
        source_dsn = make_conninfo(dsn, host="127.0.0.1", port=str(pg_port))
        (work / "local").mkdir()
        dests = [("local", f"file://{work / 'local'}"),
                 ("s3", f"s3://{name}/?endpoint=http://127.0.0.1:{s3_port}&region={S3_REGION}"),
                 ("azure", f"az://{name}/?endpoint=http://127.0.0.1:{az_port}/devstoreaccount1")]
        flush = QUICK_FLUSH if quick else rpo.DEFAULT_FLUSH
        environ = sink_environ(AZURE_STORAGE_CONNECTION_STRING=azurite_connection_string(
            f"http://127.0.0.1:{az_port}/devstoreaccount1"))
        for role in ("capture", "sinks"):
            port = free_port()
            path = work / f"{role}.toml"
            path.write_text(config_text(source_dsn, bootstrap, name, name, port, dests, flush))
            services.append(Service(role, path, port, environ, work / f"{role}.log"))
        for service in services:
            service.start()
        for service in services:
            await service.ready(180)
        say(f"soak {name}: capture and sinks up; {minutes:g} min at {rate:g} commits/s, "
            f"DDL every {ddl_every:g} s, a fault every window")
        checkpoints = Checkpoints()
        poller = asyncio.create_task(checkpoints.poll_forever(services[1].metrics_port, stop))
        commits = rpo.Commits()
        writers = max(2, -(-int(rate) // rpo.PER_WRITER))
        started = time.monotonic()
        window, n_ddl, faults, statements = 0, 0, [], []
        rss_start: dict[str, float] = {}
        windows: list[dict[str, Any]] = []  # per window: RSS and what each sink holds
        while time.monotonic() - started < minutes * 60:
            left = minutes * 60 - (time.monotonic() - started)
            length = min(WINDOW_S, left)
            fault = FAULTS[window % len(FAULTS)]
            load = asyncio.create_task(rpo.run_load(dsn, writers, rate, length))
            await asyncio.sleep(min(10.0, length / 3))
            if length >= 40:
                faults.append(fault)
                await inject(tox, fault)
            part = await load
            commits.tier += part.tier
            commits.inside_lsn += part.inside_lsn
            commits.ts += part.ts
            window += 1
            if window == 1:
                rss_start = {s.role: round(s.rss_mb(), 1) for s in services}
            if (time.monotonic() - started) // ddl_every > n_ddl:
                n_ddl += 1
                statements.append(await ddl(dsn, n_ddl))
            held = await held_now(services[1].metrics_port)
            windows.append({"minute": round((time.monotonic() - started) / 60, 1),
                             "rss_mb": {s.role: round(s.rss_mb(), 1) for s in services},
                             "held": held})
            say(f"  {(time.monotonic() - started) / 60:5.1f} min: {len(commits)} commits, "
                f"fault {fault!r}, RSS " + ", ".join(f"{s.role} {s.rss_mb():.0f} MB"
                                                   for s in services)
                + "; sinks hold " + "; ".join(
                    f"{dest} " + " ".join(f"{k}={v}" for k, v in sorted(what.items()))
                    for dest, what in sorted(held.items())))
            if not all(service.alive() for service in services):
                break  # reported below, with what it left undone
        rss_end = {s.role: round(s.rss_mb(), 1) for s in services}
        # Drain: every commit durable in every destination, or no checkpoint moved for the
        # drain's quiet time. A backlog still going down is late (RPO), not lost.
        quiet = max(flush.values()) + 180
        top = {tier: max((lsn for t, lsn in zip(commits.tier, commits.inside_lsn, strict=True)
                          if t == k), default=0) for k, tier in enumerate(TIERS)}
        def drained() -> bool:
            return all(checkpoints.durable_at(dest, tier, lsn) is not None
                       for dest, _ in dests for tier, lsn in top.items() if lsn)

        load_ended = time.monotonic()
        moved, last = load_ended, checkpoints.progress()
        cap = quiet + minutes * 60  # heartbeats move checkpoints too: a bound for all that
        while time.monotonic() - moved < quiet and time.monotonic() - load_ended < cap:
            if drained() or not all(service.alive() for service in services):
                break
            await asyncio.sleep(2)  # the poller fills `checkpoints` meanwhile
            if (now := checkpoints.progress()) != last:
                moved, last = time.monotonic(), now
        drain_s = round(time.monotonic() - load_ended, 1)
        rpo_s: dict[str, list[float]] = {tier: [] for tier in TIERS}
        by_dest: dict[str, dict[str, list[float]]] = {
            dest: {tier: [] for tier in TIERS} for dest, _ in dests}
        never = 0
        for k, lsn, ts in zip(commits.tier, commits.inside_lsn, commits.ts, strict=True):
            times = [checkpoints.durable_at(dest, TIERS[k], lsn) for dest, _ in dests]
            if any(t is None for t in times):
                never += 1
                continue
            rpo_s[TIERS[k]].append(max(t for t in times if t is not None) - ts)
            for (dest, _), when in zip(dests, times, strict=True):
                assert when is not None
                by_dest[dest][TIERS[k]].append(when - ts)
        stop.set()
        await poller
        exited = {s.role: s.tail() for s in services if not s.alive()}
        say(f"before verify: never durable {never}, rss start {rss_start}, end {rss_end}, "
            f"rpo p99 {({tier: p99(values) for tier, values in rpo_s.items()})}")
        # One destination at a time: each restore of an hour's archive is large, and three at
        # once would share two cores and the memory.
        reports: dict[str, dict[str, Any]] = {}
        verify_started = time.monotonic()
        for dest, url in dests:
            reports[dest] = await verify_against(url, dsn, environ)
            say(f"verify {dest}: ok={reports[dest].get('ok')} exit={reports[dest]['exit']}")
        result["verify_s"] = round(time.monotonic() - verify_started, 1)
        differing = sum(rows_differing(r) for r in reports.values())
        result.update({
            "lost": never + differing,
            "unverified": {dest: tables for dest, r in reports.items()
                           if (tables := unverified(r))},
            "rss_mb_start": rss_start,
            "rss_mb_end": rss_end,
            "rpo_p99_s": {tier: p99(values) for tier, values in rpo_s.items()},
            "rpo_p99_s_by_destination": {dest: {tier: p99(values)
                                                for tier, values in tiers.items()}
                                         for dest, tiers in by_dest.items()},
            "drain_s": drain_s,
            "load_commit_rate": round(len(commits) / max(1e-9, load_ended - started), 1),
            "commits": len(commits),
            "commit_rate": round(len(commits) / max(1e-9, time.monotonic() - started), 1),
            "commits_never_durable": never,
            "rows_differing": differing,
            "verify": {dest: {"ok": r.get("ok"), "differing": r.get("differing"),
                              "exit": r.get("exit"), "error": r.get("error"),
                              "problems": {t: c.get("problems")
                                           for t, c in r.get("tables", {}).items()
                                           if not c.get("ok")}}
                       for dest, r in reports.items()},
            "faults": faults,
            "ddl": statements,
            "tracebacks": {s.role: s.tracebacks() for s in services},
            "exited": exited,
            "checkpoint_polls": checkpoints.polls,
            "windows": windows,
        })
        return result
    finally:
        stop.set()
        for service in services:
            service.stop()
        await tox.close()
        await rpo.drop_database(admin_dsn, name)
        await delete_topics(bootstrap, name)
        await rpo.delete_bucket(s3_endpoint, name)
        await rpo.delete_container(az_endpoint, name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="default 60; --quick 10")
    parser.add_argument("--quick", action="store_true",
                        help="10 minutes, short flush intervals, DDL every 2 minutes")
    parser.add_argument("--rate", type=float, default=2000.0, help="commits per second")
    parser.add_argument("--ddl-every", type=float, default=None, metavar="S")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = parser.parse_args()
    minutes = args.minutes if args.minutes is not None else (10.0 if args.quick else 60.0)
    ddl_every = args.ddl_every or (120.0 if args.quick else 300.0)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    result = asyncio.run(run(minutes, args.rate, args.quick, ddl_every, say))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0 if result["lost"] == 0 and not result["unverified"] else 1


if __name__ == "__main__":
    sys.exit(main())
