"""The archive commands (`replay`, `verify`, `compact`, `impact`, `rollback`, `retention`,
`usage`) open their store through `cli.replay.open_archive`, which retries a request that
fails transiently. Against each real store behind a Toxiproxy proxy: reads made while the
proxy is down, or right after it reset every connection, get their answer once it is back;
without the retries the first one fails (the hour soak's Azure verify stopped on one
"Cannot write to closing transport")."""

from __future__ import annotations

import asyncio
import threading

from connectors.errors import Retriable
from connectors.registry import open_store
from replicator.cli.replay import open_archive
from replicator.devstack.stack import Stack
from tests.conftest import StoreTarget
from tests.integration.archive_helpers import sink_environ
from tests.integration.faults import store_through, toxiproxy


async def test_archive_commands_ride_out_a_short_store_outage(
        dev_stack: Stack, store_target: StoreTarget) -> None:
    with toxiproxy(dev_stack) as proxies:
        proxy, proxied = store_through(proxies, store_target)
        store, _ = open_archive(proxied.url, None, sink_environ())
        bare = open_store(proxied.url, sink_environ())
        try:
            await store.put("probe/one", b"wedding")
            assert await store.get("probe/one") == b"wedding"
            proxy.disable()
            back = threading.Timer(2.0, proxy.enable)
            back.start()
            try:
                try:
                    await bare.get("probe/one")
                except Retriable:
                    pass  # a bare store fails at once while the proxy is down
                else:
                    raise AssertionError("a read through a disabled proxy succeeded")
                assert await store.get("probe/one") == b"wedding"
                assert [i.key async for i in store.list("probe/")] == ["probe/one"]
            finally:
                back.join()
            # Every connection reset once: the pooled ones are dead, the retry reconnects.
            with proxy.with_toxic("reset_peer", timeout=0):
                reset = asyncio.create_task(store.get("probe/one"))
                await asyncio.sleep(0.5)
            assert await reset == b"wedding"
        finally:
            await store.close()
            await bare.close()
